"""system/detach.py ``detach`` on real process trees (review findings #16 and #17).

Each test starts a small Python process that registers listening sockets in an epoll set
the way a server does, takes it off with ``detach`` and reads the registrations back from
/proc/PID/fdinfo. Every process is started in its own session and killed with its group.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from handoff.core.model import Pid
from handoff.formats.procfs import epoll_targets
from handoff.system.detach import _detach_process, detach
from handoff.system.process_tree import Member, reapers_of, tree

pytestmark = pytest.mark.timeout(60)

# argv: the fd numbers of the listening sockets (comma separated), a mode. Prints the
# epoll fd's number once its registrations are in place, then waits for SIGKILL.
SERVER = r"""
import ctypes, os, select, signal, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
mode = sys.argv[2]
if mode == "hidden-child":
    ready_r, ready_w = os.pipe()
    if os.fork() == 0:
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
        child_epoll = select.epoll()
        child_epoll.register(fds[0], select.EPOLLIN)
        os.write(ready_w, b"x")
        signal.pause()
        os._exit(0)
    os.read(ready_r, 1)
epoll = select.epoll()
if mode == "dup":
    # fd a is registered; then socket b is dup2'd onto the same number and registered too.
    # The first registration stays: its file lives on in `keep`.
    a, b = fds
    keep = os.dup(a)
    epoll.register(a, select.EPOLLIN)
    os.dup2(b, a)
    epoll.register(a, select.EPOLLIN)
else:
    epoll.register(fds[0], select.EPOLLIN)
print(epoll.fileno(), flush=True)
signal.pause()
"""


@dataclass
class Server:
    pid: Pid
    epfd: int

    def registered(self) -> list[int]:
        """The inodes registered in its epoll set."""
        with open(f"/proc/{self.pid}/fdinfo/{self.epfd}") as f:
            return sorted(t.inode for t in epoll_targets(f.read()))


@pytest.fixture
def listeners() -> Iterator[list[socket.socket]]:
    made = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    yield made
    for sock in made:
        sock.close()


def inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def mapping(socks: list[socket.socket]) -> dict[int, int]:
    return {inode(s): s.fileno() for s in socks}


@contextlib.contextmanager
def server(socks: list[socket.socket], mode: str) -> Iterator[Server]:
    fds = [s.fileno() for s in socks]
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER, ",".join(map(str, fds)), mode],
        pass_fds=fds,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, "the server died before registering"
        yield Server(Pid(process.pid), int(line))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def test_two_registrations_under_one_fd_number_are_both_removed(
    listeners: list[socket.socket],
) -> None:
    with server(listeners, "dup") as srv:
        assert srv.registered() == sorted(map(inode, listeners))

        result = detach(srv.pid, mapping(listeners))

        assert srv.registered() == []
        assert (result.path, result.registrations) == ("epoll", 2)
        assert result.detached == [srv.pid]
        assert result.failed == []


def test_a_process_whose_pid_was_recycled_is_not_touched(listeners: list[socket.socket]) -> None:
    with server(listeners[:1], "one") as srv:
        [listed] = tree(srv.pid)
        recycled = Member(listed.pid, listed.ppid, listed.started + 1)

        assert _detach_process(recycled, mapping(listeners), reapers_of([listed])) is None
        assert srv.registered() == [inode(listeners[0])]

        assert _detach_process(listed, mapping(listeners), reapers_of([listed])) is not None
        assert srv.registered() == []


# Run without any capability (uid 0 still): the non-dumpable child is closed to it, as it
# would be to a non-root master. Prints the detachment as JSON.
CAPLESS_DETACH = r"""
import json, os, socket, subprocess, sys
from handoff.core.model import Pid
from handoff.formats.procfs import epoll_targets
from handoff.system.detach import detach
sock = socket.create_server(("127.0.0.1", 0))
process = subprocess.Popen(
    [sys.executable, "-c", sys.argv[1], str(sock.fileno()), "hidden-child"],
    pass_fds=[sock.fileno()], stdout=subprocess.PIPE, text=True, start_new_session=True,
)
try:
    epfd = int(process.stdout.readline())
    result = detach(Pid(process.pid), {os.fstat(sock.fileno()).st_ino: sock.fileno()})
    with open(f"/proc/{process.pid}/fdinfo/{epfd}") as f:
        left = epoll_targets(f.read())
    print(json.dumps({
        "server": process.pid, "path": result.path, "registrations": result.registrations,
        "processes": result.processes, "detached": result.detached, "reason": result.reason,
        "failed": [[r.pid, r.error] for r in result.failed], "left": len(left),
    }))
finally:
    os.killpg(process.pid, 9)
    process.wait(10)
"""


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_each_process_is_reported_and_one_refusal_hides_nothing() -> None:
    run = subprocess.run(
        [
            "setpriv",
            "--bounding-set=-all",
            "--inh-caps=-all",
            "--",
            sys.executable,
            "-c",
            CAPLESS_DETACH,
            SERVER,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)

    server_pid = result["server"]
    assert result["processes"] == 2
    assert (result["path"], result["registrations"]) == ("epoll", 1)
    assert result["detached"] == [server_pid]
    assert result["left"] == 0
    [[hidden, error]] = result["failed"]
    assert hidden != server_pid
    assert "permission denied" in error
    assert f"pid {hidden}" in result["reason"]
