"""Talking to systemd: sd_notify messages (READY, RELOADING, STATUS, ...), and the fd store.

Only when systemd gave the master a NOTIFY_SOCKET; workers never
see it (they get the master's own notify socket). The datagram format is systemd's
sd_notify(3): newline-separated KEY=VALUE; file descriptors for the fd store travel as
SCM_RIGHTS with FDSTORE=1 and a FDNAME.

Sending never blocks the master: when PID 1's queue is full (a daemon-reload on a big
system, another service flooding it), a message is dropped at once, or after a short
bounded wait for the state changes that matter (READY, RELOADING, STOPPING).
"""

from __future__ import annotations

import array
import contextlib
import math
import os
import select
import socket
import time
from collections.abc import Mapping
from typing import Final

# How long a state change may wait for room in systemd's queue before it is dropped.
STATE_CHANGE_WAIT_S: Final = 0.1
# The fd store is filled at start, before the loop runs: a dropped socket would close the
# port at the next restart, so it may wait longer.
FD_STORE_WAIT_S: Final = 1.0


class SystemdNotifier:
    """Sends sd_notify datagrams to the NOTIFY_SOCKET systemd gave this process."""

    def __init__(self, address: str) -> None:
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.dropped = 0  # messages given up because systemd's queue was full

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> SystemdNotifier | None:
        address = environ.get("NOTIFY_SOCKET", "")
        return cls(address) if address.startswith(("/", "@")) else None

    def send(
        self, fields: Mapping[str, str], fds: list[int] | None = None, *, wait_s: float = 0.0
    ) -> bool:
        """Send one message; False if it was dropped (never raises, never blocks longer
        than wait_s): systemd is gone, or its queue stayed full."""
        payload = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self._sock.sendmsg([payload], ancillary, socket.MSG_DONTWAIT, self.address)
        except BlockingIOError:
            if wait_s > 0:
                return self._send_waiting(payload, ancillary, wait_s)
            self.dropped += 1
            return False
        except OSError:
            return False
        return True

    def _send_waiting(
        self, payload: bytes, ancillary: list[tuple[int, int, array.array[int]]], wait_s: float
    ) -> bool:
        """Wait up to wait_s for room in the receiver's queue, then send or drop.

        Only a connected datagram socket is woken when its peer's queue drains (poll
        on an unconnected one says writable at once), so this uses one of its own.
        """
        deadline = time.monotonic() + wait_s
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                poller = select.poll()
                poller.register(sock, select.POLLOUT)
                while (left := deadline - time.monotonic()) > 0:
                    if poller.poll(math.ceil(left * 1000)):
                        try:
                            sock.sendmsg([payload], ancillary, socket.MSG_DONTWAIT)
                        except BlockingIOError:
                            continue  # another sender took the room first
                        return True
        except OSError:
            return False
        self.dropped += 1
        return False

    def store_fd(self, fd: int, name: str) -> bool:
        """Hand a listening socket to systemd's fd store (FileDescriptorStoreMax= > 0)."""
        return self.send({"FDSTORE": "1", "FDNAME": name}, [fd], wait_s=FD_STORE_WAIT_S)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as RELOADING=1 wants it in MONOTONIC_USEC."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC in seconds, if the watchdog is meant for this process."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
