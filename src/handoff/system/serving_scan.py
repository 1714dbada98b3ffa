"""Is a worker's tree serving a connection it accepted on a handed listening socket?

The second proof of ``--ready auto`` (system/accepting_scan.py has the first, a process
waiting on the socket). A busy server is rarely caught waiting (gunicorn's sync workers
under load spend their time answering), but while it answers it holds the connection it
accepted, and that proves more: it accepted, and it serves.

How a held socket is recognised, for the sockets (other than the listeners) that the
scan found in a process's /proc/PID/fd:

1. Through the socket itself: a copy of the process's fd (``pidfd_getfd``, the call the
   detach step uses; the master may, as the tree's ancestor) is asked for its type, its
   local address and its peer. A connected stream socket, not listening, whose local end
   is a listener's address (a wildcard listener: its port on any address) was accepted
   on that listener; a unix socket accepted on a listener carries the listener's path.
   The copy is closed at once. Race-free: the copy keeps the socket alive while it is
   asked, even if the worker closes its fd meanwhile. (A worker that closes its fd in
   those microseconds has its FIN sent when the copy is closed, microseconds later.)
2. Where that is refused (a seccomp filter, a non-dumpable process): the kernel's socket
   diagnostics for TCP (system/socket_diag.py: the connections on the listeners' ports,
   filtered in the kernel) and /proc/self/net/unix for unix sockets, matched by inode.
   Racy for short requests: a connection closed between the fd listing and the lookup
   is missed, and the next scan tries again.

Both look in the master's network namespace, which is the listening sockets' one: an
accepted socket lives in its listener's namespace, even in a worker that unshared its
own. Bounded: at most MAX_HELD_SOCKETS sockets per scan are looked at (one accepted
connection is proof enough), and at most MAX_NET_TABLE_BYTES of /proc/net/unix is read.
Nothing here grows with the host's processes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from handoff.core.model import Pid
from handoff.formats.procfs import TcpEndpoint, TcpSocket, accepted_on, listener_of, unix_accepted
from handoff.system import socket_diag
from handoff.system.capabilities import pidfd_getfd
from handoff.system.process_tree import Member, open_listed

MAX_HELD_SOCKETS: Final = 64  # of a tree's sockets looked at per scan
MAX_NET_TABLE_BYTES: Final = 2 * 1024 * 1024  # of /proc/self/net/unix one scan reads


@dataclass(frozen=True, slots=True)
class ListenAddresses:
    """Where the handed sockets listen: the local end of every connection accepted on them."""

    tcp4: tuple[TcpEndpoint, ...] = ()
    tcp6: tuple[TcpEndpoint, ...] = ()  # IPv4-mapped connections of a dual-stack one too
    unix: tuple[str, ...] = ()  # paths, '@name' for an abstract name, as /proc/net/unix


def listen_addresses(sockets: Iterable[socket.socket]) -> ListenAddresses:
    """The addresses of the listening sockets (others, e.g. datagram ones, are left out)."""
    tcp4: list[TcpEndpoint] = []
    tcp6: list[TcpEndpoint] = []
    unix: list[str] = []
    for sock in sockets:
        with contextlib.suppress(OSError):
            if sock.type != socket.SOCK_STREAM:
                continue
            name = sock.getsockname()
            if sock.family == socket.AF_INET:
                tcp4.append(TcpEndpoint(str(name[0]), int(name[1])))
            elif sock.family == socket.AF_INET6:
                tcp6.append(TcpEndpoint(str(name[0]), int(name[1])))
            elif sock.family == socket.AF_UNIX and name:
                unix.append(unix_name(name))
    return ListenAddresses(tuple(tcp4), tuple(tcp6), tuple(unix))


def unix_name(name: str | bytes) -> str:
    """A unix socket address as /proc/net/unix shows it: abstract names start with '@'."""
    if isinstance(name, bytes):  # abstract: a NUL first; /proc shows each NUL as '@'
        return os.fsdecode(name.replace(b"\0", b"@"))
    return name


@dataclass(frozen=True, slots=True)
class Held:
    """A process of the tree and the sockets it holds besides the listeners (fd -> inode)."""

    member: Member
    sockets: Mapping[int, int]


class SocketViews(Protocol):
    """What the check asks the kernel; tests replace it (system/accepting_scan.py ProcFiles)."""

    def accepted_through_fds(
        self, held: Held, addresses: ListenAddresses
    ) -> tuple[str | None, bool]: ...

    def tcp_connections(self, listening: Collection[TcpEndpoint], family: int) -> list[TcpSocket]:
        """Raises socket_diag.DiagUnavailable."""
        ...

    def read_net(self, table: str, limit: int) -> tuple[str, bool]: ...


def serving(
    held: Iterable[Held],
    addresses: ListenAddresses,
    views: SocketViews,
    truncated: list[str],
    *,
    tables: bool = True,
) -> dict[Pid, str]:
    """The processes holding a connection accepted on a listening socket, and on which
    listening address (for unix, 'unix:PATH'). tables: may the kernel's socket lists be
    searched where the sockets cannot be looked at themselves (the costly fallback).
    truncated collects the /proc/net tables longer than MAX_NET_TABLE_BYTES (only their
    start was searched)."""
    found: dict[Pid, str] = {}
    unseen: list[Held] = []
    budget = MAX_HELD_SOCKETS
    for listed in held:
        if budget <= 0:
            break
        process = Held(listed.member, dict(list(listed.sockets.items())[:budget]))
        budget -= len(process.sockets)
        on, seen = views.accepted_through_fds(process, addresses)
        if on is not None:
            found[process.member.pid] = on
        elif not seen:
            unseen.append(process)
    if unseen and not found and tables:
        found = _from_tables(unseen, addresses, views, truncated)
    return found


def _from_tables(
    held: list[Held], addresses: ListenAddresses, views: SocketViews, truncated: list[str]
) -> dict[Pid, str]:
    """The fallback: look the held inodes up in the kernel's socket lists."""
    inodes = {inode for process in held for inode in process.sockets.values()}
    accepted: dict[int, str] = {}  # inode -> the listening address
    for family, listening in ((socket.AF_INET, addresses.tcp4), (socket.AF_INET6, addresses.tcp6)):
        if not listening:
            continue
        try:
            connections = views.tcp_connections(listening, family)
        except socket_diag.DiagUnavailable:
            continue  # then only a process seen waiting, or READY=1, proves the worker
        for sock in connections:
            on = accepted_on(sock, listening) if sock.inode in inodes else None
            if on is not None:
                accepted[sock.inode] = str(on)
    if addresses.unix:
        text, cut = views.read_net("unix", MAX_NET_TABLE_BYTES)
        if cut:
            truncated.append("unix")
        for inode, path in unix_accepted(text, addresses.unix, inodes).items():
            accepted[inode] = f"unix:{path}"
    found: dict[Pid, str] = {}
    for process in held:
        for inode in process.sockets.values():
            if inode in accepted:
                found[process.member.pid] = accepted[inode]
                break
    return found


