"""The supervisor's functional core: ``Supervisor.handle(event, now) -> actions``.

Pure: no syscalls, no clock, no logging; time comes in as ``now``. Every transition is
guarded (an impossible one raises ``InvalidTransition``, which is a bug). Every master and
generation transition, and a worker's spawn, readiness, kill and exit, is reported with
exactly one ``Report``; taking a worker off the socket and signalling it are logged by the
loop as it does them (``worker.detached``, ``worker.signalled``).

The work is shared by three state machines, each the only code that changes its records:

- ``Supervisor`` (here): the master, and the requests from outside (reload, stop, scale,
  rollback: ``rollback.py``, functions of this class written apart);
- ``generations.Generations``: generations (``worker_events.WorkerEvents``: what worker
  events mean for them);
- ``worker_lifecycle.WorkerLifecycle``: each worker (ready, parked, stopping, exit);

with two helpers that return actions and change nothing: ``readiness.Readiness`` (the
timers and probes of each ``--ready`` mode) and ``respawn.Respawns`` (crash backoff).

Master:     STARTING -> RUNNING <-> RELOADING;  any -> STOPPING -> exit;  with
            --shutdown-delay: RUNNING | RELOADING -> LEAVING -> STOPPING; a rollback's
            restart: RUNNING | RELOADING -> RELOADING.
Invariants: at most one STARTING and one ACTIVE generation; the stop signal reaches a
worker at most once; a worker is forgotten exactly once, when its exit is reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import assert_never

from handoff.core import actions as act
from handoff.core import events as ev
from handoff.core import machine_resume, rollback, scaling
from handoff.core.changes import Change, Complete, Crashed, Failing, GivingUp
from handoff.core.generations import Generations
from handoff.core.model import (
    Generation,
    GenerationState,
    GenId,
    InvalidTransition,
    MasterState,
    Pid,
    Worker,
)
from handoff.core.policy import Policy, ReloadOutcome
from handoff.core.snapshot import MachineSnapshot
from handoff.core.timers import SHUTDOWN_DELAY_KEY, TimerKey, TimerKind
from handoff.core.worker_events import WorkerEvents
from handoff.errors import EXIT_GAVE_UP, EXIT_NEVER_READY, EXIT_OK
from handoff.formats.log_events import EventName, Level

__all__ = ["InvalidTransition", "Supervisor"]

_REFUSED = {
    MasterState.STOPPING: "stopping",
    MasterState.LEAVING: "leaving: the master stops after --shutdown-delay",
}


class Supervisor:
    """Decides what to do next from what happened; see the module docstring."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.state = MasterState.STARTING
        self.last_reload: ReloadOutcome | None = None
        self.workers_target = policy.workers  # per generation; scale changes it
        self._gens = Generations(policy)
        self._events = WorkerEvents(policy, self._gens)
        self._reload_pending = False
        self._reload_started_at = 0.0
        self._fast_stop = False
        self._exit: act.Exit | None = None
        self._exited = False
        self._listeners_closed = False  # CloseListeners said, once, while stopping
        self.window: rollback.Window | None = None  # a generation parked, the new one watched
        self.restarting: rollback.Restarting | None = None  # a rollback's restart under way

    # -- views (read by the loop, the control server, status and the systemd glue) ------

    @property
    def stop_reason(self) -> str:
        """Why the master stops, or will after --shutdown-delay ("" while it does not)."""
        code, reason = (EXIT_OK, "") if self._exit is None else (self._exit.code, self._exit.reason)
        return f"the first generation failed: {reason}" if code == EXIT_NEVER_READY else reason

    @property
    def generations(self) -> dict[GenId, Generation]:
        """Every generation not yet gone, by id."""
        return self._gens.by_id

    @property
    def previous_release(self) -> GenId | None:
        """The generation whose release a rollback would restart (its directory, env)."""
        return self._gens.previous_release

    def generation_in(self, state: GenerationState) -> Generation | None:
        return self._gens.in_state(state)

    def generation(self, gen: GenId) -> Generation | None:
        return self._gens.by_id.get(gen)

    def worker(self, pid: Pid) -> Worker | None:
        return self._gens.workers.get(pid)

    def reloading(self) -> GenId | None:
        """The generation the reload in progress is starting, if one is."""
        starting = self.generation_in(GenerationState.STARTING)
        return starting.id if self.state is MasterState.RELOADING and starting else None

    # -- dispatch ----------------------------------------------------------------------

    def handle(self, event: ev.Event, now: float) -> list[act.Action]:
        out: list[act.Action] = []
        gens = self._gens
        match event:
            case ev.Started():
                self._require_master(MasterState.STARTING)
                gens.start(self.workers_target, now, out)
            case ev.Resumed():
                self._require_master(MasterState.STARTING)
                machine_resume.resume(self, event, now, out)
            case ev.ReloadRequested(source=source):
                self._on_reload_requested(source, now, out)
            case ev.StopRequested(fast=fast, source=source):
                self._on_stop_requested(fast, source, now, out)
            case ev.ScaleRequested(source=source, workers=workers, delta=delta):
                scaling.scale(self, source, workers, delta, out)
            case ev.ForwardRequested(signal=sig):
                out.extend(act.SendSignal(pid=w.pid, signal=sig) for w in gens.workers.live())
                out.append(act.report(EventName.SIGNAL_FORWARDED, signal=sig.name))
            case ev.WorkerSpawned(gen=gen_id, slot=slot, pid=pid):
                self._events.spawned(gen_id, slot, pid, now, out)
            case ev.SpawnFailed(gen=gen_id, slot=slot, reason=reason):
                self._act_on(self._events.spawn_failed(gen_id, slot, reason, now, out), now, out)
            case ev.ChildExited(pid=pid, status=status):
                self._act_on(self._events.exited(pid, status, now, out), now, out)
            case ev.WorkerNotified():
                self._act_on(self._events.notified(event, now, out), now, out)
            case ev.ProbeFinished():
                self._act_on(self._events.probe_finished(event, now, out), now, out)
            case ev.TimerFired(key=key) if key.kind is TimerKind.SHUTDOWN_DELAY:
                self._end_leaving(fast=False, now=now, out=out)
            case ev.RollbackRequested() | ev.DetachFailed() | ev.ReattachFailed():
                rollback.on_event(self, event, now, out)
            case ev.VerifyFinished():
                rollback.on_event(self, event, now, out)
            case ev.TimerFired(key=key) if key.kind in rollback.TIMERS:
                rollback.on_timer(self, key, out)
            case ev.TimerFired(key=key) if key.kind is TimerKind.RESPAWN:
                self._events.respawn_due(key, stopping=self.state is MasterState.STOPPING, out=out)
            case ev.TimerFired(key=key):
                self._act_on(self._events.on_worker_timer(key, now, out), now, out)
            case _:
                assert_never(event)
        self._check_exit(out)
        return out

    def _act_on(self, change: Change, now: float, out: list[act.Action]) -> None:
        """What a change of a generation (starting, or serving no more) means for the master."""
        match change:
            case None:
                pass
            case Complete(gen=gen):
                self._activate(gen, now, out)
            case Failing(gen=gen, reason=reason):
                self._fail(gen, reason, now, out)
            case Crashed(gen=gen, reason=reason) | GivingUp(gen=gen, reason=reason):
                # In a --keep-previous window a crash counts towards a rollback, which
                # comes before any give-up. Nothing serves otherwise: exit, so that an
                # orchestrator restarts or replaces us; not while a reload in progress may
                # bring the fix, or a stop is under way.
                rolled_back = rollback.crashed(self, gen, reason, now, out)
                giving_up = isinstance(change, GivingUp) and self.state is MasterState.RUNNING
                if giving_up and not rolled_back:
                    out.append(
                        act.report(EventName.MASTER_GAVE_UP, Level.ERROR, gen=gen.id, reason=reason)
                    )
                    self._begin_stop(fast=False, now=now, out=out, code=EXIT_GAVE_UP, reason=reason)
            case _:
                assert_never(change)

    # -- across a re-exec in place ------------------------------------------------------

    def snapshot(self, deadlines: Mapping[TimerKey, float]) -> MachineSnapshot:
        """The whole state as plain data, with the loop's pending deadlines."""
        return machine_resume.snapshot(self, deadlines)

    # -- generations, as far as the master is concerned --------------------------------

    def _activate(self, gen: Generation, now: float, out: list[act.Action]) -> None:
        signal_name, keep = self._stop_signal_name(), self.policy.keep_previous_s
        self._gens.activate(gen, self.workers_target, signal_name, now, out, park_s=keep)
        rollback.open_window(self, gen, out)
        if self.state is MasterState.STARTING:
            self.state = MasterState.RUNNING
            out.append(act.report(EventName.MASTER_READY, gen=gen.id))
            self._run_pending_reload(now, out)
        elif self.state is MasterState.RELOADING:
            self._finish_reload(gen, ok=True, reason="", now=now, out=out)

    def _fail(self, gen: Generation, reason: str, now: float, out: list[act.Action]) -> None:
        self._gens.fail(gen, reason, out)
        if self.state is MasterState.STARTING:
            out.append(act.report(EventName.MASTER_NEVER_READY, Level.ERROR, reason=reason))
            self._begin_stop(fast=False, now=now, out=out, code=EXIT_NEVER_READY, reason=reason)
        elif self.state is MasterState.RELOADING:
            self._finish_reload(gen, ok=False, reason=reason, now=now, out=out)
        self._gens.check_gone(gen, out)

    # -- reloads and stops -------------------------------------------------------------

    def _on_reload_requested(self, source: str, now: float, out: list[act.Action]) -> None:
        match self.state:
            case MasterState.RUNNING:
                # RUNNING -> RELOADING: a new generation starts beside the serving one.
                self.state = MasterState.RELOADING
                self._reload_started_at = now
                gen = self._gens.next_id
                out.append(act.report(EventName.RELOAD_REQUESTED, source=source, gen=gen))
                self._gens.start(self.workers_target, now, out)
            case MasterState.STARTING | MasterState.RELOADING:
                # Requests during a start coalesce: one pending reload, run when it ends.
                already = self._reload_pending
                self._reload_pending = True
                out.append(act.report(EventName.RELOAD_QUEUED, source=source, coalesced=already))
            case MasterState.STOPPING | MasterState.LEAVING:
                why = _REFUSED[self.state]
                out.append(
                    act.report(EventName.RELOAD_REFUSED, Level.WARNING, source=source, reason=why)
                )
            case _:
                assert_never(self.state)

    def _finish_reload(
        self, gen: Generation, *, ok: bool, reason: str, now: float, out: list[act.Action]
    ) -> None:
        # RELOADING -> RUNNING, whether the new generation serves or failed.
        self._require_master(MasterState.RELOADING)
        self.state = MasterState.RUNNING
        duration = round(now - self._reload_started_at, 4)
        self.last_reload = ReloadOutcome(gen=gen.id, ok=ok, reason=reason, duration_s=duration)
        if ok:
            out.append(act.report(EventName.RELOAD_SUCCEEDED, gen=gen.id, duration_s=duration))
        else:
            out.append(
                act.report(
                    EventName.RELOAD_FAILED,
                    Level.ERROR,
                    gen=gen.id,
                    reason=reason,
                    duration_s=duration,
                )
            )
        rollback.finished(self, gen, ok=ok, reason=reason, now=now, out=out)
        self._run_pending_reload(now, out)

    def _run_pending_reload(self, now: float, out: list[act.Action]) -> None:
        if self._reload_pending and self.state is MasterState.RUNNING:
            self._reload_pending = False
            self._on_reload_requested("queued", now, out)

    def _on_stop_requested(
        self, fast: bool, source: str, now: float, out: list[act.Action]
    ) -> None:
        if self.state is MasterState.LEAVING:
            # A second request skips the rest of --shutdown-delay.
            out.append(act.CancelTimer(key=SHUTDOWN_DELAY_KEY))
            self._end_leaving(fast=fast, now=now, out=out)
            return
        if self.state is MasterState.STOPPING:
            # A second Ctrl-C (or QUIT) means: stop waiting for the drain.
            if (fast or source == "SIGINT") and not self._fast_stop:
                self._fast_stop = True
                out.append(act.report(EventName.MASTER_STOPPING, fast=True, source=source))
                self._kill_all(out)
            return
        reason = f"stop requested ({source})"
        delay = self.policy.shutdown_delay_s
        if delay > 0 and not fast and self.generation_in(GenerationState.ACTIVE) is not None:
            self._begin_leaving(delay, reason, now, out)
            return
        self._begin_stop(fast=fast, now=now, out=out, code=EXIT_OK, reason=reason)

    def _begin_leaving(self, delay: float, reason: str, now: float, out: list[act.Action]) -> None:
        # RUNNING | RELOADING -> LEAVING: not ready any more, the serving generation serves
        # on for the delay; a reload in progress is cancelled (its generation drained).
        self._cancel_reload(now, out)
        rollback.close_window(self, out)
        for gen in list(self.generations.values()):
            if gen.state in (GenerationState.STARTING, GenerationState.PARKED):
                self._gens.drain(gen, "stopping", self._stop_signal_name(), out)
        self.state = MasterState.LEAVING
        self._exit = act.Exit(code=EXIT_OK, reason=reason)
        out.append(act.StartTimer(key=SHUTDOWN_DELAY_KEY, delay_s=delay))
        out.append(act.report(EventName.MASTER_LEAVING, delay_s=delay, reason=reason))

    def _end_leaving(self, *, fast: bool, now: float, out: list[act.Action]) -> None:
        if self.state is MasterState.LEAVING:  # a timer may outlive its state
            assert self._exit is not None
            self._begin_stop(fast=fast, now=now, out=out, code=EXIT_OK, reason=self._exit.reason)

    def _begin_stop(
        self, *, fast: bool, now: float, out: list[act.Action], code: int, reason: str
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
            self._kill_all(out)

    def _cancel_reload(
        self, now: float, out: list[act.Action], reason: str = "cancelled: master stopping"
    ) -> None:
        self._reload_pending = False  # before _finish_reload, which would start it
        starting = self.generation_in(GenerationState.STARTING)
        if self.state is MasterState.RELOADING and starting is not None:
            self._finish_reload(starting, ok=False, reason=reason, now=now, out=out)

    def _kill_all(self, out: list[act.Action]) -> None:
        lifecycle = self._gens.workers
        for worker in lifecycle.live():
            lifecycle.kill(worker, "fast stop", out)

    def _check_exit(self, out: list[act.Action]) -> None:
        if self.state is not MasterState.STOPPING:
            return
        if not self._listeners_closed and not self._gens.workers.any_accepting():
            self._listeners_closed = True
            out.append(act.CloseListeners())
        if not self.generations and not self._exited:
            assert self._exit is not None
            self._exited = True
            out.append(self._exit)

    # -- guards ------------------------------------------------------------------------

    def _require_master(self, *allowed: MasterState) -> None:
        if self.state not in allowed:
            raise InvalidTransition(
                f"master is {self.state}, expected one of {[s.value for s in allowed]}"
            )

    def _stop_signal_name(self) -> str:
        return "SIGKILL" if self._fast_stop else self.policy.stop_signal.name
