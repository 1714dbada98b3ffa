"""Process trees and titles: the only module that imports psutil and setproctitle.

A worker's tree is walked down from the worker through ``/proc/PID/task/*/children``, so
its cost is the tree's size, not the host's. Kernels built without CONFIG_PROC_CHILDREN
lack that file; there, and only there, the walk reads ``/proc/*/stat`` of every process
once and builds the tree from the parent pids.

A listed pid may be reused before the master acts on it (it dies, is reaped, and the pid
goes round). So every member carries its start time, and before a descendant is killed
or detached the master opens a pidfd on the pid and checks through ``/proc/PID/stat``
that it still names the listed process; from then on the pidfd, not the pid, is used.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Final

import psutil
import setproctitle

from handoff.core.model import Pid
from handoff.formats.procfs import (
    ProcStat,
    child_pids,
    established_inodes,
    parse_stat,
    socket_inode,
)

PROC: Final = "/proc"
_MAX_ANCESTRY = 64


@dataclass(frozen=True, slots=True)
class Member:
    """One process of a tree as it was listed."""

    pid: Pid
    ppid: Pid
    started: int  # start time in clock ticks after boot (/proc/PID/stat)


def read_stat(pid: int, proc: str = PROC) -> ProcStat | None:
    """/proc/PID/stat, or None if there is no such process (or it cannot be seen)."""
    try:
        fd = os.open(f"{proc}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    return parse_stat(data.decode("ascii", "replace"))


def tree(root: Pid, proc: str = PROC) -> list[Member]:
    """root's process tree, root first (empty if root cannot be seen)."""
    stat = read_stat(root, proc)
    if stat is None:
        return []
    members = [Member(root, Pid(stat.ppid), stat.started)]
    listed = _children(root, proc)
    if listed is None:
        return members + _descendants_from_all(root, proc)
    seen = {int(root)}
    queue = deque([(root, listed)])
    while queue:
        parent, kids = queue.popleft()
        for kid in kids:
            if kid in seen:
                continue
            seen.add(kid)
            kid_stat = read_stat(kid, proc)
            # A child that exited, or whose pid already names another process, is not ours.
            if kid_stat is None or kid_stat.ppid != parent:
                continue
            members.append(Member(Pid(kid), Pid(parent), kid_stat.started))
            queue.append((Pid(kid), _children(Pid(kid), proc) or []))
    return members


def descendants(pid: Pid, proc: str = PROC) -> list[Member]:
    """Every live descendant of pid (any session or group)."""
    return tree(pid, proc)[1:]


def _children(pid: Pid, proc: str) -> list[int] | None:
    """pid's children from the children files of its threads; None if the kernel has none."""
    try:
        tasks = os.listdir(f"{proc}/{pid}/task")
    except OSError:
        return []
    kids: list[int] = []
    for task in tasks:
        try:
            with open(f"{proc}/{pid}/task/{task}/children", "rb") as f:
                kids += child_pids(f.read().decode("ascii", "replace"))
        except FileNotFoundError:
            if task == str(pid) and os.path.isdir(f"{proc}/{pid}/task/{task}"):
                return None  # the thread is there but its children file is not: no such file
        except OSError:
            continue  # the thread exited, or is unreadable
    return kids


def _by_parent(proc: str) -> dict[int, list[Member]]:
    """The fallback: one pass over every process's stat, by parent pid."""
    by_parent: dict[int, list[Member]] = {}
    for name in os.listdir(proc):
        if name.isdigit():
            stat = read_stat(int(name), proc)
            if stat is not None:
                member = Member(Pid(stat.pid), Pid(stat.ppid), stat.started)
                by_parent.setdefault(stat.ppid, []).append(member)
    return by_parent


def _descendants_from_all(root: Pid, proc: str) -> list[Member]:
    """The fallback walk: every process's parent, then down from root."""
    by_parent = _by_parent(proc)
    found: list[Member] = []
    queue = deque(by_parent.get(root, []))
    seen = {int(root)}
    while queue:
        member = queue.popleft()
        if member.pid not in seen:
            seen.add(member.pid)
            found.append(member)
            queue.extend(by_parent.get(member.pid, []))
    return found


def is_listed(member: Member, reapers: Collection[int], proc: str = PROC) -> bool:
    """Does member's pid still name the listed process?

    Same start time, and the same parent, or a reaper (init, the master, a process of the
    tree) if the listed parent died meanwhile.
    """
    stat = read_stat(member.pid, proc)
    if stat is None or stat.started != member.started:
        return False
    return stat.ppid == member.ppid or stat.ppid in reapers


