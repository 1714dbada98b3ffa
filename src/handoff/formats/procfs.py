"""Reading what /proc says about a process waiting for connections.

Pure: parsers of the text and bytes that ``system/accepting_scan.py`` reads, no I/O here. Linux
shows which files an epoll instance watches (``/proc/PID/fdinfo/EPFD``, one ``tfd:`` line
per registration, with the target's inode in hex), and which system call a thread is
blocked in (``/proc/PID/task/TID/syscall``: the number and its six arguments). Together
they tell whether a process is really waiting for connections on a given socket, with no
cooperation from the application.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
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

_TFD = re.compile(r"^tfd:\s*(\d+)\s.*?\bino:([0-9a-f]+)", re.MULTILINE)
_SOCKET_LINK = re.compile(r"^socket:\[(\d+)\]$")
POLLFD: Final = struct.Struct("=ihh")  # struct pollfd: int fd; short events; short revents
POLLIN: Final = 0x001


@dataclass(frozen=True, slots=True)
class EpollTarget:
    """One registration in an epoll set: the fd number the process used, and its inode."""

    fd: int
    inode: int


@dataclass(frozen=True, slots=True)
class BlockedCall:
    """A thread blocked in a system call that can wait for connections."""

    kind: WaitKind
    args: tuple[int, ...]


def epoll_targets(fdinfo: str) -> list[EpollTarget]:
    """The registrations listed in an epoll fd's /proc/PID/fdinfo text."""
    return [EpollTarget(int(fd), int(inode, 16)) for fd, inode in _TFD.findall(fdinfo)]


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
    if call.kind is not WaitKind.SELECT or readfds == 0 or not 0 < nfds <= 65536:
        return None
    return readfds, (nfds + 7) // 8


def poll_array(call: BlockedCall) -> tuple[int, int] | None:
    """For a poll-like call: (address of the pollfd array, its size in bytes)."""
    address, count = call.args[0], call.args[1]
    if call.kind is not WaitKind.POLL or address == 0 or not 0 < count <= 65536:
        return None
    return address, count * POLLFD.size
