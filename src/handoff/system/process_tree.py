"""Process trees and titles: the only module that imports psutil and setproctitle."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Collection
from dataclasses import dataclass

import psutil
import setproctitle

from handoff.core.model import Pid

_MAX_ANCESTRY = 64


def descendants(pid: Pid) -> list[Pid]:
    """Every live descendant of pid (any session or group)."""
    try:
        return [Pid(p.pid) for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def kill_tree(pid: Pid) -> int:
    """SIGKILL pid's process group and every descendant that left it; return how many were hit.

    The descendants are listed before the group dies, while they are still attached to it.
    """
    escaped = descendants(pid)
    hit = 0
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
        hit += 1
    for child in escaped:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signal.SIGKILL)
            hit += 1
    return hit


def owning_worker(sender: Pid, workers: Collection[Pid]) -> Pid | None:
    """The worker whose tree contains sender (sender itself, or its nearest worker ancestor)."""
    pid = int(sender)
    for _ in range(_MAX_ANCESTRY):
        if pid in workers:
            return Pid(pid)
        try:
            pid = psutil.Process(pid).ppid()
        except psutil.Error:
            return None
        if pid <= 1:
            return None
    return None


def stray_children(tracked: Collection[Pid]) -> list[Pid]:
    """Our children that we did not spawn: orphans adopted because we are a subreaper."""
    try:
        children = psutil.Process().children()
    except psutil.Error:
        return []
    return [Pid(c.pid) for c in children if c.pid not in tracked]


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


def tree_usage(pid: Pid, ports: Collection[int]) -> TreeUsage:
    """CPU, memory and connections of pid's whole process tree (for status)."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return TreeUsage(0, 0.0, 0, 0)
    cpu = 0.0
    rss = 0
    connections = 0
    for process in tree:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            cpu += times.user + times.system
            rss += process.memory_info().rss
            connections += sum(
                1
                for c in process.net_connections("tcp")
                if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port in ports
            )
    return TreeUsage(len(tree), round(cpu, 2), rss, connections)
