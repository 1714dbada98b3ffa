"""Looking at workers from outside: readiness probes, ``auto`` scans and detaching.

``exec:COMMAND`` probes are short child processes whose exit status is the answer;
``auto`` scans read /proc at once (system/accepting_scan.py). Detaching takes an old
worker off the listening sockets before its stop signal (system/detach.py) and logs which
path it took. Each call returns the event for the machine, if there is one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from handoff.core import events as ev
from handoff.core.machine import Supervisor
from handoff.core.model import GenId, Pid
from handoff.errors import SpawnError
from handoff.formats.log_events import EventName, Level
from handoff.formats.options import ReadyMode, ReadySpec
from handoff.formats.worker_contract import clean_environment
from handoff.master.logs import emit
from handoff.master.sources import Source, Sources, Watch
from handoff.master.system import System
from handoff.master.workers import reap_watched, sweep
from handoff.system.accepting_scan import ProcUnreadable
from handoff.system.children import Child, SpawnRequest
from handoff.system.sockets import Listener


@dataclass(slots=True)
class Probe:
    child: Child
    cancelled: bool = False


class Probes:
    """Running probes by worker pid, and the listening sockets' inodes for /proc."""

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
        self._listener_inodes = {os.fstat(lst.fileno()).st_ino: lst.fileno() for lst in listeners}
        self._proc_unreadable = False
        self._running: dict[Pid, Probe] = {}

    def pids(self) -> list[Pid]:
        """The probe processes' own pids (they are the master's children too)."""
        return [probe.child.pid for probe in self._running.values()]

    def run(self, worker: Pid, gen: GenId, slot: int) -> ev.ProbeFinished | None:
        """Start one probe of the worker: a scan answers at once, a command when it exits."""
        if self._ready.mode is ReadyMode.AUTO:
            return self._scan(worker)
        env = clean_environment(self._environ)
        env.update(
            HANDOFF_WORKER_PID=str(worker), HANDOFF_GENERATION=str(gen), HANDOFF_WORKER=str(slot)
        )
        try:
            child = self._system.spawn(
                SpawnRequest(
                    executable="/bin/sh",
                    argv=["sh", "-c", self._ready.command],
                    env=env,
                    fd_soft_limit=self._fd_limit,
                )
            )
        except SpawnError as exc:
            return ev.ProbeFinished(pid=worker, ok=False, detail=exc.message)
        self._running[worker] = Probe(child)
        self._sources.watch(child.pidfd, Watch(Source.PROBE, worker))
        return None

    def _scan(self, worker: Pid) -> ev.ProbeFinished:
        """--ready auto: is a process of the worker's tree waiting on a handed socket?"""
        if self._proc_unreadable:
            return ev.ProbeFinished(pid=worker, ok=False)
        try:
            found = self._system.scan(worker, self._listener_inodes)
        except ProcUnreadable as exc:
            self._proc_unreadable = True
            emit(
                EventName.READINESS_UNAVAILABLE,
                Level.WARNING,
                reason=str(exc),
                hint="--ready auto cannot see the workers; READY=1 still counts, "
                "or choose --ready notify, delay:SECONDS or exec:COMMAND",
            )
            return ev.ProbeFinished(pid=worker, ok=False)
        return ev.ProbeFinished(pid=worker, ok=found.accepting > 0, detail=found.describe())

    def cancel(self, worker: Pid) -> None:
        probe = self._running.get(worker)
        if probe is not None and not probe.cancelled:
            probe.cancelled = True
            self._system.kill_tree(probe.child.pid)

    def on_exit(self, worker: Pid) -> ev.ProbeFinished | None:
        """A probe's pidfd is readable: reap it; its exit status answers (unless cancelled)."""
        probe = self._running[worker]
        status = reap_watched(self._system, self._sources, probe.child)
        if status is None:
            return None
        del self._running[worker]
        if probe.cancelled:
            return None
        return ev.ProbeFinished(pid=worker, ok=status.success, detail=status.describe())

    def kill_all(self) -> None:
        """At shutdown: kill and reap every probe still running."""
        for probe in self._running.values():
            sweep(self._system, self._sources, probe.child)
        self._running.clear()

    def detach(self, pid: Pid, machine: Supervisor) -> None:
        """Stop an old worker accepting before its stop signal; log which path was taken."""
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
        emit(EventName.WORKER_DETACHED, **fields)
