"""Is a worker really waiting for connections on the handed socket? Ask /proc.

For ``--ready auto``: a process of the worker's tree counts as accepting when the
listening socket (same inode as the master's) is registered in one of its epoll sets, or
one of its threads is blocked in accept/accept4 on it, or in poll/ppoll/select/pselect6
over it (the fd arrays are read from /proc/PID/mem, which the master may read as the
parent of the tree or as root).

And a tree that holds a connection it accepted on a listening socket is serving, which
proves more than waiting does (system/serving_scan.py); looked for only when nobody was
seen waiting, and only if the caller gives the listeners' addresses.

What a scan costs: the tree walk (process_tree.py), then per process a listdir and a
readlink per fd, the fdinfo of each epoll fd and, if it holds the socket, the syscall
file of each thread and a few bytes of memory per blocked thread. Memory reads are
budgeted per scan and poll arrays over MAX_POLL_ENTRIES are skipped, so a worker cannot
make its (possibly root) master read or parse much of its memory.

A process whose /proc cannot be read (another user, non-dumpable: setuid or file
capabilities, prctl PR_SET_DUMPABLE 0) is skipped and counted, not fatal: the rest of the
tree is still seen. Only a tree of which nothing can be read raises ProcUnreadable.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Final

from handoff.core.model import Pid
from handoff.formats.procfs import (
    EpollTarget,
    TcpEndpoint,
    TcpSocket,
    WaitKind,
    blocked_call,
    epoll_targets,
    poll_array,
    pollfds,
    select_window,
    socket_inode,
)
from handoff.system import socket_diag
from handoff.system.process_tree import PROC, Member, tree
from handoff.system.serving_scan import (
    Held,
    ListenAddresses,
    accepted_through_fds,
    listen_addresses,
    serving,
)

__all__ = ["ListenAddresses", "ProcFiles", "ProcUnreadable", "TreeScan", "listen_addresses"]

_MACHINE: Final = platform.machine()
MEMORY_BUDGET: Final = 256 * 1024  # bytes of worker memory one scan may read
MEMORY_READS: Final = 1024  # reads of worker memory one scan may make


class ProcUnreadable(Exception):
    """No process of the worker's tree can be read (another user, hidepid, non-dumpable)."""


class ProcFiles:
    """The scan's reads of /proc, under a root: tests build a fake tree elsewhere, and can
    make one read fail the way the kernel would."""

    def __init__(self, root: str = PROC) -> None:
        self.root = root

    def path(self, pid: int, *parts: str) -> str:
        return "/".join((self.root, str(pid), *parts))

    def listdir(self, pid: int, *parts: str) -> list[str]:
        return os.listdir(self.path(pid, *parts))

    def readlink(self, pid: int, *parts: str) -> str:
        return os.readlink(self.path(pid, *parts))

    def read_text(self, pid: int, *parts: str) -> str:
        with open(self.path(pid, *parts), encoding="ascii", errors="replace") as f:
            return f.read()

    def read_net(self, table: str, limit: int) -> tuple[str, bool]:
        """The master's /proc/self/net/TABLE, up to limit bytes: (text, truncated).

        "" if it cannot be read (no IPv6: no tcp6)."""
        try:
            with open(f"{self.root}/self/net/{table}", "rb") as f:
                data = f.read(limit + 1)
        except OSError:
            return "", False
        # surrogateescape: unix paths are bytes, and compare as Python's socket gives them
        return data[:limit].decode("utf-8", "surrogateescape"), len(data) > limit

    def tcp_connections(self, listening: Collection[TcpEndpoint], family: int) -> list[TcpSocket]:
        return socket_diag.tcp_connections(listening, family)

    def accepted_through_fds(
        self, held: Held, addresses: ListenAddresses
    ) -> tuple[str | None, bool]:
        return accepted_through_fds(held, addresses)

    def read_memory(self, pid: int, address: int, size: int) -> bytes:
        """Bytes of pid's memory; b"" if they cannot be read. PermissionError if the kernel
        refuses the ptrace-level access /proc/PID/mem needs."""
        try:
            fd = os.open(self.path(pid, "mem"), os.O_RDONLY | os.O_CLOEXEC)
        except PermissionError:
            raise
        except OSError:
            return b""
        try:
            return os.pread(fd, size, address)
        except OSError:
            return b""
        finally:
            os.close(fd)


