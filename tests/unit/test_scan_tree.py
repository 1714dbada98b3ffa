"""system/process_tree.py on real processes: the tree walk, the check that a listed pid
still names the listed process, kills that spare a process with a recycled pid, and the
connection count of ``handoff status``."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import psutil
import pytest

from handoff.core.model import Pid
from handoff.system.process_tree import (
    Member,
    connection_inodes,
    is_listed,
    kill_listed,
    kill_tree,
    open_listed,
    owning_worker,
    read_stat,
    reapers_of,
    stray_children,
    tree,
    tree_usage,
)

pytestmark = pytest.mark.timeout(30)


@contextlib.contextmanager
def shell(script: str) -> Iterator[tuple[subprocess.Popen[str], list[int]]]:
    """sh -c script in its own session; the pids it prints (one line) before it waits."""
    process = subprocess.Popen(
        ["sh", "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert process.stdout is not None
        yield process, [int(p) for p in process.stdout.readline().split()]
    finally:
        with contextlib.suppress(psutil.Error):
            for proc in psutil.Process(process.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie waiting for its parent."""
    stat = read_stat(pid)
    return stat is None or stat.state == "Z"


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """Wait, up to the deadline, for pid to die (its parent may be init, slow to reap)."""
    deadline = time.monotonic() + timeout
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_the_tree_is_the_worker_and_all_its_descendants() -> None:
    with shell("sleep 60 & sh -c 'sleep 60 & echo $!; wait' & wait") as (sh, _):
        # The inner shell prints its child's pid once that child exists.
        members = tree(Pid(sh.pid))
        expected = {sh.pid} | {p.pid for p in psutil.Process(sh.pid).children(recursive=True)}

        assert members[0].pid == sh.pid
        assert {m.pid for m in members} == expected
        assert len(members) == 4
        listed = {m.pid for m in members}
        for member in members[1:]:
            assert member.ppid in listed
            # The start time is psutil's create_time, in clock ticks after boot.
            ticks = os.sysconf("SC_CLK_TCK")
            created = psutil.boot_time() + member.started / ticks
            assert abs(created - psutil.Process(member.pid).create_time()) < 0.05


def test_a_listing_with_another_start_time_is_not_the_process() -> None:
    with shell("sleep 60 & echo $!; wait") as (sh, [child]):
        [member] = tree(Pid(sh.pid))[1:]
        reapers = reapers_of([member])
        stale = Member(member.pid, member.ppid, member.started - 1)  # the pid was recycled
        wrong_parent = Member(member.pid, Pid(child), member.started)

        assert is_listed(member, reapers)
        assert not is_listed(stale, reapers)
        assert not is_listed(wrong_parent, set())
        assert open_listed(stale, reapers) is None
        pidfd = open_listed(member, reapers)
        assert pidfd is not None
        os.close(pidfd)


def test_a_recycled_pid_in_a_listing_is_not_killed() -> None:
    with (
        shell("sleep 60 & echo $!; wait") as (worker, _),
        shell("sleep 60 & echo $!; wait") as (bystander, [innocent]),
    ):
        stat = read_stat(innocent)
        assert stat is not None
        # The worker's listing named this pid, but for a process started at another time.
        recycled = Member(Pid(innocent), Pid(stat.ppid), stat.started + 1)

        kill_listed(Pid(worker.pid), [recycled], {1, os.getpid()})

        worker.wait(10)
        assert not gone(innocent)
        assert bystander.poll() is None


def test_kill_tree_kills_the_group_and_a_descendant_that_left_it() -> None:
    # The inner shell prints its pid once it has left the group.
    with shell("setsid sh -c 'echo $$; exec sleep 60' & wait") as (sh, [escaped]):
        assert os.getpgid(escaped) != sh.pid

        assert kill_tree(Pid(sh.pid)) == 2

        sh.wait(10)
        assert wait_gone(escaped)


def test_owning_worker_walks_up_from_a_descendant() -> None:
    with shell("sh -c 'sleep 60 & echo $!; wait' & wait") as (sh, [grandchild]):
        assert owning_worker(Pid(grandchild), {Pid(sh.pid)}) == sh.pid
        assert owning_worker(Pid(grandchild), {Pid(12345678)}) is None
        assert owning_worker(Pid(os.getpid()), {Pid(sh.pid)}) is None


def test_stray_children_are_our_children_not_tracked() -> None:
    with shell("echo; sleep 60") as (sh, _):
        assert sh.pid in stray_children(set())
        assert sh.pid not in stray_children({Pid(sh.pid)})


def test_status_counts_the_trees_connections_on_the_listening_port() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            with accepted:
                inodes = connection_inodes({port})
                assert os.fstat(accepted.fileno()).st_ino in inodes
                assert os.fstat(client.fileno()).st_ino not in inodes  # its local port differs

                usage = tree_usage(Pid(os.getpid()), inodes)

                assert usage.connections == 1
                assert usage.processes >= 1
                assert usage.rss_bytes > 0
        assert connection_inodes(set()) == frozenset()
