"""The worker table: the live worker processes, by pid, with their pidfds.

Spawning builds what a worker gets (the command as it is on disk now, its argv with the
fd placeholders filled in, its environment, its directory: docs/protocol.md) and watches
its pidfd; an exit kills what is left of the worker's process group, reaps it and
forgets it. The warden hears of every worker group as it comes and goes. Each call
returns the event for the machine; the loop feeds it.

Each generation's ``--env-file`` values and release directory: generation_setup.py. Each
worker's stdout and stderr pipe, read before its exit is handled: worker_output.py.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping

from handoff.core import events as ev
from handoff.core.model import ExitStatus, GenId, Pid
from handoff.core.timers import TimerKey, TimerKind, Timers
from handoff.errors import SpawnError
from handoff.formats.identity import user_environment
from handoff.formats.options import RunConfig
from handoff.formats.worker_contract import (
    expand_placeholders,
    names_sockets_in_argv,
    worker_environment,
)
from handoff.master.generation_setup import GenerationSetup, Releases
from handoff.master.holdings import Holdings
from handoff.master.sources import Source, Sources, Watch
from handoff.master.system import System
from handoff.master.worker_output import WorkerOutput
from handoff.system.children import Child, SpawnRequest


class WorkerTable:
    """Live workers: spawn, exit, forget; see the module docstring."""

    def __init__(
        self,
        system: System,
        sources: Sources,
        config: RunConfig,
        holdings: Holdings,
        environ: Mapping[str, str],
        *,
        timers: Timers,
        machine: Releases,
    ) -> None:
        self._system = system
        self._timers = timers  # read only: a stopping worker's settle and drain deadlines
        self._lingering: dict[Pid, float] = {}  # stopped workers' groups -> drain deadline
        self._fd_limit = holdings.worker_fd_limit
        self._sources = sources
        self._config = config
        self._listeners = holdings.listeners
        self._environ = dict(environ)
        self._setup = GenerationSetup(system, config, holdings, machine)  # env, cwd
        self._children: dict[Pid, Child] = {}
        self._output = holdings.output or WorkerOutput(sources, None)  # their stdout, stderr

    def pids(self) -> list[Pid]:
        return list(self._children)

    def get(self, pid: Pid) -> Child | None:
        return self._children.get(pid)

    def spawn(self, gen: GenId, slot: int, notify_address: str) -> ev.Event:
        """Start one worker; WorkerSpawned, or SpawnFailed with the reason."""
        config = self._config
        pipe = None
        try:
            files = self._setup.environment(gen)
            directory = self._setup.directory(gen, self._children)
            argv = expand_placeholders(config.command, len(self._listeners))
            listen_fds = not names_sockets_in_argv(config.command)
            env = worker_environment(
                {**self._environ, **user_environment(config.identity)},  # HOME, USER, ...
                listener_names=[listener.name for listener in self._listeners],
                notify_socket=notify_address,
                generation=gen,
                slot=slot,
                listen_fds=listen_fds,
                files=files,
                workdir=directory,
            )
            pipe = self._output.open_pipe()  # None: --worker-output direct
            child = self._system.spawn(
                SpawnRequest(
                    # Looked up by the child, as it is on disk now (a reload picks up a
                    # new release): a stat on a hung mount must not freeze the master.
                    executable=config.command[0],
                    search_path=self._environ.get("PATH", os.defpath),
                    argv=argv,
                    env=env,
                    listen_fds=[listener.fileno() for listener in self._listeners],
                    set_listen_pid=listen_fds,
                    fd_soft_limit=self._fd_limit,
                    # Changed into by the child: a hung mount costs a worker, not the loop.
                    cwd=directory,
                    identity=config.identity,  # --user, --group
                    output=pipe.write if pipe else None,
                )
            )
        except SpawnError as exc:
            self._output.discard(pipe)
            return ev.SpawnFailed(gen=gen, slot=slot, reason=exc.message)
        try:
            self._sources.watch(child.pidfd, Watch(Source.WORKER, child.pid))
        except OSError as exc:  # epoll_ctl: ENOMEM, ENOSPC (fs.epoll.max_user_watches)
            # A worker the loop cannot see exit must not run: SIGCHLD reaps it as a stray.
            self._system.kill_group(child.pid)
            child.close()
            self._output.discard(pipe)
            reason = f"watching the worker: {exc.strerror} ({errno.errorcode.get(exc.errno or 0)})"
            return ev.SpawnFailed(gen=gen, slot=slot, reason=reason)
        self._children[child.pid] = child
        self._setup.spawned(gen, child)
        self._output.attach(pipe, child.pid, gen, slot)
        self._system.guard(child.pid, guarded=True)
        return ev.WorkerSpawned(gen=gen, slot=slot, pid=child.pid)

    def adopt(self, pid: Pid) -> None:
        """After a re-exec: watch a worker the kernel shows (the warden knows it already)."""
        child = Child(pid, os.pidfd_open(pid))
        self._children[pid] = child
        self._sources.watch(child.pidfd, Watch(Source.WORKER, pid))

    def children(self) -> list[Child]:
        return list(self._children.values())

    def on_exit(self, pid: Pid) -> ev.ChildExited | None:
        """The worker's pidfd is readable: clear its group, reap and forget it.

        A worker told to stop may leave processes in its group that still answer
        requests: a ``sh -c`` wrapper that SIGTERM ended, a cluster primary that exits
        first. They get the stop signal and the worker's drain deadline (``expire``),
        not an immediate SIGKILL.
        """
        self._output.drain(pid)  # its last words are read before its exit is handled
        child = self._children[pid]
        lingering = self._drain_deadline(pid)
        if lingering is not None:
            self._system.signal_group(pid, self._config.stop_signal)
        status = reap_watched(self._system, self._sources, child, spare_group=lingering is not None)
        if status is None:
            return None
        del self._children[pid]
        if lingering is None:
            self._system.guard(pid, guarded=False)
        else:
            self._lingering[pid] = lingering  # the warden keeps guarding the group
        return ev.ChildExited(pid=pid, status=status)

    def next_deadline(self) -> float | None:
        return min(self._lingering.values(), default=None)

    def expire(self, now: float) -> None:
        """Kill what is left of a stopped worker's group at its drain deadline."""
        for pgid, deadline in list(self._lingering.items()):
            if deadline <= now:
                self._end_group(pgid)

    def kill_all(self) -> None:
        """At shutdown: kill and reap every worker still here, and what lingers."""
        for pid, child in list(self._children.items()):
            sweep(self._system, self._sources, child)
            del self._children[pid]
            self._system.guard(pid, guarded=False)
        for pgid in list(self._lingering):
            self._end_group(pgid)
        self._output.close()

    def _drain_deadline(self, pid: Pid) -> float | None:
        """When a stopping worker's drain ends; None if the worker was not stopping."""
        drain = self._timers.deadline(TimerKey(TimerKind.DRAIN, pid))
        if drain is not None:
            return drain
        if self._timers.deadline(TimerKey(TimerKind.SETTLE, pid)) is not None:
            return self._system.clock() + self._config.timeouts.drain_s
        return None

    def _end_group(self, pgid: Pid) -> None:
        self._system.kill_group(pgid)
        self._system.guard(pgid, guarded=False)
        del self._lingering[pgid]


def reap_watched(
    system: System, sources: Sources, child: Child, *, spare_group: bool = False
) -> ExitStatus | None:
    """A watched child's pidfd is readable: kill what is left of its process group
    (unless spare_group), reap it, stop watching it. None if it has not exited after all.

    The leader is a zombie until waited for, so its pid (the group id) cannot be recycled
    yet: whatever is left in its group dies with it.
    """
    if not spare_group:
        system.kill_group(child.pid)
    status = system.reap(child)
    if status is not None:
        sources.unwatch(child.pidfd)
        child.close()
    return status


def sweep(system: System, sources: Sources, child: Child) -> None:
    """At shutdown: kill the child's whole tree, wait for it, stop watching it."""
    system.kill_tree(child.pid)
    system.reap(child, block=True)
    sources.unwatch(child.pidfd)
    child.close()
