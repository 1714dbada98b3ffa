"""Talking to systemd: sd_notify messages (READY, RELOADING, STATUS, ...), and the fd store.

Only when systemd gave the master a NOTIFY_SOCKET; workers never
see it (they get the master's own notify socket). The datagram format is systemd's
sd_notify(3): newline-separated KEY=VALUE; file descriptors for the fd store travel as
SCM_RIGHTS with FDSTORE=1 and a FDNAME.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import time
from collections.abc import Mapping


class SystemdNotifier:
    """Sends sd_notify datagrams to the NOTIFY_SOCKET systemd gave this process."""

    def __init__(self, address: str) -> None:
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> SystemdNotifier | None:
        address = environ.get("NOTIFY_SOCKET", "")
        return cls(address) if address.startswith(("/", "@")) else None

    def send(self, fields: Mapping[str, str], fds: list[int] | None = None) -> bool:
        """Send one message; False if systemd is not there any more (never raises)."""
        payload = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self._sock.sendmsg([payload], ancillary, 0, self.address)
        except OSError:
            return False
        return True

    def store_fd(self, fd: int, name: str) -> bool:
        """Hand a listening socket to systemd's fd store (FileDescriptorStoreMax= > 0)."""
        return self.send({"FDSTORE": "1", "FDNAME": name}, [fd])

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
