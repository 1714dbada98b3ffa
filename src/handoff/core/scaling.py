"""Scaling the workers per generation (``handoff scale``, TTIN, TTOU).

Pure. A function of the ``Supervisor``, written out of its class (which stays small).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from handoff.core import actions as act
from handoff.core.model import GenerationState, MasterState
from handoff.formats.log_events import EventName, Level
from handoff.formats.options import MAX_WORKERS, MIN_WORKERS

if TYPE_CHECKING:
    from handoff.core.machine import Supervisor


def scale(
    self: Supervisor, source: str, workers: int | None, delta: int, out: list[act.Action]
) -> None:
    if self.state in (MasterState.STOPPING, MasterState.LEAVING):
        why = self.state.value
        out.append(act.report(EventName.SCALE_REFUSED, Level.WARNING, source=source, reason=why))
        return
    was = self.workers_target
    wanted = workers if workers is not None else was + delta
    self.workers_target = max(MIN_WORKERS, min(MAX_WORKERS, wanted))
    out.append(
        act.report(EventName.MASTER_SCALED, workers=self.workers_target, was=was, source=source)
    )
    active = self.generation_in(GenerationState.ACTIVE)
    if active is not None:
        self._gens.resize(active, self.workers_target, out)