PROC_FILES: Final = ProcFiles()


@dataclass(frozen=True, slots=True)
class TreeScan:
    processes: int
    accepting: int
    kinds: frozenset[WaitKind]
    unreadable: tuple[Pid, ...] = ()  # skipped: their /proc/PID/fd could not be read
    blind: tuple[Pid, ...] = ()  # their threads' syscall or mem could not be read
    serving: int = 0  # processes holding a connection accepted on a listening socket
    serving_on: str = ""  # the listening address of (one of) those connections
    truncated: tuple[str, ...] = ()  # /proc/net tables of which only the start was read

    @property
    def ready(self) -> bool:
        """A process waits for connections, or serves one it accepted."""
        return self.accepting > 0 or self.serving > 0

    def describe(self) -> str:
        how = ", ".join(sorted(self.kinds)) or "none"
        text = f"accepting in {self.accepting} of {self.processes} processes ({how})"
        if self.serving and not self.accepting:
            text = (
                f"serving a connection accepted on {self.serving_on} "
                f"in {self.serving} of {self.processes} processes"
            )
        if self.unreadable:
            text += f"; {len(self.unreadable)} could not be read"
        return text


@dataclass(frozen=True, slots=True)
class ProcessFds:
    """The sockets (fd -> inode) and epoll instances (fd) a process holds."""

    sockets: dict[int, int]
    epolls: list[int]


@dataclass(slots=True)
class _Scan:
    """One scan's reader, memory budget and the processes it could not fully see."""

    files: ProcFiles
    budget_bytes: int = MEMORY_BUDGET
    budget_reads: int = MEMORY_READS
    blind: list[Pid] = field(default_factory=list)
    held: list[Held] = field(default_factory=list)  # per process, its other sockets

    def memory(self, pid: Pid, address: int, size: int) -> bytes:
        if size > self.budget_bytes or self.budget_reads <= 0:
            return b""  # spent: this thread counts as not waiting, the next scan looks again
        self.budget_bytes -= size
        self.budget_reads -= 1
        return self.files.read_memory(pid, address, size)


def scan_tree(
    root: Pid,
    inodes: Collection[int],
    files: ProcFiles = PROC_FILES,
    addresses: ListenAddresses | None = None,
    *,
    tables: bool = True,
) -> TreeScan:
    """How many processes of root's tree wait for connections on one of these sockets;
    if none does and addresses are given, how many serve a connection accepted on one
    (tables: see serving_scan.serving)."""
    members = tree(root, files.root)
    if not members:
        raise ProcUnreadable(f"cannot see /proc/{root}")
    scan = _Scan(files)
    accepting = 0
    kinds: set[WaitKind] = set()
    unreadable: list[Pid] = []
    for member in members:
        try:
            waits = _process_waits(member, inodes, scan)
        except ProcUnreadable:
            unreadable.append(member.pid)
            continue
        if waits:
            accepting += 1
            kinds |= waits
    if len(unreadable) == len(members):
        raise ProcUnreadable(f"cannot read /proc/{root}/fd (permission denied)")
    serving_: dict[Pid, str] = {}
    truncated: list[str] = []
    if not accepting and addresses is not None:
        serving_ = serving(scan.held, addresses, scan.files, truncated, tables=tables)
    return TreeScan(
        processes=len(members),
        accepting=accepting,
        kinds=frozenset(kinds),
        unreadable=tuple(unreadable),
        blind=tuple(scan.blind),
        serving=len(serving_),
        serving_on=next(iter(serving_.values()), ""),
        truncated=tuple(truncated),
    )


