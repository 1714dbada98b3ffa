"""Asking the kernel about sockets through NETLINK_SOCK_DIAG (what ``ss`` uses).

One question per call, answered in the master's network namespace, which is where the
listening sockets and every connection accepted on them live. Why not /proc/net/tcp:
that file lists every socket of the namespace, TIME_WAIT ones included, as text the
kernel formats on each read. Under the load of a reload drill it held 37,000 lines
(5.5 MB) and took 72 ms to read: too slow for a scan every few milliseconds in the
master's loop. Here the kernel filters (by state and by port) and answers in binary.

Bounded: at most MAX_DIAG_BYTES are read per question, with a receive timeout (the
answer is produced in the kernel as it is read; nothing remote is waited for).
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
from collections.abc import Collection
from typing import Final

from handoff.formats import sock_diag
from handoff.formats.procfs import TcpEndpoint, TcpSocket
from handoff.formats.sock_diag import DiagError, UnixSocket

MAX_DIAG_BYTES: Final = 8 * 1024 * 1024  # of one answer (about 90,000 sockets)
RECEIVE_TIMEOUT_S: Final = 1.0
_sequence = itertools.count(1)


class DiagUnavailable(Exception):
    """The kernel will not answer (no sock_diag: a module missing, or a seccomp filter)."""


def _ask(request: bytes, sequence: int, *, dump: bool) -> list[bytes]:
    """Send one request, return the payloads of its answer ([] for no such socket)."""
    try:
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, sock_diag.NETLINK_SOCK_DIAG
        )
    except OSError as exc:
        raise DiagUnavailable(f"netlink sock_diag: {os.strerror(exc.errno or 0)}") from None
    payloads: list[bytes] = []
    received = 0
    with sock:
        sock.settimeout(RECEIVE_TIMEOUT_S)
        try:
            sock.sendto(request, (0, 0))
            while received < MAX_DIAG_BYTES:
                data = sock.recv(65536)
                if not data:
                    break
                received += len(data)
                for payload in sock_diag.messages(data, sequence):
                    if payload is None:
                        return payloads
                    payloads.append(payload)
                if not dump:
                    break
        except DiagError as exc:
            if exc.code == errno.ENOENT:  # an exact request: no such socket
                return []
            raise DiagUnavailable(f"sock_diag: {os.strerror(exc.code)}") from None
        except OSError as exc:
            raise DiagUnavailable(f"sock_diag: {os.strerror(exc.errno or 0)}") from None
    return payloads


def tcp_connections(listeners: Collection[TcpEndpoint], family: int) -> list[TcpSocket]:
    """The TCP sockets of the family, in a post-accept state, whose local port is one of
    the listeners' (one filtered dump per port)."""
    found: list[TcpSocket] = []
    for port in sorted({listener.port for listener in listeners}):
        sequence = next(_sequence)
        for payload in _ask(
            sock_diag.tcp_dump_request(family, port, sequence), sequence, dump=True
        ):
            sock = sock_diag.tcp_socket(payload)
            if sock is not None:
                found.append(sock)
    return found


def tcp_socket(local: TcpEndpoint, remote: TcpEndpoint) -> TcpSocket | None:
    """The TCP socket with this exact local and remote end, if there is one.

    (With no such connection, the kernel answers with the listening socket on local.)
    """
    sequence = next(_sequence)
    for payload in _ask(sock_diag.tcp_exact_request(local, remote, sequence), sequence, dump=False):
        sock = sock_diag.tcp_socket(payload)
        if sock is not None and sock.local == local and sock.remote == remote:
            return sock
    return None


def unix_socket(inode: int) -> UnixSocket | None:
    """The unix socket with this inode (its name, state and peer), if there is one."""
    sequence = next(_sequence)
    for payload in _ask(sock_diag.unix_exact_request(inode, sequence), sequence, dump=False):
        return sock_diag.unix_socket(payload)
    return None