def accepted_through_fds(held: Held, addresses: ListenAddresses) -> tuple[str | None, bool]:
    """(the listening address one of the process's sockets was accepted on, or None;
    whether its sockets could be looked at through pidfd_getfd at all)."""
    try:
        pidfd = open_listed(held.member, ())
    except OSError:
        return None, False
    if pidfd is None:
        return None, True  # it exited: nothing to look at, and nothing to fall back to
    try:
        for fd, inode in held.sockets.items():
            try:
                copy = pidfd_getfd(pidfd, fd)
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.ESRCH):
                    continue  # closed (or exited) since the listing
                return None, False  # EPERM (seccomp, non-dumpable), ENOSYS, EMFILE
            on = _accepted_on(copy, inode, addresses)
            if on is not None:
                return on, True
    finally:
        os.close(pidfd)
    return None, True


def _accepted_on(fd: int, inode: int, addresses: ListenAddresses) -> str | None:
    """If the socket (our copy fd, closed here) is a connection accepted on a listener:
    which listener."""
    found = accepted_connection(fd, inode, addresses)
    if found is None:
        return None
    found[0].close()
    return found[1]


def accepted_connection(
    fd: int, inode: int, addresses: ListenAddresses
) -> tuple[socket.socket, str] | None:
    """If the socket (a copy fd, taken over here) is a connection accepted on a listener:
    the socket object over it and which listener; else None, and fd is closed. Only
    asked of the kernel: the file's flags, shared with the process it came from, stay."""
    try:
        if os.fstat(fd).st_ino != inode:
            os.close(fd)
            return None  # the fd number was reused for another file since the listing
        sock = socket.socket(fileno=fd)  # family and type asked of the kernel
    except OSError:
        os.close(fd)
        return None
    on = _listener_of_connection(sock, addresses)
    if on is None:
        sock.close()
        return None
    return sock, on


def _listener_of_connection(sock: socket.socket, addresses: ListenAddresses) -> str | None:
    try:
        if sock.type != socket.SOCK_STREAM or sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            return None
        sock.getpeername()  # connected (raises ENOTCONN otherwise)
        local = sock.getsockname()
    except OSError:
        return None
    if sock.family == socket.AF_UNIX:
        name = unix_name(local)
        return f"unix:{name}" if name and name in addresses.unix else None
    listening = addresses.tcp4 if sock.family == socket.AF_INET else addresses.tcp6
    on = listener_of(TcpEndpoint(str(local[0]), int(local[1])), listening)
    return str(on) if on is not None else None
