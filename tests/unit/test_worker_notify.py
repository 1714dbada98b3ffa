"""The master's notify socket on real datagrams: bounded batches, other users dropped.

(The kernel's queue holds net.unix.max_dgram_qlen datagrams, 10 on some machines: the
tests send at most that many, without blocking.)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from handoff.system.worker_notify import NotifyServer


@pytest.fixture
def server() -> Iterator[NotifyServer]:
    notify = NotifyServer(batch=4)
    yield notify
    notify.close()


def send(address: str, payloads: list[bytes]) -> int:
    """Send without blocking; return how many the kernel queued."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    target = "\0" + address[1:]
    sent = 0
    try:
        for payload in payloads:
            try:
                sock.sendto(payload, target)
            except BlockingIOError:
                break
            sent += 1
    finally:
        sock.close()
    return sent


def test_a_datagram_comes_with_its_senders_pid(server: NotifyServer) -> None:
    assert send(server.address, [b"READY=1\nSTATUS=warming up"]) == 1

    assert server.receive() == [(os.getpid(), {"READY": "1", "STATUS": "warming up"})]


def test_datagrams_are_taken_in_bounded_batches(server: NotifyServer) -> None:
    queued = send(server.address, [f"STATUS={n}".encode() for n in range(10)])
    assert queued >= 9

    batches = []
    while batch := server.receive():
        batches.append(len(batch))

    assert batches[:2] == [4, 4]
    assert sum(batches) == queued
    assert max(batches) <= 4


_AS_NOBODY = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.sendto(b"READY=1", "\\0" + sys.argv[1][1:])
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="sending as another user needs root")
def test_datagrams_from_another_user_are_dropped_before_any_lookup(server: NotifyServer) -> None:
    # The system's python: the test's own may live where nobody cannot read.
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    subprocess.run(
        [python, "-c", _AS_NOBODY, server.address], user=65534, cwd="/", check=True, timeout=30
    )
    assert send(server.address, [b"READY=1"]) == 1

    assert server.receive() == [(os.getpid(), {"READY": "1"})]
    assert server.dropped == 1
