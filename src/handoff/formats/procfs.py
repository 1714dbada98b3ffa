"""Reading what /proc says about a process waiting for connections.

Pure: parsers of the text and bytes that ``system/accepting_scan.py``, ``system/detach.py``
and ``system/process_tree.py`` read, no I/O here. Linux shows which files an epoll
instance watches (``/proc/PID/fdinfo/EPFD``, one ``tfd:`` line per registration, with the
target's inode in hex), and which system call a thread is blocked in
(``/proc/PID/task/TID/syscall``: the number and its six arguments). Together they tell
whether a process is really waiting for connections on a given socket, with no
cooperation from the application. ``/proc/PID/stat`` and ``/proc/PID/task/TID/children``
give the process tree, ``/proc/net/tcp`` (for status) and ``unix`` the connections; which
socket a process holds was accepted on which listening address (the matching rules).
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Collection
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final


class WaitKind(StrEnum):
    """How a process waits for connections on a listening socket."""

    EPOLL = "epoll"  # the socket is registered in one of its epoll sets
    ACCEPT = "accept"  # a thread is blocked in accept/accept4 on it
    POLL = "poll"  # a thread is blocked in poll/ppoll over it
    SELECT = "select"  # a thread is blocked in select/pselect6 over it


# x86_64 and aarch64 numbers of the calls a thread can block in while waiting for
# connections. (aarch64 has no accept-less poll/select: only ppoll and pselect6.)
SYSCALLS: Final[dict[str, dict[int, WaitKind]]] = {
    "x86_64": {
        43: WaitKind.ACCEPT,
        288: WaitKind.ACCEPT,
        7: WaitKind.POLL,
        271: WaitKind.POLL,
        23: WaitKind.SELECT,
        270: WaitKind.SELECT,
    },
    "aarch64": {202: WaitKind.ACCEPT, 242: WaitKind.ACCEPT, 73: WaitKind.POLL, 72: WaitKind.SELECT},
}

# 'tfd: %8d events: %8x data: %16llx  pos:%lli ino:%lx sdev:%x' (fs/eventpoll.c).
_TFD = re.compile(
    r"^tfd:\s*(\d+)\s+(?:events:\s*([0-9a-f]+)\s+data:\s*([0-9a-f]+)\s)?.*?\bino:([0-9a-f]+)",
    re.MULTILINE,
)
_SOCKET_LINK = re.compile(r"^socket:\[(\d+)\]$")
POLLFD: Final = struct.Struct("=ihh")  # struct pollfd: int fd; short events; short revents
POLLIN: Final = 0x001
# A root master reads these arrays out of worker-controlled memory: a bigger one is not
# a server waiting on a few listening sockets, and parsing it would stall the loop.
MAX_POLL_ENTRIES: Final = 4096
MAX_SELECT_FDS: Final = 65536
TCP_ESTABLISHED: Final = 0x01
# The states (include/net/tcp_states.h) of a TCP socket a process can hold after accept():
# ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING. Not LISTEN, not the
# handshake states (a connection in the accept queue has no inode yet), and not CLOSE: a
# socket merely bound to the port (SO_REUSEPORT) is CLOSE too, and was never accepted.
TCP_AFTER_ACCEPT: Final = frozenset({0x01, 0x04, 0x05, 0x08, 0x09, 0x0B})
WILDCARD_HOSTS: Final = frozenset({"0.0.0.0", "::"})  # noqa: S104 - names, not a bind
UNIX_STREAM: Final = 0x0001
UNIX_CONNECTED: Final = 0x03  # SS_CONNECTED
UNIX_ACCEPTCON: Final = 0x00010000  # __SO_ACCEPTCON: a listening socket


@dataclass(frozen=True, slots=True)
class EpollTarget:
    """One registration in an epoll set: the fd number the process used, and its inode
    (together the registration's key), with the event mask and the opaque data it was
    registered with (what putting it back needs; not part of the key)."""

    fd: int
    inode: int
    events: int = field(default=0, compare=False)
    data: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class BlockedCall:
    """A thread blocked in a system call that can wait for connections."""

    kind: WaitKind
    args: tuple[int, ...]


def epoll_targets(fdinfo: str) -> list[EpollTarget]:
    """The registrations listed in an epoll fd's /proc/PID/fdinfo text."""
    return [
        EpollTarget(int(fd), int(inode, 16), int(events or "0", 16), int(data or "0", 16))
        for fd, events, data, inode in _TFD.findall(fdinfo)
    ]


def socket_inode(link: str) -> int | None:
    """The inode of a /proc/PID/fd link to a socket ('socket:[123]'), else None."""
    match = _SOCKET_LINK.match(link)
    return int(match.group(1)) if match else None


def blocked_call(syscall_line: str, machine: str) -> BlockedCall | None:
    """Parse /proc/PID/task/TID/syscall: the call, if it is one that waits for connections.

    The line is 'NR ARG0 ... ARG5 SP PC' while blocked in a call, 'running' or '-1 SP PC'
    otherwise.
    """
    fields = syscall_line.split()
    if len(fields) < 7 or not fields[0].isdigit():
        return None
    kind = SYSCALLS.get(machine, {}).get(int(fields[0]))
    if kind is None:
        return None
    return BlockedCall(kind, tuple(int(arg, 16) for arg in fields[1:7]))


def pollfds(memory: bytes) -> list[int]:
    """The fds polled for input in a struct pollfd array."""
    count = len(memory) // POLLFD.size
    entries = (POLLFD.unpack_from(memory, i * POLLFD.size) for i in range(count))
    return [fd for fd, events, _ in entries if fd >= 0 and events & POLLIN]


def fd_set_members(memory: bytes, nfds: int) -> list[int]:
    """The fds set in an fd_set bitmap (little-endian, one bit per fd) below nfds."""
    return [fd for fd in range(min(nfds, len(memory) * 8)) if memory[fd // 8] >> (fd % 8) & 1]


def select_reads(call: BlockedCall) -> tuple[int, int] | None:
    """For a select-like call: (address of the read fd_set, its size in bytes)."""
    nfds, readfds = call.args[0], call.args[1]
    if call.kind is not WaitKind.SELECT or readfds == 0 or not 0 < nfds <= MAX_SELECT_FDS:
        return None
    return readfds, (nfds + 7) // 8


@dataclass(frozen=True, slots=True)
class FdSetWindow:
    """The bytes of a select call's read fd_set that hold the watched fds' bits."""

    address: int
    size: int
    first_fd: int  # the fd of the window's first bit

    def members(self, memory: bytes, fds: Collection[int]) -> set[int]:
        """Which of fds are set in the window's bytes."""
        found = set()
        for fd in fds:
            bit = fd - self.first_fd
            if 0 <= bit < len(memory) * 8 and memory[bit // 8] >> (bit % 8) & 1:
                found.add(fd)
        return found


def select_window(call: BlockedCall, watched: Collection[int]) -> FdSetWindow | None:
    """Where the bits of the watched fds are in a select call's read fd_set (None: nowhere).

    Only the bytes that can hold a watched fd are read: a few bytes instead of up to 8 KiB
    of the worker's memory per thread.
    """
    span = select_reads(call)
    nfds = call.args[0]
    candidates = [fd for fd in watched if 0 <= fd < nfds]
    if span is None or not candidates:
        return None
    first_byte, last_byte = min(candidates) // 8, max(candidates) // 8
    return FdSetWindow(span[0] + first_byte, last_byte - first_byte + 1, first_byte * 8)


def poll_array(call: BlockedCall) -> tuple[int, int] | None:
    """For a poll-like call: (address of the pollfd array, its size in bytes).

    None for an array of more than MAX_POLL_ENTRIES: it is skipped, not parsed.
    """
    address, count = call.args[0], call.args[1]
    if call.kind is not WaitKind.POLL or address == 0 or not 0 < count <= MAX_POLL_ENTRIES:
        return None
    return address, count * POLLFD.size


@dataclass(frozen=True, slots=True)
class ProcStat:
    """What the master needs from /proc/PID/stat."""

    pid: int
    state: str
    ppid: int
    pgrp: int
    started: int  # clock ticks after boot: with the pid, names one process for good


def parse_stat(text: str) -> ProcStat | None:
    """Parse /proc/PID/stat. The command name (2nd field) may hold spaces and ')', so the
    fields are counted from the last ')'."""
    head, paren, tail = text.rpartition(")")
    pid_text = head.partition(" (")[0]
    fields = tail.split()
    if not paren or not pid_text.isdigit() or len(fields) < 20:
        return None
    try:
        return ProcStat(
            pid=int(pid_text),
            state=fields[0],
            ppid=int(fields[1]),
            pgrp=int(fields[2]),
            started=int(fields[19]),
        )
    except ValueError:
        return None


def child_pids(text: str) -> list[int]:
    """Parse /proc/PID/task/TID/children: the pids of that thread's children."""
    return [int(field) for field in text.split() if field.isdigit()]


def placement_rounds(targets: Collection[EpollTarget]) -> list[list[EpollTarget]]:
    """Split registrations so no fd number appears twice in a round.

    An epoll set can hold two registrations under one fd number (the process registered
    the number, then dup2'd another socket onto it): each needs its own socket on that
    number when EPOLL_CTL_DEL runs, so they go in separate rounds. Repeats are dropped.
    """
    rounds: list[list[EpollTarget]] = []
    for target in dict.fromkeys(targets):
        for current in rounds:
            if all(other.fd != target.fd for other in current):
                current.append(target)
                break
        else:
            rounds.append([target])
    return rounds


def established_inodes(tcp_table: str, ports: Collection[int]) -> set[int]:
    """From /proc/net/tcp or tcp6: the socket inodes of established connections whose
    local port is one of ports (connections accepted on the listening sockets)."""
    inodes: set[int] = set()
    for line in tcp_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        _, _, port = fields[1].rpartition(":")
        try:
            if int(fields[3], 16) == TCP_ESTABLISHED and int(port, 16) in ports:
                inodes.add(int(fields[9]))
        except ValueError:
            continue
    return inodes


@dataclass(frozen=True, slots=True)
class TcpEndpoint:
    """An IP address (as ``ipaddress`` writes it) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class TcpSocket:
    """A TCP socket as the kernel lists it (system/socket_diag.py)."""

    inode: int
    state: int
    local: TcpEndpoint
    remote: TcpEndpoint


def _lines_of(table: str, inode: int, field_index: int) -> list[str]:
    """The lines of a /proc/net table whose field_index-th field is inode.

    Found by searching the text for the number (a C-speed scan), and only those lines
    are split: the table holds every socket of the network namespace, the worker tree
    only a few of them.
    """
    needle, text = f" {inode}", str(inode)
    found = []
    start = table.find(needle)
    while start >= 0:
        after = start + len(needle)
        begin = table.rfind("\n", 0, start) + 1
        end = table.find("\n", start)
        end = len(table) if end < 0 else end
        if after == end or table[after].isspace():
            line = table[begin:end]
            fields = line.split(maxsplit=field_index + 1)
            if len(fields) > field_index and fields[field_index] == text:
                found.append(line)
        start = table.find(needle, after)
    return found


def listener_of(local: TcpEndpoint, listeners: Collection[TcpEndpoint]) -> TcpEndpoint | None:
    """The listener whose address a connection's local end is: same port, and the same
    address or a wildcard listener (0.0.0.0 or ::). IPv4-mapped IPv6 counts as IPv4."""
    host = _unmapped(local.host)
    for listener in listeners:
        if listener.port == local.port and (
            listener.host in WILDCARD_HOSTS or _unmapped(listener.host) == host
        ):
            return listener
    return None


def _unmapped(host: str) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def accepted_on(sock: TcpSocket, listeners: Collection[TcpEndpoint]) -> TcpEndpoint | None:
    """The listener this socket was accepted on, if it is one of its connections: in a
    post-accept state, with the listener's address as its local end."""
    if sock.state not in TCP_AFTER_ACCEPT:
        return None
    return listener_of(sock.local, listeners)


def unix_accepted(table: str, paths: Collection[str], inodes: Collection[int]) -> dict[int, str]:
    """From /proc/net/unix: which of these inodes are stream connections accepted on a
    listening socket at one of these paths (inode -> path).

    An accepted socket carries its listener's address (the kernel copies it at connect
    time), is connected, and is not listening itself; a client's socket has no path
    unless it bound one. Abstract names are written '@name', as /proc shows them.
    """
    accepted: dict[int, str] = {}
    for inode in inodes:
        if inode <= 0:
            continue
        for line in _lines_of(table, inode, 6):
            fields = line.split(maxsplit=7)  # the path may hold spaces
            if len(fields) < 8:
                continue
            path = fields[7]
            try:
                flags, kind, state = int(fields[3], 16), int(fields[4], 16), int(fields[5], 16)
            except ValueError:
                continue
            if (
                kind == UNIX_STREAM
                and state == UNIX_CONNECTED
                and not flags & UNIX_ACCEPTCON
                and path in paths
            ):
                accepted[inode] = path
    return accepted
