"""journald's native protocol: one datagram per entry, with fields of our own.

Used for the workers' attributed output when the master's stderr is journald's stream
(systemd sets ``JOURNAL_STREAM=DEV:INODE`` to the stream it gave the service, and that
is still the master's stderr): each line becomes an entry with ``MESSAGE=`` and
``HANDOFF_GENERATION=``, ``HANDOFF_WORKER=``, ``SYSLOG_IDENTIFIER=``, ``SYSLOG_PID=``, so
``journalctl -u app HANDOFF_GENERATION=7`` finds one generation's output and ``systemctl
status`` shows ``app[PID]: text`` rather than a JSON object. journald attributes the
entries to the unit from the sender's cgroup, as it does the stream.

The socket is non-blocking and never waits. ``send`` says ``FULL`` when journald's queue
is (EAGAIN: it holds ``net.unix.max_dgram_qlen`` datagrams, 512 under systemd); the
caller then waits for the socket to be writable (a connected datagram socket is
writable once its peer's queue has room again) and sends the rest in order. It says
``FAILED`` when journald cannot take the entry at all (gone, or a restart that
reconnecting does not fix, or an entry too large), and the caller writes that line to
the stream instead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Mapping
from enum import Enum, auto
from typing import Final

SOCKET_PATH: Final = "/run/systemd/journal/socket"
# Entries in journald's queue count against our send buffer until journald reads them.
# The socket stops taking entries once they fill it and is writable again only once
# three quarters are read (unix_writable: in flight <= sndbuf / 4): a small buffer is
# a low-water mark, so a journald that lags wakes the master once per batch of entries,
# not once per entry. 64 KiB (the kernel doubles it): about a hundred short lines.
_SEND_BUFFER: Final = 64 << 10


def is_journal_stream(environ: Mapping[str, str], fd: int) -> bool:
    """Is fd the stream systemd connected to journald for this service (JOURNAL_STREAM)?

    A service whose stderr was redirected (``2>file`` in a wrapper) keeps the variable
    but not the stream: the device and inode must match (systemd.exec(5))."""
    device, sep, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    try:
        info = os.fstat(fd)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


class Sent(Enum):
    OK = auto()
    FULL = auto()  # not now: wait until the socket is writable
    FAILED = auto()  # not at all: write it elsewhere


class JournalSocket:
    """A datagram socket to journald, sending without ever blocking."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self._sock = sock
        self._path = path

    @classmethod
    def open(cls, path: str = SOCKET_PATH) -> JournalSocket | None:
        """Connected to journald's socket; None if it cannot be (no journald there)."""
        try:
            sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
            )
        except OSError:
            return None
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
            sock.connect(path)
        except OSError:
            sock.close()
            return None
        return cls(sock, path)

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, entry: bytes) -> Sent:
        """Send one entry, without waiting."""
        try:
            self._sock.send(entry)
        except (BlockingIOError, InterruptedError):
            return Sent.FULL
        except ConnectionRefusedError:
            # journald restarted: its new socket has the same path.
            try:
                self._sock.connect(self._path)
                self._sock.send(entry)
            except (BlockingIOError, InterruptedError):
                return Sent.FULL
            except OSError:
                return Sent.FAILED
        except OSError as exc:
            return Sent.FULL if exc.errno == errno.ENOBUFS else Sent.FAILED
        return Sent.OK

    def close(self) -> None:
        self._sock.close()
