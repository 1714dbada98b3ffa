"""Looking at workers from outside: readiness probes, ``auto`` scans and detaching.

``exec:COMMAND`` probes are short child processes whose exit status is the answer;
``auto`` scans read /proc at once (system/accepting_scan.py); ``http:PATH`` scans until
the worker is seen accepting or serving, then runs HTTP tries, short processes that report
on a pipe (master/http_probes.py). Each call returns the event for the machine, if there
is one. (Taking a worker off the sockets, or putting it back: master/switching.py.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from handoff.core import events as ev
from handoff.core.model import GenId, Pid
from handoff.errors import SpawnError
from handoff.formats.identity import WorkerIdentity, user_environment
from handoff.formats.log_events import EventName, Level
from handoff.formats.options import ReadyMode, ReadySpec
from handoff.formats.worker_contract import clean_environment
from handoff.master.http_probes import HttpTries
from handoff.master.http_probes import finished as http_finished
from handoff.master.logs import emit
from handoff.master.short_runs import ShortRuns
from handoff.master.sources import Source, Sources
from handoff.master.system import System
from handoff.system.accepting_scan import ProcUnreadable, listen_addresses
from handoff.system.children import SpawnRequest
from handoff.system.serving_scan import MAX_NET_TABLE_BYTES
from handoff.system.sockets import Listener, listener_inodes

# At most one search per this many seconds of the kernel's socket lists for connections a
# worker tree accepted, shared by all starting workers: the fallback where its sockets
# cannot be looked at themselves (the kernel walks its whole TCP hash to answer: 5 to 10 ms
# on this machine under churn). Looking at the sockets themselves is not limited.
TABLES_INTERVAL_S = 0.05
# How long a worker whose tree /proc will not show is left unscanned: it is only tried
# again later (a uid change or a short-lived setuid helper passes), never given up on.
UNSEEABLE_FOR_S = 1.0

_UNAVAILABLE_HINT = (
    "--ready auto cannot see this worker (another user, hidepid, or a non-dumpable process: "
    "setuid, file capabilities, prctl PR_SET_DUMPABLE); READY=1 still counts for it, and "
    "auto still works for the others; or choose --ready notify, delay:SECONDS or exec:COMMAND "
    "(workers of another --user: a master that is not root needs CAP_SYS_PTRACE and "
    "CAP_DAC_READ_SEARCH)"
)
_SKIPPED_HINT = (
    "processes of the tree that /proc will not show (non-dumpable: setuid, file "
    "capabilities, prctl PR_SET_DUMPABLE; another user) are skipped; the rest is scanned"
)
_TRUNCATED_HINT = (
    "only the start of the table is searched for connections the worker accepted (one "
    "scan reads at most that much); a worker seen waiting for connections still counts"
)
_BLIND_HINT = (
    "/proc/PID/task/*/syscall and /proc/PID/mem need ptrace-attach access: "
    "kernel.yama.ptrace_scope 2 or 3, or an LSM (AppArmor, SELinux) refuses it, so servers "
    "waiting in accept, poll or select are not seen (epoll still is); lower ptrace_scope to "
    "1, allow ptrace in the LSM policy, or have the server send READY=1"
)


class Probes:
    """Running probes by their own pid, and the listening sockets' inodes for /proc.

    Keyed by the probe's pid, not the worker's: a cancelled probe can outlive its worker,
    whose pid may then name a new worker with a probe of its own.
    """

    def __init__(
        self,
        system: System,
        sources: Sources,
        ready: ReadySpec,
        listeners: Sequence[Listener],
        environ: Mapping[str, str],
        *,
        fd_limit: int | None = None,
    ) -> None:
        self._system = system
        self._fd_limit = fd_limit
        self._sources = sources
        self._ready = ready
        self._environ = dict(environ)
        # inode -> the master's fd: how /proc names our sockets in a worker's tables.
        self._listener_inodes = listener_inodes(listeners)
        # Their addresses: a connection accepted on one proves a worker serves (auto).
        self._addresses = listen_addresses(lst.sock for lst in listeners)
        self._tables_searched_at = -TABLES_INTERVAL_S
        self._unseeable: dict[Pid, float] = {}  # worker -> when to scan it again
        self._identity: WorkerIdentity | None = None
        self._warned: set[EventName | str] = set()
        self._runs: ShortRuns[Pid] = ShortRuns(system, sources, Source.PROBE)  # by worker
        self._http = HttpTries(ready, listeners, environ)

    def run_as(self, identity: WorkerIdentity | None) -> None:
        """exec: probes run as the workers do (--user, --group), with their HOME, USER, ..."""
        self._identity = identity

    def pids(self) -> list[Pid]:
        """The probe processes' own pids (they are the master's children too)."""
        return self._runs.pids()

    def run(self, worker: Pid, gen: GenId, slot: int) -> ev.ProbeFinished | None:
        """Start one probe of the worker: a scan answers at once, a command when it exits."""
        if self._ready.mode is ReadyMode.AUTO:
            return self._scan(worker)
        if self._ready.mode is ReadyMode.HTTP:
            return self._http_try(worker)
        env = clean_environment({**self._environ, **user_environment(self._identity)})
        env.update(
            HANDOFF_WORKER_PID=str(worker), HANDOFF_GENERATION=str(gen), HANDOFF_WORKER=str(slot)
        )
        try:
            self._runs.start(
                SpawnRequest(
                    executable="/bin/sh",
                    argv=["sh", "-c", self._ready.command],
                    env=env,
                    fd_soft_limit=self._fd_limit,
                    identity=self._identity,  # switched to before the chdir below
                    # The worker's own directory (its release, even if `current` was
                    # flipped again since), entered by the probe: the master looks nowhere.
                    cwd=f"/proc/{worker}/cwd",
                ),
                worker,
            )
        except SpawnError as exc:
            return ev.ProbeFinished(pid=worker, ok=False, detail=exc.message)
        return None

    def _http_try(self, worker: Pid) -> ev.ProbeFinished | None:
        """--ready http:PATH: the auto scan until /proc shows the worker accepting or
        serving, then one HTTP try (a process; it answers when it exits)."""
        if not self._http.seen_serving(worker):
            found = self._scan(worker)
            if not found.ok:
                return found
            self._http.note_serving(worker)
        try:
            request, report = self._http.request(worker, self._fd_limit)
        except OSError as exc:
            return ev.ProbeFinished(pid=worker, ok=False, detail=f"pipe2: {exc.strerror}")
        except SpawnError as exc:
            return ev.ProbeFinished(pid=worker, ok=False, detail=exc.message)
        try:
            self._runs.start(request, worker, report)
        except SpawnError as exc:
            os.close(report)
            return ev.ProbeFinished(pid=worker, ok=False, detail=exc.message)
        finally:
            if request.output is not None:
                os.close(request.output)
        return None

    def _scan(self, worker: Pid) -> ev.ProbeFinished:
        """--ready auto: is a process of the worker's tree waiting on a handed socket?"""
        now = self._system.clock()
        self._unseeable = {pid: until for pid, until in self._unseeable.items() if until > now}
        if worker in self._unseeable:
            return ev.ProbeFinished(pid=worker, ok=False, detail="/proc cannot be read")
        try:
            tables = now >= self._tables_searched_at + TABLES_INTERVAL_S
            if tables:
                self._tables_searched_at = now
            found = self._system.scan(worker, self._listener_inodes, self._addresses, tables=tables)
        except ProcUnreadable as exc:
            self._unseeable[worker] = now + UNSEEABLE_FOR_S
            self._warn_once(EventName.READINESS_UNAVAILABLE, worker, str(exc), _UNAVAILABLE_HINT)
            return ev.ProbeFinished(pid=worker, ok=False, detail=str(exc))
        if found.unreadable:
            pids = ", ".join(map(str, found.unreadable))
            reason = f"skipped processes whose /proc cannot be read: {pids}"
            self._warn_once("skipped", worker, reason, _SKIPPED_HINT)
        if found.blind:
            pids = ", ".join(map(str, found.blind))
            reason = f"reading /proc/PID/task/*/syscall or mem was refused for {pids}"
            self._warn_once("blind", worker, reason, _BLIND_HINT)
        if found.truncated:
            cut = "/".join(found.truncated)
            reason = f"/proc/net/{cut} longer than {MAX_NET_TABLE_BYTES} bytes"
            self._warn_once("truncated", worker, reason, _TRUNCATED_HINT)
        return ev.ProbeFinished(pid=worker, ok=found.ready, detail=found.describe())

    def _warn_once(self, cause: EventName | str, worker: Pid, reason: str, hint: str) -> None:
        """Each cause is logged once per master: it is the host's setup, not the worker's."""
        if cause in self._warned:
            return
        self._warned.add(cause)
        name = cause if isinstance(cause, EventName) else EventName.READINESS_LIMITED
        emit(name, Level.WARNING, pid=worker, reason=reason, hint=hint)

    def cancel(self, worker: Pid) -> None:
        self._http.forget(worker)
        self._runs.cancel(lambda key: key == worker)

    def on_exit(self, probe_pid: Pid) -> ev.ProbeFinished | None:
        """A probe's pidfd is readable: reap it; its exit status answers (unless cancelled).

        probe_pid is the probe's own pid (its watch's). An unknown one is ignored.
        """
        finished = self._runs.finish(probe_pid)
        if finished is None:
            return None
        probe, status = finished
        if probe.cancelled:
            return None
        if probe.report >= 0:
            return http_finished(probe.key, probe.report, status)
        return ev.ProbeFinished(pid=probe.key, ok=status.success, detail=status.describe())

    def kill_all(self) -> None:
        """At shutdown: kill and reap every probe still running."""
        self._runs.kill_all()