def process_fds(pid: Pid, files: ProcFiles = PROC_FILES) -> ProcessFds:
    sockets: dict[int, int] = {}
    epolls: list[int] = []
    for name in files.listdir(pid, "fd"):
        with contextlib.suppress(FileNotFoundError):
            link = files.readlink(pid, "fd", name)
            inode = socket_inode(link)
            if inode is not None:
                sockets[int(name)] = inode
            elif link == "anon_inode:[eventpoll]":
                epolls.append(int(name))
    return ProcessFds(sockets, epolls)


def epoll_registrations(
    pid: Pid, fds: ProcessFds, inodes: Collection[int], files: ProcFiles = PROC_FILES
) -> Iterator[tuple[int, list[EpollTarget]]]:
    """(epoll fd, its registrations of one of the sockets) for each epoll set of pid."""
    for epfd in fds.epolls:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            text = files.read_text(pid, "fdinfo", str(epfd))
            targets = [t for t in epoll_targets(text) if t.inode in inodes]
            if targets:
                yield epfd, targets


def _process_waits(member: Member, inodes: Collection[int], scan: _Scan) -> set[WaitKind]:
    """How a process waits for connections on one of the sockets (empty: it does not);
    the other sockets it holds are noted in scan.held."""
    pid = member.pid
    try:
        fds = process_fds(pid, scan.files)
    except PermissionError:
        raise ProcUnreadable(f"cannot read /proc/{pid}/fd (permission denied)") from None
    except (FileNotFoundError, ProcessLookupError):
        return set()  # it exited while we looked
    others = {fd: inode for fd, inode in fds.sockets.items() if inode not in inodes}
    if others:
        scan.held.append(Held(member, others))
    waits: set[WaitKind] = set()
    with contextlib.suppress(PermissionError):  # fd was readable, fdinfo is too
        if any(True for _ in epoll_registrations(pid, fds, inodes, scan.files)):
            waits.add(WaitKind.EPOLL)
    watched = {fd for fd, inode in fds.sockets.items() if inode in inodes}
    if watched:
        try:
            waits |= _blocked_on(pid, watched, scan)
        except PermissionError:
            _refused(pid, scan)
    return waits


def _refused(pid: Pid, scan: _Scan) -> None:
    """syscall or mem was refused though fd was not: why?

    /proc/PID/fd needs ptrace-read access, syscall and mem need ptrace-attach: Yama
    ptrace_scope 2 or 3, or an LSM, can allow the one and refuse the other. Or the process
    made itself non-dumpable since its fd table was read (a worker starting up): then fd
    is refused now too, and the process is unreadable, not seen half.
    """
    try:
        scan.files.listdir(pid, "fd")
    except PermissionError:
        raise ProcUnreadable(f"cannot read /proc/{pid} (permission denied)") from None
    except OSError:
        return  # it exited
    scan.blind.append(pid)


def _blocked_on(pid: Pid, watched: set[int], scan: _Scan) -> set[WaitKind]:
    waits: set[WaitKind] = set()
    try:
        tasks = scan.files.listdir(pid, "task")
    except (FileNotFoundError, ProcessLookupError):
        return waits
    for task in tasks:
        try:
            call = blocked_call(scan.files.read_text(pid, "task", task, "syscall"), _MACHINE)
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread exited
        if call is None:
            continue
        if call.kind is WaitKind.ACCEPT:
            waiting = call.args[0] in watched
        elif (window := select_window(call, watched)) is not None:
            waiting = bool(window.members(scan.memory(pid, window.address, window.size), watched))
        elif (span := poll_array(call)) is not None:
            waiting = bool(watched & set(pollfds(scan.memory(pid, *span))))
        else:
            waiting = False  # an fd array too big to read, or none given
        if waiting:
            waits.add(call.kind)
    return waits