def open_listed(member: Member, reapers: Collection[int], proc: str = PROC) -> int | None:
    """A pidfd on member, or None if it exited or its pid now names another process.

    The pidfd is opened before the check, so a pid reused after the check still cannot
    reach the new process through it. Raises OSError if no pidfd can be had (EMFILE).
    """
    try:
        pidfd = os.pidfd_open(member.pid)
    except ProcessLookupError:
        return None
    if is_listed(member, reapers, proc):
        return pidfd
    os.close(pidfd)
    return None


def reapers_of(members: Iterable[Member]) -> set[int]:
    """Who a listed process may have been re-parented to: init, the master, the tree."""
    return {1, os.getpid(), *(m.pid for m in members)}


def kill_tree(pid: Pid) -> int:
    """SIGKILL pid's process group and every descendant that left it; return how many were hit.

    The descendants are listed (and pinned with pidfds) before the group dies, while they
    are still attached to it.
    """
    members = tree(pid)
    return kill_listed(pid, members[1:], reapers_of(members))


def kill_listed(pgid: Pid, listed: Iterable[Member], reapers: Collection[int]) -> int:
    """SIGKILL the group pgid, then each listed process whose pid still names it."""
    pinned: list[int] = []
    unpinned: list[Member] = []
    try:
        for member in listed:
            try:
                pidfd = open_listed(member, reapers)
            except OSError:
                unpinned.append(member)  # no fd to spare (EMFILE): check again just before
                continue
            if pidfd is not None:
                pinned.append(pidfd)
        hit = 0
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
            hit += 1
        for pidfd in pinned:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                hit += 1
        for member in unpinned:
            if is_listed(member, reapers):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(member.pid, signal.SIGKILL)
                    hit += 1
        return hit
    finally:
        for pidfd in pinned:
            os.close(pidfd)


def owning_worker(sender: Pid, workers: Collection[Pid]) -> Pid | None:
    """The worker whose tree contains sender (sender itself, or its nearest worker ancestor)."""
    pid = int(sender)
    for _ in range(_MAX_ANCESTRY):
        if pid in workers:
            return Pid(pid)
        stat = read_stat(pid)
        if stat is None or stat.ppid <= 1:
            return None
        pid = stat.ppid
    return None


def stray_children(tracked: Collection[Pid]) -> list[Pid]:
    """Our children that we did not spawn: orphans adopted because we are a subreaper."""
    me = Pid(os.getpid())
    kids = _children(me, PROC)
    if kids is None:
        kids = [m.pid for m in _by_parent(PROC).get(me, [])]
    return [Pid(kid) for kid in kids if kid not in tracked]


def reap_strays(tracked: Collection[Pid]) -> list[Pid]:
    """Reap adopted orphans that have exited; return their pids."""
    reaped: list[Pid] = []
    for pid in stray_children(tracked):
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                reaped.append(pid)
    return reaped


def kill_and_reap_strays(tracked: Collection[Pid]) -> list[Pid]:
    """At exit: SIGKILL and reap every adopted orphan and its descendants."""
    strays = stray_children(tracked)
    for pid in strays:
        kill_tree(pid)
    for pid in strays:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    return strays


def set_title(title: str) -> None:
    setproctitle.setproctitle(title)


@dataclass(frozen=True, slots=True)
class TreeUsage:
    processes: int
    cpu_s: float
    rss_bytes: int
    connections: int  # established TCP connections on the listening ports


def connection_inodes(ports: Collection[int], proc: str = PROC) -> frozenset[int]:
    """The socket inodes of established TCP connections on ports, from one read of the
    master's /proc/net/tcp and tcp6 (workers share the master's network namespace)."""
    inodes: set[int] = set()
    if ports:
        for table in ("tcp", "tcp6"):
            with contextlib.suppress(OSError), open(f"{proc}/net/{table}", encoding="ascii") as f:
                inodes |= established_inodes(f.read(), ports)
    return frozenset(inodes)


def tree_usage(pid: Pid, connections: Collection[int]) -> TreeUsage:
    """CPU, memory and connections of pid's whole process tree (for status).

    connections: the inodes ``connection_inodes`` found; a process's socket fds are
    counted against them, so the TCP tables are parsed once per status, not per process.
    """
    members = tree(pid)
    cpu = 0.0
    rss = 0
    count = 0
    for member in members:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(member.pid)
            times = process.cpu_times()
            cpu += times.user + times.system
            rss += process.memory_info().rss
        if connections:
            count += _sockets_among(member.pid, connections)
    return TreeUsage(len(members), round(cpu, 2), rss, count)


def _sockets_among(pid: Pid, inodes: Collection[int]) -> int:
    count = 0
    with contextlib.suppress(OSError):
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if socket_inode(os.readlink(f"/proc/{pid}/fd/{name}")) in inodes:
                    count += 1
    return count
