"""Is a worker really waiting for connections on the handed socket? Ask /proc.

For ``--ready auto``: a process of the worker's tree counts as
accepting when the listening socket (same inode as the master's) is registered in one of
its epoll sets, or one of its threads is blocked in accept/accept4 on it, or in
poll/ppoll/select/pselect6 over it (the fd arrays are read from /proc/PID/mem, which the
master may read as the parent of the tree or as root). A scan reads a few small files per
process: well under a millisecond for a small tree.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Final

from handoff.core.model import Pid
from handoff.formats.procfs import (
    EpollTarget,
    WaitKind,
    blocked_call,
    epoll_targets,
    fd_set_members,
    poll_array,
    pollfds,
    select_reads,
    socket_inode,
)
from handoff.system.process_tree import descendants

_MACHINE: Final = platform.machine()


class ProcUnreadable(Exception):
    """/proc of the worker cannot be read (another user, hidepid): auto cannot see it."""


@dataclass(frozen=True, slots=True)
class TreeScan:
    processes: int
    accepting: int
    kinds: frozenset[WaitKind]

    def describe(self) -> str:
        how = ", ".join(sorted(self.kinds)) or "none"
        return f"accepting in {self.accepting} of {self.processes} processes ({how})"


@dataclass(frozen=True, slots=True)
class ProcessFds:
    """The sockets (fd -> inode) and epoll instances (fd) a process holds."""

    sockets: dict[int, int]
    epolls: list[int]


def scan_tree(root: Pid, inodes: Collection[int]) -> TreeScan:
    """How many processes of root's tree wait for connections on one of these sockets."""
    accepting = 0
    kinds: set[WaitKind] = set()
    tree = [root, *descendants(root)]
    for pid in tree:
        waits = process_waits(pid, inodes)
        if waits:
            accepting += 1
            kinds |= waits
    return TreeScan(processes=len(tree), accepting=accepting, kinds=frozenset(kinds))


def process_fds(pid: Pid) -> ProcessFds:
    sockets: dict[int, int] = {}
    epolls: list[int] = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            link = os.readlink(f"/proc/{pid}/fd/{name}")
            inode = socket_inode(link)
            if inode is not None:
                sockets[int(name)] = inode
            elif link == "anon_inode:[eventpoll]":
                epolls.append(int(name))
    return ProcessFds(sockets, epolls)


def epoll_registrations(
    pid: Pid, fds: ProcessFds, inodes: Collection[int]
) -> Iterator[tuple[int, list[EpollTarget]]]:
    """(epoll fd, its registrations of one of the sockets) for each epoll set of pid."""
    for epfd in fds.epolls:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            with open(f"/proc/{pid}/fdinfo/{epfd}", encoding="ascii", errors="replace") as f:
                targets = [t for t in epoll_targets(f.read()) if t.inode in inodes]
            if targets:
                yield epfd, targets


def process_waits(pid: Pid, inodes: Collection[int]) -> set[WaitKind]:
    """How pid waits for connections on one of the sockets (empty: it does not)."""
    try:
        fds = process_fds(pid)
    except PermissionError:
        raise ProcUnreadable(f"cannot read /proc/{pid}/fd (permission denied)") from None
    except (FileNotFoundError, ProcessLookupError):
        return set()  # it exited while we looked
    waits: set[WaitKind] = set()
    if any(True for _ in epoll_registrations(pid, fds, inodes)):
        waits.add(WaitKind.EPOLL)
    watched = {fd for fd, inode in fds.sockets.items() if inode in inodes}
    if watched:
        waits |= _blocked_on(pid, watched)
    return waits


def _blocked_on(pid: Pid, watched: set[int]) -> set[WaitKind]:
    waits: set[WaitKind] = set()
    with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/syscall", encoding="ascii") as f:
                    call = blocked_call(f.read(), _MACHINE)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if call is None:
                continue
            if call.kind is WaitKind.ACCEPT and call.args[0] in watched:
                waits.add(call.kind)
            elif (span := select_reads(call)) is not None:
                nfds = call.args[0]
                if watched & set(fd_set_members(_read_memory(pid, *span), nfds)):
                    waits.add(call.kind)
            elif (span := poll_array(call)) is not None and watched & set(
                pollfds(_read_memory(pid, *span))
            ):
                waits.add(call.kind)
    return waits


def _read_memory(pid: Pid, address: int, size: int) -> bytes:
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.pread(fd, size, address)
    except OSError:
        return b""
    finally:
        os.close(fd)
