"""Keep-alive rescue, the kernel's side: copy an old worker's connections, read their
counters, see when the worker lets go of one.

Before an old worker's stop signal, the master copies (``pidfd_getfd``) every TCP
connection its tree accepted on a handed listener. A copy is one more reference to the
socket's file, so when the worker's ``close()`` drops its own, no FIN is sent: the
connection stays open, in the master's hands. Until the worker has let go, the master
only asks (``getsockopt``, ``ioctl``): the file's flags (O_NONBLOCK) are shared with the
worker, and changing them would change the worker's socket.

The kernel says nothing when another process closes an fd, so whether the worker still
holds a connection is looked up (its fd number still in ``/proc/PID/fd``) by the caller,
a bounded number of times in a short window after the stop signal.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import socket
import termios
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from handoff.core.model import Pid
from handoff.formats.rescue_rules import TCP_INFO_SIZE, TcpCounters, parse_tcp_info
from handoff.system.accepting_scan import process_fds
from handoff.system.capabilities import pidfd_getfd, pidfd_getfd_refusal
from handoff.system.process_tree import open_listed, tree
from handoff.system.serving_scan import ListenAddresses, accepted_connection
from handoff.system.users import effective_capabilities

_SIOCINQ: Final = termios.FIONREAD
_SIOCOUTQ: Final = 0x5411  # TIOCOUTQ, which sockets answer with their send queue
_YAMA: Final = Path("/proc/sys/kernel/yama/ptrace_scope")
CAP_SYS_PTRACE: Final = 19


@dataclass(frozen=True, slots=True)
class Holder:
    """A process of the worker's tree and its fd number for the connection."""

    pid: Pid
    fd: int


@dataclass(slots=True)
class Copy:
    """The master's copy of one connection, and the counters at the copy."""

    sock: socket.socket
    inode: int
    holders: tuple[Holder, ...]
    before: TcpCounters


@dataclass(frozen=True, slots=True)
class Copied:
    """What copying a worker's connections found."""

    copies: list[Copy]
    left: int  # connections not copied: over the limit, or the master out of fds
    refused: str = ""  # why some process's fds could not be copied at all (EPERM, ...)


def unavailable() -> str | None:
    """Why this master cannot copy its workers' fds (a one-line reason), or None."""
    refusal = pidfd_getfd_refusal()
    if refusal is not None:
        return f"pidfd_getfd is refused: {refusal}"
    try:
        scope = int(_YAMA.read_text().strip())
    except (OSError, ValueError):
        return None  # no Yama: the usual ptrace rules (a parent may)
    if scope >= 3:
        return "ptrace is disabled (kernel.yama.ptrace_scope = 3)"
    if scope == 2 and CAP_SYS_PTRACE not in effective_capabilities():
        return "kernel.yama.ptrace_scope = 2 needs CAP_SYS_PTRACE, which this master lacks"
    return None


def copy_connections(
    root: Pid, addresses: ListenAddresses, listener_inodes: Collection[int], limit: int
) -> Copied:
    """Copies of the TCP connections root's tree accepted on a listener, at most limit."""
    by_inode: dict[int, Copy] = {}
    left = 0
    refused = ""
    for member in tree(root):
        try:
            sockets = process_fds(member.pid).sockets
            pidfd = open_listed(member, ())
        except OSError:
            continue  # exited meanwhile, or /proc unreadable: nothing of it is copied
        if pidfd is None:
            continue
        try:
            for fd, inode in sockets.items():
                if inode in listener_inodes:
                    continue
                known = by_inode.get(inode)
                if known is not None:  # the same connection in another process (a fork)
                    known.holders = (*known.holders, Holder(member.pid, fd))
                    continue
                if len(by_inode) >= limit:
                    left += 1
                    continue
                try:
                    copy = pidfd_getfd(pidfd, fd)
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE):
                        left += 1
                    elif exc.errno not in (errno.EBADF, errno.ESRCH):
                        refused = refused or os.strerror(exc.errno or errno.EPERM)
                        break
                    continue
                found = _connection(copy, inode, addresses)
                if found is not None:
                    by_inode[inode] = Copy(found[0], inode, (Holder(member.pid, fd),), found[1])
        finally:
            os.close(pidfd)
    return Copied(list(by_inode.values()), left, refused)


def _connection(
    fd: int, inode: int, addresses: ListenAddresses
) -> tuple[socket.socket, TcpCounters] | None:
    found = accepted_connection(fd, inode, addresses)
    if found is None:
        return None
    sock = found[0]
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        sock.close()  # unix sockets have no TCP counters to prove anything with
        return None
    counters = read_counters(sock)
    if counters is None:
        sock.close()
        return None
    return sock, counters


def read_counters(sock: socket.socket) -> TcpCounters | None:
    """The connection's counters now; None if the kernel does not say (or it is gone)."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
        queue = array.array("i", [0])
        fcntl.ioctl(sock.fileno(), _SIOCINQ, queue)
        inq = queue[0]
        fcntl.ioctl(sock.fileno(), _SIOCOUTQ, queue)
        return parse_tcp_info(raw, inq, queue[0])
    except (OSError, ValueError):
        return None


class FdListings:
    """One look at the holders' fd tables: each process's /proc/PID/fd listed once, however
    many of its connections are asked about (one directory read, not a stat per socket)."""

    def __init__(self) -> None:
        self._listed: dict[Pid, frozenset[int]] = {}

    def still_held(self, copy: Copy) -> bool:
        """Does a process of the worker's tree still hold the connection? An fd number the
        worker reused for another file counts as held: the rescue waits, then lets go."""
        return any(holder.fd in self._fds(holder.pid) for holder in copy.holders)

    def _fds(self, pid: Pid) -> frozenset[int]:
        listed = self._listed.get(pid)
        if listed is None:
            try:
                names = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                names = []  # exited (or a zombie's empty table): it holds nothing
            listed = self._listed[pid] = frozenset(int(name) for name in names)
        return listed
