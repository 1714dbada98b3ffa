"""Switching the listening sockets between generations from outside the workers: taking a
worker off (detach), putting a parked one back (reattach: a rollback), and checking the
serving generation while the previous one is parked (--verify).

Detaching (system/detach.py) records every registration it removes from a worker that
is being parked, so that a rollback can put exactly those back. A worker that cannot be
parked (the detach was signal-only: it would go on accepting with the old code) is
reported to the machine, which stops it instead. A --verify check is a short process,
like a readiness probe: ``http:PATH`` is one GET through the listening socket, answered by
whichever worker accepts it (the parked ones are off the socket: the serving generation),
``exec:COMMAND`` a shell command whose exit status is the answer.

Each call returns what the loop writes (reports) and feeds the machine (events).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

from handoff.core import actions as act
from handoff.core import events as ev
from handoff.core.machine import Supervisor
from handoff.core.model import GenId, Pid, WorkerState
from handoff.errors import SpawnError
from handoff.formats.http_check import DEFAULT_STATUSES, DEFAULT_TRY_TIMEOUT_S
from handoff.formats.log_events import EventName, Level
from handoff.formats.options import ReadyMode, RunConfig, VerifySpec
from handoff.formats.worker_contract import clean_environment
from handoff.master.holdings import Holdings
from handoff.master.http_probes import finished as http_finished
from handoff.master.logs import emit
from handoff.master.short_runs import ShortRuns
from handoff.master.sources import Source, Sources
from handoff.master.system import System
from handoff.system import http_probe
from handoff.system.capabilities import pidfd_getfd_refusal
from handoff.system.children import SpawnRequest
from handoff.system.detach import Detachment, Registration
from handoff.system.sockets import listener_inodes

_NO_DETACH_HINT = (
    "a seccomp filter refuses pidfd_getfd (a container's profile, or systemd's "
    "SystemCallFilter=), so old workers stop accepting only at their stop signal; allow "
    "it (SystemCallFilter=pidfd_getfd, or the container's seccomp profile) to detach them"
)
_NO_PARKING = "--keep-previous parks nothing: a worker still on the socket cannot be kept"

Outcome = list[act.Report | ev.Event]


class Switching:
    """Detach, reattach and --verify; see the module docstring."""

    def __init__(
        self,
        system: System,
        sources: Sources,
        config: RunConfig,
        holdings: Holdings,
        environ: Mapping[str, str],
        *,
        detach_check: Callable[[], str | None] = pidfd_getfd_refusal,
    ) -> None:
        self._system = system
        self._sources = sources
        listeners = holdings.listeners
        self._fd_limit = holdings.worker_fd_limit
        self._verify = config.rollback.verify
        self._environ = clean_environment(environ)
        self._workdir = config.workdir
        # inode -> the master's fd: how /proc names our sockets in a worker's tables.
        self._listener_inodes = listener_inodes(listeners)
        self._target = next(
            (t for lst in listeners if (t := http_probe.probe_target(lst.sock)) is not None), None
        )
        self._parked: dict[Pid, list[Registration]] = {}  # what detach removed, to put back
        self._checks: ShortRuns[GenId] = ShortRuns(system, sources, Source.VERIFY)
        # Asked once: a refusal is the host's setup, and lasts for this master's life.
        self._detach_refused = detach_check()
        if self._detach_refused:
            parking = f"; {_NO_PARKING}" if config.rollback.keep_previous_s > 0 else ""
            emit(
                EventName.DETACH_UNAVAILABLE,
                Level.WARNING,
                reason=f"pidfd_getfd: {self._detach_refused}",
                hint=_NO_DETACH_HINT + parking,
            )

    def pids(self) -> list[Pid]:
        """The check processes' own pids (they are the master's children too)."""
        return self._checks.pids()

    # -- detach and reattach ------------------------------------------------------------

    def detach(self, pid: Pid, machine: Supervisor) -> Outcome:
        """Stop a worker accepting before its stop signal (or while it is parked): the
        report of which path was taken, and DetachFailed if it still accepts."""
        if self._detach_refused:
            reason = f"pidfd_getfd was refused at start: {self._detach_refused}"
            result = Detachment(processes=0, registrations=0, reason=reason)
        else:
            result = self._system.detach(pid, self._listener_inodes)
        worker = machine.worker(pid)
        fields: dict[str, object] = {
            "gen": worker.gen if worker else None,
            "worker": worker.slot if worker else None,
            "pid": pid,
            "path": result.path,
            "registrations": result.registrations,
            "processes": result.processes,
        }
        if result.reason:
            fields["reason"] = result.reason
        if result.results:
            fields["detached"] = result.detached
            fields["failed"] = [{"pid": r.pid, "reason": r.error} for r in result.failed]
        outcome: Outcome = [act.report(EventName.WORKER_DETACHED, **fields)]
        if worker is None or worker.state is not WorkerState.PARKED:
            return outcome
        self._forget_gone(machine)
        if result.path == "epoll" and not result.failed:
            self._parked[pid] = result.removed
        else:
            why = result.reason or "a registration could not be removed"
            outcome.append(ev.DetachFailed(pid=pid, reason=f"{result.path} detach: {why}"))
        return outcome

    def reattach(self, pid: Pid, machine: Supervisor) -> Outcome:
        """Put a parked worker back on the sockets: the report, and ReattachFailed if a
        registration it had could not be put back."""
        recorded = self._parked.pop(pid, [])
        worker = machine.worker(pid)
        began = time.perf_counter()
        restored = self._system.reattach(recorded, self._listener_inodes) if recorded else 0
        took_ms = round((time.perf_counter() - began) * 1000, 3)
        ok = bool(recorded) and restored == len(recorded)
        fields: dict[str, object] = {
            "gen": worker.gen if worker else None,
            "worker": worker.slot if worker else None,
            "pid": pid,
            "registrations": restored,
            "recorded": len(recorded),
            "took_ms": took_ms,
        }
        report = act.report(
            EventName.WORKER_REATTACHED, Level.INFO if ok else Level.WARNING, **fields
        )
        if ok:
            return [report]
        reason = f"{restored} of {len(recorded)} registrations put back"
        return [report, ev.ReattachFailed(pid=pid, reason=reason)]

    def _forget_gone(self, machine: Supervisor) -> None:
        for pid in [p for p in self._parked if machine.worker(p) is None]:
            del self._parked[pid]

    # -- --verify ---------------------------------------------------------------------

    def verify(self, gen: GenId) -> ev.VerifyFinished | None:
        """Start one check of the serving generation; its answer comes when it exits."""
        if self._verify is None:
            return ev.VerifyFinished(gen=gen, ok=True, detail="no --verify")
        self._cancel_checks()  # one that overran (the machine counted it as failed)
        report = -1
        try:
            request, report = self._check(self._verify, gen)
            try:
                self._checks.start(request, gen, report)
            finally:
                if request.output is not None:
                    os.close(request.output)
        except (SpawnError, OSError) as exc:
            if report >= 0:
                os.close(report)
            why = exc.message if isinstance(exc, SpawnError) else exc.strerror
            return ev.VerifyFinished(gen=gen, ok=False, detail=f"cannot run the check: {why}")
        return None

    def _check(self, spec: VerifySpec, gen: GenId) -> tuple[SpawnRequest, int]:
        """The spawn of one check, and (http:) the read end of its report pipe."""
        if spec.mode is ReadyMode.EXEC:
            env = {**self._environ, "HANDOFF_GENERATION": str(gen)}
            argv = ["sh", "-c", spec.command]
            request = SpawnRequest(
                executable="/bin/sh", argv=argv, env=env, fd_soft_limit=self._fd_limit,
                cwd=self._workdir,
            )  # fmt: skip
            return request, -1
        if self._target is None:
            raise SpawnError("no listening stream socket to send the check to")
        argv = http_probe.command(
            Pid(0), self._target, spec.path, DEFAULT_STATUSES, DEFAULT_TRY_TIMEOUT_S
        )
        read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        os.set_blocking(write_end, True)  # the check writes a line; it may wait for room
        request = SpawnRequest(
            executable=argv[0], argv=argv, env=self._environ, fd_soft_limit=self._fd_limit,
            output=write_end,
        )  # fmt: skip
        return request, read_end

    def on_exit(self, check_pid: Pid) -> ev.VerifyFinished | None:
        """A check's pidfd is readable: reap it; its exit status (or report) answers."""
        finished = self._checks.finish(check_pid)
        if finished is None:
            return None
        check, status = finished
        if check.cancelled:
            return None
        if check.report >= 0:
            answer = http_finished(Pid(0), check.report, status)
            return ev.VerifyFinished(gen=check.key, ok=answer.ok, detail=answer.detail)
        spec = self._verify
        command = spec.describe() if spec is not None else "the check"
        detail = f"{command} {status.describe()}"
        return ev.VerifyFinished(gen=check.key, ok=status.success, detail=detail)

    def _cancel_checks(self) -> None:
        self._checks.cancel(lambda _: True)

    def kill_all(self) -> None:
        """At shutdown: kill and reap every check still running."""
        self._checks.kill_all()
