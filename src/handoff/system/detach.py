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

Each removed registration is recorded with the event mask and data it had (fdinfo shows
both), which makes the step reversible: ``reattach`` adds it back with ``EPOLL_CTL_ADD``,
same key, same mask, same data (a pointer, for Go's netpoll), and the worker accepts
again as if nothing had happened.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import platform
import select
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

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
    error: str = ""  # why (some of) its registrations stay
    # What was removed, as (epoll fd in the process, registration): what reattach needs.
    registrations: tuple[tuple[int, EpollTarget], ...] = ()

    @property
    def removed(self) -> int:
        return len(self.registrations)


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
    def removed(self) -> list[Registration]:
        """Every registration taken out, with its process: what ``reattach`` puts back."""
        return [
            Registration(r.pid, epfd, target)
            for r in self.results
            for epfd, target in r.registrations
        ]

    @property
    def failed(self) -> list[ProcessResult]:
        """The processes that still have a registration, with the reason."""
        return [r for r in self.results if r.error]


@dataclass(frozen=True, slots=True)
class Registration:
    """One epoll registration of a listening socket in a worker's process."""

    pid: Pid
    epfd: int  # the epoll fd's number in that process
    target: EpollTarget


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
        return ProcessResult(pid, "cannot read its /proc entries (permission denied)")
    if not registrations:
        return None
    try:
        # After the check the pidfd, not the pid, names the process: a pid reused from now
        # on cannot be reached. What was read above was this process's: it was already
        # running when the tree was listed and still is.
        pidfd = open_listed(member, reapers)
    except OSError as exc:
        return ProcessResult(pid, f"pidfd_open: {_strerror(exc)}")
    if pidfd is None:
        return None  # exited, or its pid names another process now
    pidfd = _clear_of(pidfd, [t for _, targets in registrations for t in targets])
    taken: list[tuple[int, EpollTarget]] = []
    try:
        for epfd, targets in registrations:
            for batch in placement_rounds(targets):
                taken += ((epfd, target) for target in _remove(pidfd, epfd, batch, listeners))
    except ProcessLookupError:
        pass  # it exited meanwhile: nothing left to take off
    except OSError as exc:
        error = f"taking it off the socket: {_strerror(exc)}"
        return ProcessResult(pid, error, tuple(taken))
    finally:
        os.close(pidfd)
    return ProcessResult(pid, registrations=tuple(taken)) if taken else None


def _clear_of(fd: int, targets: Collection[EpollTarget]) -> int:
    """fd, moved above the targets' numbers if it is one of them: placing a socket there
    (``_placed``) would hide it while it is needed."""
    numbers = {t.fd for t in targets}
    if fd not in numbers:
        return fd
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, max(numbers) + 1)
    finally:
        os.close(fd)


def _strerror(exc: OSError) -> str:
    return os.strerror(exc.errno or errno.EIO)


def _remove(
    pidfd: int, epfd: int, targets: list[EpollTarget], listeners: Mapping[int, int]
) -> list[EpollTarget]:
    """One round (the targets' fd numbers are all different); the targets removed."""
    # Signals are blocked so that no handler runs (or writes its wakeup byte) while one
    # of the master's fd numbers temporarily names a listening socket.
    with signals.blocked(), _placed(targets, listeners):
        epoll = select.epoll.fromfd(pidfd_getfd(pidfd, epfd))
        try:
            removed = []
            for target in targets:
                with contextlib.suppress(FileNotFoundError):  # ENOENT: already gone
                    epoll.unregister(target.fd)
                    removed.append(target)
            return removed
        finally:
            epoll.close()


def reattach(registrations: Iterable[Registration], listeners: Mapping[int, int]) -> int:
    """Put back registrations ``detach`` removed; how many are in place afterwards.

    The caller vouches that each pid is still the worker's process (the master has not
    reaped it, so the pid cannot have been reused). One already back (EEXIST) counts as in
    place; a process gone, or one that refuses, is skipped: its worker stays detached.
    """
    by_process: dict[tuple[Pid, int], list[EpollTarget]] = {}
    for registration in registrations:
        by_process.setdefault((registration.pid, registration.epfd), []).append(registration.target)
    restored = 0
    for (pid, epfd), targets in by_process.items():
        try:
            pidfd = _clear_of(os.pidfd_open(pid), targets)
        except OSError:
            continue  # gone
        try:
            for batch in placement_rounds(targets):
                restored += _add(pidfd, epfd, batch, listeners)
        except OSError:
            pass  # exited meanwhile, or refused: what was added stays
        finally:
            os.close(pidfd)
    return restored


def _add(pidfd: int, epfd: int, targets: list[EpollTarget], listeners: Mapping[int, int]) -> int:
    with signals.blocked(), _placed(targets, listeners):
        copy = pidfd_getfd(pidfd, epfd)
        try:
            added = 0
            for target in targets:
                event = _EpollEvent(target.events, target.data)
                if _epoll_ctl(copy, _EPOLL_CTL_ADD, target.fd, ctypes.byref(event)) == 0:
                    added += 1
                elif ctypes.get_errno() == errno.EEXIST:
                    added += 1  # put back already
                else:
                    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            return added
        finally:
            os.close(copy)


# epoll_ctl with the data the registration had: Python's select.epoll only sets data to
# the fd number, and a server may use anything there (Go: a pointer).
_EPOLL_CTL_ADD: Final = 1
_libc = ctypes.CDLL(None, use_errno=True)
_epoll_ctl = _libc.epoll_ctl
_epoll_ctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
_epoll_ctl.restype = ctypes.c_int


class _EpollEvent(ctypes.Structure):
    # struct epoll_event is packed on x86_64 (__EPOLL_PACKED), naturally aligned elsewhere.
    _pack_ = 1 if platform.machine() == "x86_64" else 0
    _fields_ = [("events", ctypes.c_uint32), ("data", ctypes.c_uint64)]


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
