"""Stop an old worker accepting, from outside, before it gets the stop signal.

Most servers stop accepting only once they begin to shut down,
and a connection accepted in that instant can be dropped unread. So the master removes
the worker's interest in the listening socket itself: ``pidfd_getfd`` (Linux 5.6) gives
the master a copy of the worker's epoll fd; an epoll registration is keyed by (open file,
fd number), so with its own copy of the listening socket placed on the fd number the
worker used, ``EPOLL_CTL_DEL`` removes exactly the worker's registration. From then on
the kernel wakes only the other generation for new connections, while the old worker
keeps serving the connections it holds.

Where it cannot be done (no pidfd_getfd, a server blocked in accept or select instead of
epoll, no permission), nothing is changed and the stop signal alone does the job; the
caller logs which path was taken, and which processes were taken off and which not.

A server that reacts to a failed EPOLL_CTL_MOD (ENOENT) by adding the socket again (Java
NIO does) undoes this; only its stop signal stops it accepting (docs/protocol.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from handoff.core.model import Pid
from handoff.formats.procfs import EpollTarget, placement_rounds
from handoff.system import signals
from handoff.system.accepting_scan import epoll_registrations, process_fds
from handoff.system.capabilities import pidfd_getfd
from handoff.system.process_tree import Member, open_listed, reapers_of, tree


@dataclass(frozen=True, slots=True)
class ProcessResult:
    """What detaching did in one process of the tree that registers a listening socket."""

    pid: Pid
    removed: int
    error: str = ""  # why (some of) its registrations stay


@dataclass(frozen=True, slots=True)
class Detachment:
    processes: int
    registrations: int
    reason: str = ""  # why nothing was removed, or what failed where
    results: tuple[ProcessResult, ...] = ()

    @property
    def path(self) -> str:
        return "epoll" if self.registrations else "signal-only"

    @property
    def detached(self) -> list[Pid]:
        """The processes taken off the sockets."""
        return [r.pid for r in self.results if r.removed]

    @property
    def failed(self) -> list[ProcessResult]:
        """The processes that still have a registration, with the reason."""
        return [r for r in self.results if r.error]


def detach(root: Pid, listeners: Mapping[int, int]) -> Detachment:
    """Remove every epoll registration of the listening sockets in root's tree.

    listeners maps a socket inode to the master's fd of that socket. Each process is
    reported on its own: one refusal (a non-dumpable or setuid process) does not hide
    what was removed elsewhere.
    """
    members = tree(root)
    reapers = reapers_of(members)
    results = [r for m in members if (r := _detach_process(m, listeners, reapers)) is not None]
    removed = sum(r.removed for r in results)
    reason = "; ".join(f"pid {r.pid}: {r.error}" for r in results if r.error)
    if not removed and not reason:
        reason = "no epoll registration of the listening socket (blocking accept, select or poll)"
    return Detachment(
        processes=len(members), registrations=removed, reason=reason, results=tuple(results)
    )


def _detach_process(
    member: Member, listeners: Mapping[int, int], reapers: Collection[int]
) -> ProcessResult | None:
    """Take one process off the sockets; None if it has no registration (or is gone)."""
    pid = member.pid
    try:
        registrations = list(epoll_registrations(pid, process_fds(pid), listeners))
    except (FileNotFoundError, ProcessLookupError):
        return None
    except PermissionError:
        return ProcessResult(pid, 0, "cannot read its /proc entries (permission denied)")
    if not registrations:
        return None
    try:
        # After the check the pidfd, not the pid, names the process: a pid reused from now
        # on cannot be reached. What was read above was this process's: it was already
        # running when the tree was listed and still is.
        pidfd = open_listed(member, reapers)
    except OSError as exc:
        return ProcessResult(pid, 0, f"pidfd_open: {_strerror(exc)}")
    if pidfd is None:
        return None  # exited, or its pid names another process now
    removed = 0
    try:
        for epfd, targets in registrations:
            for batch in placement_rounds(targets):
                removed += _remove(pidfd, epfd, batch, listeners)
    except ProcessLookupError:
        pass  # it exited meanwhile: nothing left to take off
    except OSError as exc:
        return ProcessResult(pid, removed, f"taking it off the socket: {_strerror(exc)}")
    finally:
        os.close(pidfd)
    return ProcessResult(pid, removed) if removed else None


def _strerror(exc: OSError) -> str:
    return os.strerror(exc.errno or errno.EIO)


def _remove(pidfd: int, epfd: int, targets: list[EpollTarget], listeners: Mapping[int, int]) -> int:
    """One round: the targets' fd numbers are all different."""
    # Signals are blocked so that no handler runs (or writes its wakeup byte) while one
    # of the master's fd numbers temporarily names a listening socket.
    with signals.blocked(), _placed(targets, listeners):
        epoll = select.epoll.fromfd(pidfd_getfd(pidfd, epfd))
        try:
            removed = 0
            for target in targets:
                with contextlib.suppress(FileNotFoundError):  # ENOENT: already gone
                    epoll.unregister(target.fd)
                    removed += 1
            return removed
        finally:
            epoll.close()


@contextlib.contextmanager
def _placed(targets: list[EpollTarget], listeners: Mapping[int, int]):  # type: ignore[no-untyped-def]
    """Put a copy of each target's listening socket on the target's fd number, then restore.

    Whatever the master has on a target number is saved first, then the sources are
    copied to scratch fds, and only then is anything swapped: if the kernel refuses an fd
    (EMFILE) on the way, nothing of the master's has been touched. Only EBADF means a
    number is free in the master; any other error aborts the placement (the caller falls
    back to the stop signal alone).
    """
    # Scratch copies go above every target number, so no swap lands on one of them (and
    # not at a fixed high number: F_DUPFD fails above the soft RLIMIT_NOFILE).
    base = max(t.fd for t in targets) + 1
    numbers = sorted({t.fd for t in targets})
    saved: dict[int, tuple[int, bool]] = {}
    sources: dict[int, int] = {}
    placed: list[int] = []
    try:
        for number in numbers:
            try:
                saved[number] = (
                    fcntl.fcntl(number, fcntl.F_DUPFD_CLOEXEC, base),
                    os.get_inheritable(number),
                )
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    raise
        for target in targets:
            if target.fd not in sources:
                sources[target.fd] = fcntl.fcntl(
                    listeners[target.inode], fcntl.F_DUPFD_CLOEXEC, base
                )
        for number in numbers:
            os.dup2(sources[number], number, inheritable=False)
            placed.append(number)
        yield
    finally:
        for number in placed:
            if number in saved:
                copy, inheritable = saved[number]
                os.dup2(copy, number, inheritable=inheritable)
            else:
                os.close(number)
        for copy, _ in saved.values():
            os.close(copy)
        for source in sources.values():
            os.close(source)
