"""One worker's state machine: ready, the three stopping phases, exit.

Pure. ``Generations`` owns one ``WorkerLifecycle`` and, with the ``Supervisor``, decides
*when* a worker stops (its generation drains or fails, the master stops, a slot is scaled
away) and what a lost worker means for its generation; this class makes each worker
transition, guarded, and reports it. Only it changes ``Worker`` records (``Generations``
changes generations, the ``Supervisor`` the master). The states and edges
(``model.WorkerState``):

    STARTING -> READY                    proved ready (readiness.py)
    STARTING | READY -> SETTLING         taken off the listening socket (DetachListeners)
    READY -> PARKED                      taken off the socket, kept (--keep-previous)
    PARKED -> READY                      put back on the socket (ReattachListeners): rollback
    PARKED -> SIGNALLED                  the window ended: the stop signal at once
    SETTLING -> SIGNALLED                after --settle: the stop signal, once; drain timer
                                         (when the master stops, the worker stays on the
                                         sockets through the settle, detached only here)
    live -> KILLED                       drain timeout or fast stop: KillTree
    live -> EXITED                       reaped; forgotten here and only here
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from handoff.core import actions as act
from handoff.core.model import ExitStatus, GenId, InvalidTransition, Pid, Worker, WorkerState
from handoff.core.policy import Policy
from handoff.core.readiness import Readiness
from handoff.core.timers import TimerKey, TimerKind, remaining
from handoff.formats.log_events import EventName, Level


def worker_fields(worker: Worker) -> dict[str, object]:
    """The fields that name a worker in every ``worker.*`` report about it."""
    return {"gen": worker.gen, "worker": worker.slot, "pid": worker.pid}


@dataclass(frozen=True, slots=True)
class Exited:
    """What a reaped worker leaves behind: its record, and why it counts as lost (if it does)."""

    worker: Worker
    lost_reason: str  # empty: it exited because it was told to
    was_ready_at: float | None  # for respawn accounting: how long it had been ready


class WorkerLifecycle:
    """The live workers by pid, and their transitions; see the module docstring."""

    def __init__(self, policy: Policy, readiness: Readiness) -> None:
        self._policy = policy
        self._readiness = readiness
        self._workers: dict[Pid, Worker] = {}
        # Settling workers still on the sockets (the master stops): detached at their signal.
        self._accepting: set[Pid] = set()
        # Workers whose stop signal comes with a rescue of their connections.
        self._rescued: set[Pid] = set()

    def get(self, pid: Pid) -> Worker | None:
        return self._workers.get(pid)

    def live(self) -> list[Worker]:
        return list(self._workers.values())

    def any_accepting(self) -> bool:
        """Is a worker still on the listening sockets (or about to be, once ready)?"""
        on = (WorkerState.STARTING, WorkerState.READY)
        return bool(self._accepting) or any(w.state in on for w in self._workers.values())

    def spawned(self, gen: GenId, slot: int, pid: Pid, now: float, out: list[act.Action]) -> Worker:
        """A new worker: STARTING (the caller starts its readiness watch, or stops it)."""
        worker = Worker(gen=gen, slot=slot, pid=pid, state=WorkerState.STARTING, started_at=now)
        self._workers[pid] = worker
        out.append(act.report(EventName.WORKER_SPAWNED, **worker_fields(worker)))
        return worker

    def resume(
        self, worker: Worker, deadlines: Mapping[TimerKey, float], now: float, out: list[act.Action]
    ) -> None:
        """After a re-exec: take the worker back in the state it had, and re-arm what that
        state waits for (its settle or drain deadline as it was, else a full one; a detach
        or kill is done again: the crash may have come before it). A starting worker's
        readiness is the caller's to re-watch."""
        self._workers[worker.pid] = worker
        match worker.state:
            case WorkerState.SETTLING:
                # Taken off the socket again: the crash may have come before the detach.
                out.append(act.DetachListeners(pid=worker.pid))
                key = TimerKey(TimerKind.SETTLE, worker.pid)
                settle = remaining(deadlines, key, now)
                delay = self._policy.settle_s if settle is None else settle
                out.append(act.StartTimer(key=key, delay_s=delay))
            case WorkerState.SIGNALLED:
                key = TimerKey(TimerKind.DRAIN, worker.pid)
                drain = remaining(deadlines, key, now)
                delay = self._policy.drain_timeout_s if drain is None else drain
                out.append(act.StartTimer(key=key, delay_s=delay))
            case WorkerState.KILLED | WorkerState.EXITED:
                worker.state = WorkerState.KILLED
                out.append(act.KillTree(pid=worker.pid))
            case WorkerState.STARTING | WorkerState.READY | WorkerState.PARKED:
                pass

    def ready(
        self, worker: Worker, via: str, now: float, out: list[act.Action], detail: str = ""
    ) -> bool:
        """STARTING -> READY; False for a repeated READY=1 or a worker already told to stop."""
        if worker.state is not WorkerState.STARTING:
            return False
        worker.state = WorkerState.READY
        worker.ready_at = now
        self._readiness.forget(worker, out)
        fields = {
            **worker_fields(worker),
            "via": via,
            "duration_s": round(now - worker.started_at, 4),
        }
        if detail:
            fields["detail"] = detail
        out.append(act.report(EventName.WORKER_READY, **fields))
        return True

    def park(self, worker: Worker, out: list[act.Action]) -> bool:
        """READY -> PARKED: off the socket, no signal; False (nothing done) if not ready."""
        if worker.state is not WorkerState.READY:
            return False
        worker.state = WorkerState.PARKED
        out.append(act.DetachListeners(pid=worker.pid))
        return True

    def unpark(self, worker: Worker, out: list[act.Action]) -> None:
        """PARKED -> READY: its registrations put back, it accepts again (a rollback)."""
        if worker.state is not WorkerState.PARKED:
            raise InvalidTransition(f"worker {worker.pid} is {worker.state}, not parked")
        worker.state = WorkerState.READY
        out.append(act.ReattachListeners(pid=worker.pid))

    def note_status(self, worker: Worker, status: str) -> None:
        """The worker sent STATUS= (shown by ``handoff status``); no state changes."""
        worker.status = status

    def stop(
        self,
        worker: Worker,
        out: list[act.Action],
        *,
        respawn_reason: str = "",
        accept_until_signal: bool = False,
    ) -> None:
        """STARTING | READY -> SETTLING: first stop it accepting (from outside), then, after
        the settle, signal it. With respawn_reason, its slot is respawned once it exits.

        accept_until_signal (the master stops, its listeners take no new connection): the
        worker stays on the sockets through the settle to take what is queued, and is
        detached just before its stop signal. A parked worker, off the socket already, is
        signalled at once."""
        rescue = self._policy.rescue_keepalive and not accept_until_signal
        if worker.state is WorkerState.PARKED:
            if rescue:
                self._rescued.add(worker.pid)
            worker.state = WorkerState.SETTLING
            self.signal_stop(worker, out)
            return
        if worker.state not in (WorkerState.STARTING, WorkerState.READY):
            return
        worker.state = WorkerState.SETTLING
        if rescue:
            self._rescued.add(worker.pid)
        worker.respawn_reason = respawn_reason
        self._readiness.forget(worker, out)
        if accept_until_signal and self._policy.settle_s > 0:
            self._accepting.add(worker.pid)
        else:
            out.append(act.DetachListeners(pid=worker.pid))
        if self._policy.settle_s > 0:
            key = TimerKey(TimerKind.SETTLE, worker.pid)
            out.append(act.StartTimer(key=key, delay_s=self._policy.settle_s))
        else:
            self.signal_stop(worker, out)

    def signal_stop(self, worker: Worker, out: list[act.Action]) -> None:
        """SETTLING -> SIGNALLED: the stop signal, exactly once, and the drain deadline."""
        if worker.state is not WorkerState.SETTLING:
            return
        worker.state = WorkerState.SIGNALLED
        if worker.pid in self._accepting:
            self._accepting.discard(worker.pid)
            out.append(act.DetachListeners(pid=worker.pid))
        rescue = worker.pid in self._rescued
        self._rescued.discard(worker.pid)
        out.append(act.SendSignal(pid=worker.pid, signal=self._policy.stop_signal, rescue=rescue))
        key = TimerKey(TimerKind.DRAIN, worker.pid)
        out.append(act.StartTimer(key=key, delay_s=self._policy.drain_timeout_s))

    def kill(self, worker: Worker, reason: str, out: list[act.Action]) -> None:
        """Any live state -> KILLED: its whole process tree, once."""
        if worker.state in (WorkerState.KILLED, WorkerState.EXITED):
            return
        worker.state = WorkerState.KILLED
        self._readiness.forget(worker, out)
        out.append(act.KillTree(pid=worker.pid))
        out.append(
            act.report(
                EventName.WORKER_KILLED, Level.WARNING, **worker_fields(worker), reason=reason
            )
        )

    def exited(self, pid: Pid, status: ExitStatus, now: float, out: list[act.Action]) -> Exited:
        """Any live state -> EXITED: forget the worker, say whether it was lost."""
        worker = self._workers.pop(pid, None)
        self._accepting.discard(pid)
        self._rescued.discard(pid)
        if worker is None:
            raise InvalidTransition(f"pid {pid} reported exited but is not a live worker")
        was = worker.state
        worker.state = WorkerState.EXITED
        self._readiness.forget(worker, out)
        out.append(act.CancelTimer(key=TimerKey(TimerKind.DRAIN, pid)))
        if self._policy.settle_s > 0:
            out.append(act.CancelTimer(key=TimerKey(TimerKind.SETTLE, pid)))
        expected = was.stopping and not worker.respawn_reason
        description = status.describe(killed_by_us=was is WorkerState.KILLED)
        out.append(
            act.report(
                EventName.WORKER_EXITED,
                Level.INFO if expected else Level.WARNING,
                **worker_fields(worker),
                status=description,
                expected=expected,
                uptime_s=round(now - worker.started_at, 4),
                **status.as_fields(),
            )
        )
        if worker.respawn_reason:
            return Exited(worker, worker.respawn_reason, None)
        if was is WorkerState.PARKED:
            return Exited(worker, "", None)  # off the socket already: nothing to replace
        if expected:
            return Exited(worker, "", None)
        ready = "after it was ready" if was is WorkerState.READY else "before it was ready"
        reason = f"worker {worker.slot} (pid {pid}) {description} {ready}"
        return Exited(worker, reason, worker.ready_at)
