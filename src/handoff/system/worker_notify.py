"""The master's own notify socket: workers send sd_notify datagrams (READY=1) to it.

An abstract unix datagram socket (no file to clean up) with
SO_PASSCRED, so the kernel stamps every datagram with the sender's pid; the loop maps that
pid to a worker through the process tree (gunicorn notifies from its arbiter, which is the
worker, but other servers notify from a child). Abstract sockets have no permissions, so
the pid check is what keeps strangers from declaring a worker ready.
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


class NotifyServer:
    def __init__(self) -> None:
        self._sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        # A burst of workers starting together must not overflow the queue.
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        name = f"handoff/{os.getpid()}/{secrets.token_hex(8)}"
        self._sock.bind(b"\0" + name.encode())
        self.address = "@" + name

    def fileno(self) -> int:
        return self._sock.fileno()

    def receive(self) -> list[tuple[Pid, dict[str, str]]]:
        """Every datagram waiting, as (sender pid, fields); unstamped ones are dropped."""
        messages: list[tuple[Pid, dict[str, str]]] = []
        while True:
            try:
                data, ancillary, _, _ = self._sock.recvmsg(
                    _MAX_DATAGRAM, socket.CMSG_SPACE(UCRED.size)
                )
            except BlockingIOError:
                return messages
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid, _, _ = UCRED.unpack(payload[: UCRED.size])
                    messages.append((Pid(pid), parse_notify(data)))

    def close(self) -> None:
        self._sock.close()
