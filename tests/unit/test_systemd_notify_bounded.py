"""sd_notify never blocks the master's loop when systemd's queue is full (review #18).

The receiver is a real unix datagram socket that never reads: once
net.unix.max_dgram_qlen datagrams wait in it (10 by default, 512 under systemd), a
blocking send would wait for PID 1 for as long as PID 1 is busy.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from handoff.core import actions as act
from handoff.formats.log_events import EventName
from handoff.master.systemd import SystemdGlue
from handoff.system.systemd_notify import STATE_CHANGE_WAIT_S, SystemdNotifier
from tests.unit.test_systemd_messages import serving_loop

pytestmark = pytest.mark.timeout(30)

PROMPT_S = 0.05  # far below any queue wait, far above a syscall


@pytest.fixture
def full_receiver() -> Iterator[tuple[str, socket.socket]]:
    """An abstract address (as NOTIFY_SOCKET spells it) whose queue is full.

    Full for any sender: a sender's own send buffer can run out first (the datagrams it
    queued are charged to it) when net.unix.max_dgram_qlen is high (512 where systemd
    set it), so fillers are added until a fresh socket cannot send either.
    """
    address = f"@handoff-test-notify-{os.getpid()}-{time.monotonic_ns()}"
    target = "\0" + address[1:]
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    fillers: list[socket.socket] = []
    try:
        receiver.bind(target)
        for _ in range(64):
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            fillers.append(filler)
            sent = 0
            with contextlib.suppress(BlockingIOError):
                for sent in range(1, 100_000):  # noqa: B007 - counted for the check below
                    filler.sendto(b"STATUS=filler", socket.MSG_DONTWAIT, target)
            if sent == 1:  # a fresh socket could not send one: the queue itself is full
                break
        else:
            pytest.fail("the receiver's queue never filled")
        yield address, receiver
    finally:
        for filler in fillers:
            filler.close()
        receiver.close()


def drain(receiver: socket.socket) -> list[bytes]:
    received = []
    while True:
        try:
            received.append(receiver.recv(4096, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return received


def test_status_and_watchdog_are_dropped_at_once(full_receiver: tuple[str, socket.socket]) -> None:
    address, receiver = full_receiver
    notifier = SystemdNotifier(address)
    try:
        started = time.monotonic()
        assert notifier.send({"STATUS": "generation 1 serving"}) is False
        assert notifier.send({"WATCHDOG": "1"}) is False
        assert time.monotonic() - started < PROMPT_S
        assert notifier.dropped == 2
        assert b"WATCHDOG=1" not in drain(receiver)
    finally:
        notifier.close()


def test_a_state_change_waits_a_bounded_moment_then_is_dropped(
    full_receiver: tuple[str, socket.socket],
) -> None:
    address, _ = full_receiver
    notifier = SystemdNotifier(address)
    try:
        started = time.monotonic()
        assert notifier.send({"READY": "1"}, wait_s=STATE_CHANGE_WAIT_S) is False
        elapsed = time.monotonic() - started
        assert STATE_CHANGE_WAIT_S <= elapsed < STATE_CHANGE_WAIT_S + 0.5
        assert notifier.dropped == 1
    finally:
        notifier.close()


def test_a_state_change_goes_out_as_soon_as_the_queue_has_room(
    full_receiver: tuple[str, socket.socket],
) -> None:
    """Whether the receiver reads before or during the wait, the message gets through."""
    address, receiver = full_receiver
    notifier = SystemdNotifier(address)
    reader = threading.Thread(target=receiver.recv, args=(4096,))
    try:
        reader.start()
        assert notifier.send({"READY": "1", "STATUS": "serving"}, wait_s=10) is True
        reader.join(10)
        assert b"READY=1\nSTATUS=serving" in drain(receiver)
        assert notifier.dropped == 0
    finally:
        reader.join(10)
        notifier.close()


def test_a_send_to_a_receiver_that_is_gone_is_false_at_once() -> None:
    notifier = SystemdNotifier(f"@handoff-test-nobody-{os.getpid()}-{time.monotonic_ns()}")
    try:
        started = time.monotonic()
        assert notifier.send({"READY": "1"}, wait_s=5) is False
        assert time.monotonic() - started < PROMPT_S
    finally:
        notifier.close()


def test_the_glue_neither_blocks_on_keep_alives_nor_on_state_changes(
    full_receiver: tuple[str, socket.socket],
) -> None:
    address, _ = full_receiver
    loop = serving_loop()
    environ = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": ""}
    glue = SystemdGlue(environ, loop.machine, now=0.0)
    try:
        started = time.monotonic()
        glue.expire(now=0.0)
        glue.on_report(act.report(EventName.WORKER_READY))  # STATUS= alone
        assert time.monotonic() - started < PROMPT_S
        glue.on_report(act.report(EventName.RELOAD_REQUESTED))  # RELOADING=1: may wait
        assert time.monotonic() - started < STATE_CHANGE_WAIT_S + 0.5
        assert glue.next_deadline() == 1.0  # the next keep-alive is still planned
    finally:
        glue.close()
