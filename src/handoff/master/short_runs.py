"""Short processes the master starts and waits for on their pidfd: the readiness probes
(`exec:` commands, `http:` tries: probes.py) and the --verify checks (switching.py).

Each run is kept by its own pid with what it is for (a worker's pid, a generation) and,
for an HTTP try, the read end of its report pipe. Cancelling kills its tree and marks it,
so that its exit answers nothing; a cancelled run can outlive what it was for. Every run
is watched with ``source``; the loop hands its pid back to ``finish`` when the pidfd is
readable.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from handoff.core.model import ExitStatus, Pid
from handoff.master.sources import Source, Sources, Watch
from handoff.master.system import System
from handoff.master.workers import reap_watched, sweep
from handoff.system.children import Child, SpawnRequest

K = TypeVar("K")


@dataclass(slots=True)
class ShortRun(Generic[K]):
    """One run: what it is for, its process, its report pipe (-1: none)."""

    key: K
    pid: Pid
    report: int = -1
    cancelled: bool = False


class ShortRuns(Generic[K]):
    """The runs going on, by their own pid; see the module docstring."""

    def __init__(self, system: System, sources: Sources, source: Source) -> None:
        self._system = system
        self._sources = sources
        self._source = source
        self._running: dict[Pid, tuple[ShortRun[K], Child]] = {}

    def pids(self) -> list[Pid]:
        """The runs' own pids (children of the master too)."""
        return list(self._running)

    def start(self, request: SpawnRequest, key: K, report: int = -1) -> None:
        """Spawn the run (SpawnError as the system raises it) and watch its pidfd."""
        child = self._system.spawn(request)
        self._running[child.pid] = (ShortRun(key, child.pid, report), child)
        self._sources.watch(child.pidfd, Watch(self._source, child.pid))

    def finish(self, pid: Pid) -> tuple[ShortRun[K], ExitStatus] | None:
        """The run whose pidfd is readable, reaped, with its exit status; None if it is
        not one of ours or not gone yet. A cancelled one's report pipe is closed here."""
        entry = self._running.get(pid)
        if entry is None:
            return None
        run, child = entry
        status = reap_watched(self._system, self._sources, child)
        if status is None:
            return None
        del self._running[pid]
        if run.cancelled and run.report >= 0:
            os.close(run.report)
        return run, status

    def cancel(self, which: Callable[[K], bool]) -> None:
        """Kill the runs for which which(key) holds; their exits answer nothing."""
        for run, _ in self._running.values():
            if which(run.key) and not run.cancelled:
                run.cancelled = True
                self._system.kill_tree(run.pid)

    def kill_all(self) -> None:
        """At shutdown: kill and reap every run still going."""
        for run, child in self._running.values():
            sweep(self._system, self._sources, child)
            if run.report >= 0:
                os.close(run.report)
        self._running.clear()
