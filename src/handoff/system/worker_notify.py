"""The master's own notify socket: workers send sd_notify datagrams (READY=1) to it.

An abstract unix datagram socket (no file to clean up) with
SO_PASSCRED, so the kernel stamps every datagram with the sender's pid; the loop maps that
pid to a worker through the process tree (gunicorn notifies from its arbiter, which is the
worker, but other servers notify from a child). Abstract sockets have no permissions and
their names are listed in /proc/net/unix, so anyone may send: the pid check keeps
strangers from declaring a worker ready, the uid check drops other users' datagrams
before any /proc lookup, and each read takes a bounded batch, so a flood can neither pin
the loop nor grow the master's memory (the rest waits in the kernel's queue for the next
turn).
"""

from __future__ import annotations

import os
import secrets
import socket
from typing import Final

from handoff.core.model import Pid
from handoff.formats.worker_contract import parse_notify
from handoff.system.sockets import UCRED

_MAX_DATAGRAM: Final = 4096
BATCH: Final = 256  # datagrams handled per loop turn


class NotifyServer:
    def __init__(
        self,
        senders: frozenset[int] | None = None,
        batch: int = BATCH,
        *,
        adopt: tuple[int, str] | None = None,
    ) -> None:
        """senders: the uids whose datagrams count (default: the master's own, and root).
        adopt: (fd, address) of the socket a re-executed master kept: workers know it."""
        self._senders = senders if senders is not None else frozenset({os.geteuid(), 0})
        self._batch = batch
        self.dropped = 0  # datagrams from other users, or without credentials
        if adopt is not None:
            fd, self.address = adopt
            self._sock = socket.socket(fileno=fd)
            self._sock.set_inheritable(False)
            return
        self._sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        # Room for the bytes of a burst of datagrams. Their count is capped by
        # net.unix.max_dgram_qlen (often 10) whatever this says: past it a blocking
        # sender (libsystemd's sd_notify) waits for the loop to read, a non-blocking
        # one gets EAGAIN.
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        name = f"handoff/{os.getpid()}/{secrets.token_hex(8)}"
        self._sock.bind(b"\0" + name.encode())
        self.address = "@" + name

    def fileno(self) -> int:
        return self._sock.fileno()

    def receive(self) -> list[tuple[Pid, dict[str, str]]]:
        """Up to BATCH waiting datagrams, as (sender pid, fields), from allowed users."""
        messages: list[tuple[Pid, dict[str, str]]] = []
        for _ in range(self._batch):
            try:
                data, ancillary, _, _ = self._sock.recvmsg(
                    _MAX_DATAGRAM, socket.CMSG_SPACE(UCRED.size)
                )
            except (BlockingIOError, InterruptedError):
                break
            sender = _credentials(ancillary)
            if sender is None or sender[1] not in self._senders:
                self.dropped += 1
                continue
            messages.append((Pid(sender[0]), parse_notify(data)))
        return messages

    def close(self) -> None:
        self._sock.close()


def _credentials(ancillary: list[tuple[int, int, bytes]]) -> tuple[int, int] | None:
    """(pid, uid) the kernel stamped on a datagram (SO_PASSCRED), if it did."""
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid, uid, _ = UCRED.unpack(payload[: UCRED.size])
            return pid, uid
    return None
