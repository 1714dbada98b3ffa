"""The ``Supervisor`` across a re-exec in place: its whole state as a snapshot, and the
takeover from one.

Pure. Functions of the Supervisor, written out of its class (which stays small); they are
its own and touch its state as its methods do. The generations themselves are rebuilt by
``restore.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from handoff.core import actions as act
from handoff.core import events as ev
from handoff.core import restore, rollback
from handoff.core.model import GenerationState, MasterState
from handoff.core.policy import ReloadOutcome
from handoff.core.snapshot import MachineSnapshot, ReloadRecord
from handoff.core.timers import SHUTDOWN_DELAY_KEY, TimerKey, remaining
from handoff.errors import EXIT_OK
from handoff.formats.log_events import EventName
from handoff.formats.options import MAX_WORKERS, MIN_WORKERS

if TYPE_CHECKING:
    from handoff.core.machine import Supervisor


def snapshot(self: Supervisor, deadlines: Mapping[TimerKey, float]) -> MachineSnapshot:
    """The whole state as plain data, with the loop's pending deadlines."""
    last = self.last_reload
    return MachineSnapshot(
        state=self.state,
        workers_target=self.workers_target,
        next_gen=self._gens.next_id,
        previous_release=self._gens.previous_release,
        generations=restore.records(self._gens),
        deadlines=dict(deadlines),
        reload_pending=self._reload_pending,
        reload_started_at=self._reload_started_at,
        fast_stop=self._fast_stop,
        exit_code=None if self._exit is None else self._exit.code,
        exit_reason="" if self._exit is None else self._exit.reason,
        last_reload=None
        if last is None
        else ReloadRecord(gen=last.gen, ok=last.ok, reason=last.reason, duration_s=last.duration_s),
    )


def resume(self: Supervisor, event: ev.Resumed, now: float, out: list[act.Action]) -> None:
    """Take over after a re-exec: the snapshot's state, the workers the kernel shows.

    A reload in progress goes on (its starting workers prove themselves ready again);
    a stop in progress goes on draining.
    """
    snap = event.snapshot
    self.workers_target = max(MIN_WORKERS, min(MAX_WORKERS, snap.workers_target))
    last = snap.last_reload
    if last is not None:
        self.last_reload = ReloadOutcome(
            gen=last.gen, ok=last.ok, reason=last.reason, duration_s=last.duration_s
        )
    self._reload_pending = snap.reload_pending
    self._reload_started_at = snap.reload_started_at
    self._fast_stop = snap.fast_stop
    restored = restore.restore(self._gens, snap, event.found, now, out)
    self._gens.previous_release = snap.previous_release
    for gen in list(self.generations.values()):
        if gen.state is GenerationState.PARKED:
            # What detaching removed was the old master's memory: it cannot be put back.
            self._gens.drain(gen, "parked across a re-exec", self._stop_signal_name(), out)
    starting = self.generation_in(GenerationState.STARTING)
    if starting is not None and starting.release_of is not None:
        self.restarting = rollback.Restarting(source=event.reason, started_at=now)
    active = self.generation_in(GenerationState.ACTIVE)
    self.state = restore.master_state(snap.state, active=active, starting=starting)
    if self.state in (MasterState.STOPPING, MasterState.LEAVING):
        code = EXIT_OK if snap.exit_code is None else snap.exit_code
        self._exit = act.Exit(code=code, reason=snap.exit_reason or "stop requested")
    out.append(
        act.report(
            EventName.MASTER_RESUMED,
            reason=event.reason,
            state=self.state.value,
            generations=len(self.generations),
            workers=restored.found,
            lost=restored.lost,
            unlisted=restored.unlisted,
        )
    )
    if self.state is MasterState.STOPPING:
        for gen in list(self.generations.values()):
            if gen.state in (GenerationState.ACTIVE, GenerationState.STARTING):
                self._gens.drain(gen, "stopping", self._stop_signal_name(), out)
    elif self.state is MasterState.LEAVING:
        left = remaining(snap.deadlines, SHUTDOWN_DELAY_KEY, now) or 0.0
        out.append(act.StartTimer(key=SHUTDOWN_DELAY_KEY, delay_s=left))
    elif starting is not None:
        self._act_on(self._gens.complete(starting), now, out)
    elif self.state is MasterState.STARTING:
        self._gens.start(self.workers_target, now, out)  # nothing was started yet
