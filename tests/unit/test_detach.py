"""Placing the listening socket on a worker's fd number in the master, and putting back
what the master had there (system/detach.py ``_placed``), on real fds.

The placement must leave the master exactly as it was, whatever happens: a number the
master uses is restored, a free number is freed again, nothing leaks, and when the
kernel refuses an fd half-way (EMFILE) none of the master's fds is touched.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from handoff.formats.procfs import EpollTarget
from handoff.system.detach import _clear_of, _placed


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield sock
    sock.close()


def inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_number_the_master_uses_holds_the_socket_then_gets_its_file_back(
    listener: socket.socket,
) -> None:
    read_end, write_end = os.pipe()
    pipe_inode = inode(read_end)
    before = open_fds()
    target = EpollTarget(fd=read_end, inode=inode(listener.fileno()))

    with _placed([target], {target.inode: listener.fileno()}):
        assert inode(read_end) == inode(listener.fileno())

    assert inode(read_end) == pipe_inode
    assert open_fds() == before
    os.close(read_end)
    os.close(write_end)


def test_a_free_number_holds_the_socket_then_is_free_again(listener: socket.socket) -> None:
    free = os.dup(listener.fileno())
    os.close(free)
    before = open_fds()
    target = EpollTarget(fd=free, inode=inode(listener.fileno()))

    with _placed([target, target], {target.inode: listener.fileno()}):
        assert inode(free) == inode(listener.fileno())

    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(free)
    assert open_fds() == before


_OUT_OF_FDS = """
import os, resource, socket, sys
from handoff.formats.procfs import EpollTarget
from handoff.system.detach import _clear_of, _placed
sock = socket.socket(); sock.bind(("127.0.0.1", 0)); sock.listen(1)
read_end, write_end = os.pipe()
pipe_inode = os.fstat(read_end).st_ino
target = EpollTarget(fd=read_end, inode=os.fstat(sock.fileno()).st_ino)
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
highest = max(int(n) for n in os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1 + int(sys.argv[1]), hard))
try:
    with _placed([target], {target.inode: sock.fileno()}):
        print("placed")
except OSError as exc:
    print("refused", exc.errno == 24)
print("kept", os.fstat(read_end).st_ino == pipe_inode)
"""


@pytest.mark.parametrize("room", [0, 1, 2, 3])
def test_out_of_fds_nothing_of_the_masters_is_touched(room: int) -> None:
    """room: how many more fds the kernel gives before EMFILE (the scratch copies and the
    saves need one each)."""
    result = subprocess.run(
        [sys.executable, "-c", _OUT_OF_FDS, str(room)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "kept True", lines
    assert lines[0] in ("placed", "refused True"), lines


def test_a_pidfd_on_a_target_number_is_moved_out_of_the_way() -> None:
    """The master's pidfd of the worker must not sit on a number ``_placed`` fills with a
    socket (it would be hidden while pidfd_getfd needs it: EBADF, seen under pytest)."""
    pidfd = os.pidfd_open(os.getpid())
    targets = [EpollTarget(fd=pidfd, inode=1), EpollTarget(fd=pidfd + 2, inode=1)]
    moved = _clear_of(pidfd, targets)
    try:
        assert moved > pidfd + 2
        assert not os.path.exists(f"/proc/self/fd/{pidfd}")
        assert os.readlink(f"/proc/self/fd/{moved}") == "anon_inode:[pidfd]"
    finally:
        os.close(moved)
    other = os.pidfd_open(os.getpid())
    try:
        assert _clear_of(other, [EpollTarget(fd=other + 1, inode=1)]) == other  # left alone
    finally:
        os.close(other)
