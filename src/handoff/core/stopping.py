"""Stopping: a stop request, the --shutdown-delay (LEAVING), the drain, and the exit.

Pure. Functions of the ``Supervisor``, written out of its class (which stays small); they
are its own and change its state as its methods do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from handoff.core import actions as act
from handoff.core import rollback, rollout
from handoff.core.model import GenerationState, MasterState
from handoff.core.timers import SHUTDOWN_DELAY_KEY
from handoff.errors import EXIT_OK
from handoff.formats.log_events import EventName

if TYPE_CHECKING:
    from handoff.core.machine import Supervisor


def request(self: Supervisor, fast: bool, source: str, now: float, out: list[act.Action]) -> None:
    if self.state is MasterState.LEAVING:
        # A second request skips the rest of --shutdown-delay.
        out.append(act.CancelTimer(key=SHUTDOWN_DELAY_KEY))
        end_leaving(self, fast=fast, now=now, out=out)
        return
    if self.state is MasterState.STOPPING:
        # A second Ctrl-C (or QUIT) means: stop waiting for the drain.
        if (fast or source == "SIGINT") and not self._fast_stop:
            self._fast_stop = True
            out.append(act.report(EventName.MASTER_STOPPING, fast=True, source=source))
            _kill_all(self, out)
        return
    reason = f"stop requested ({source})"
    delay = self.policy.shutdown_delay_s
    if delay > 0 and not fast and self.generation_in(GenerationState.ACTIVE) is not None:
        _begin_leaving(self, delay, reason, now, out)
        return
    begin(self, fast=fast, now=now, out=out, code=EXIT_OK, reason=reason)


def _begin_leaving(
    self: Supervisor, delay: float, reason: str, now: float, out: list[act.Action]
) -> None:
    # RUNNING | RELOADING -> LEAVING: not ready any more, the serving generation serves
    # on for the delay; a reload in progress is cancelled (its generation drained).
    self._cancel_reload(now, out)
    rollout.undo(self, out)  # serve the delay whole: a --rollout's old workers back
    rollback.close_window(self, out)
    for gen in list(self.generations.values()):
        if gen.state in (GenerationState.STARTING, GenerationState.PARKED):
            self._gens.drain(gen, "stopping", self._stop_signal_name(), out)
    self.state = MasterState.LEAVING
    self._exit = act.Exit(code=EXIT_OK, reason=reason)
    out.append(act.StartTimer(key=SHUTDOWN_DELAY_KEY, delay_s=delay))
    out.append(act.report(EventName.MASTER_LEAVING, delay_s=delay, reason=reason))


def end_leaving(self: Supervisor, *, fast: bool, now: float, out: list[act.Action]) -> None:
    if self.state is MasterState.LEAVING:  # a timer may outlive its state
        assert self._exit is not None
        begin(self, fast=fast, now=now, out=out, code=EXIT_OK, reason=self._exit.reason)


def begin(
    self: Supervisor, *, fast: bool, now: float, out: list[act.Action], code: int, reason: str
) -> None:
    # any -> STOPPING; a reload in progress ends as failed ("cancelled").
    self._cancel_reload(now, out)
    self.state = MasterState.STOPPING
    self._fast_stop = fast
    self._exit = act.Exit(code=code, reason=reason)
    out.append(act.report(EventName.MASTER_STOPPING, fast=fast, reason=reason))
    # No new connection from here on; the workers take what is queued, then leave.
    out.append(act.StopTakingConnections())
    rollback.close_window(self, out)
    for gen in list(self.generations.values()):
        if gen.state in (
            GenerationState.ACTIVE,
            GenerationState.STARTING,
            GenerationState.PARKED,
        ):
            signal_name = self._stop_signal_name()
            self._gens.drain(gen, "stopping", signal_name, out, accept_until_signal=not fast)
    if fast:
        _kill_all(self, out)


def _kill_all(self: Supervisor, out: list[act.Action]) -> None:
    lifecycle = self._gens.workers
    for worker in lifecycle.live():
        lifecycle.kill(worker, "fast stop", out)


def check_exit(self: Supervisor, out: list[act.Action]) -> None:
    if self.state is not MasterState.STOPPING:
        return
    if not self._listeners_closed and not self._gens.workers.any_accepting():
        self._listeners_closed = True
        out.append(act.CloseListeners())
    if not self.generations and not self._exited:
        assert self._exit is not None
        self._exited = True
        out.append(self._exit)
