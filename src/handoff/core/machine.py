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
from handoff.core import machine_resume, rollback, rollout, scaling, stopping
from handoff.core.changes import CanaryReady, Change, Complete, Crashed, Failing, GivingUp
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
from handoff.core.timers import TimerKey, TimerKind
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
            case ev.ReloadRequested(source=source, canary=canary):
                self._on_reload_requested(source, now, out, canary=canary)
            case ev.PromoteRequested(source=source):
                why = rollout.promote(self, source, out)
                if why is not None:
                    level = Level.WARNING
                    out.append(
                        act.report(EventName.PROMOTE_REFUSED, level, source=source, reason=why)
                    )
            case ev.StopRequested(fast=fast, source=source):
                stopping.request(self, fast, source, now, out)
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
                stopping.end_leaving(self, fast=False, now=now, out=out)
            case ev.RollbackRequested() | ev.DetachFailed() | ev.ReattachFailed():
                rollback.on_event(self, event, now, out)
            case ev.VerifyFinished():
                rollback.on_event(self, event, now, out)
            case ev.TimerFired(key=key) if key.kind in rollback.TIMERS:
                rollback.on_timer(self, key, now, out)
            case ev.TimerFired(key=key) if key.kind is TimerKind.RESPAWN:
                self._events.respawn_due(key, stopping=self.state is MasterState.STOPPING, out=out)
            case ev.TimerFired(key=key):
                self._act_on(self._events.on_worker_timer(key, now, out), now, out)
            case _:
                assert_never(event)
        if self.state is MasterState.RELOADING:
            rollout.step(self, out)
        stopping.check_exit(self, out)
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
            case CanaryReady(gen=gen):
                serving = self.generation_in(GenerationState.ACTIVE)
                beside = None if serving is None else serving.id
                out.append(
                    act.report(EventName.CANARY_READY, gen=gen.id, workers=gen.size, beside=beside)
                )
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
                    stopping.begin(
                        self, fast=False, now=now, out=out, code=EXIT_GAVE_UP, reason=reason
                    )
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
            stopping.begin(self, fast=False, now=now, out=out, code=EXIT_NEVER_READY, reason=reason)
        elif self.state is MasterState.RELOADING:
            self._finish_reload(gen, ok=False, reason=reason, now=now, out=out)
            rollout.undo(self, out)  # a --rollout's old workers taken off: back
        self._gens.check_gone(gen, out)

    # -- reloads and stops -------------------------------------------------------------

    def _on_reload_requested(
        self, source: str, now: float, out: list[act.Action], *, canary: int = 0
    ) -> None:
        match self.state:
            case MasterState.RUNNING:
                # RUNNING -> RELOADING: a new generation starts beside the serving one.
                self.state = MasterState.RELOADING
                self._reload_started_at = now
                gen = self._gens.next_id
                out.append(act.report(EventName.RELOAD_REQUESTED, source=source, gen=gen))
                rollout.start(self, canary, now, out)
            case MasterState.STARTING | MasterState.RELOADING if why := rollout.reload_refusal(
                self, canary
            ):
                level = Level.WARNING
                out.append(act.report(EventName.RELOAD_REFUSED, level, source=source, reason=why))
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

    def _cancel_reload(
        self, now: float, out: list[act.Action], reason: str = "cancelled: master stopping"
    ) -> None:
        self._reload_pending = False  # before _finish_reload, which would start it
        starting = self.generation_in(GenerationState.STARTING)
        if self.state is MasterState.RELOADING and starting is not None:
            self._finish_reload(starting, ok=False, reason=reason, now=now, out=out)

    # -- guards ------------------------------------------------------------------------

    def _require_master(self, *allowed: MasterState) -> None:
        if self.state not in allowed:
            raise InvalidTransition(
                f"master is {self.state}, expected one of {[s.value for s in allowed]}"
            )

    def _stop_signal_name(self) -> str:
        return "SIGKILL" if self._fast_stop else self.policy.stop_signal.name
