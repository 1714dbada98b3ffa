"""A listening socket's accept queue as the kernel counts it, and the host's listen
drop counters: what the health endpoint's /metrics reports (master/metrics.py).

``TCP_INFO`` on a listening socket reports the accept queue in two fields that mean
something else on a connected one: ``tcpi_unacked`` is the number of connections waiting
to be accepted (``sk_ack_backlog``) and ``tcpi_sacked`` the queue's limit
(``sk_max_ack_backlog``); see tcp_get_info() in net/ipv4/tcp.c. One getsockopt per
listener: no netlink round trip, nothing that can block.
"""

from __future__ import annotations

import socket
import struct
from typing import Final

from handoff.formats.netstat import MAX_TEXT, parse_netstat

# struct tcp_info: 8 one-byte fields, then u32 rto, ato, snd_mss, rcv_mss, unacked, sacked.
_QUEUE: Final = struct.Struct("=8x4xIIIII")
NETSTAT: Final = "/proc/net/netstat"


def accept_queue(sock: socket.socket) -> tuple[int, int] | None:
    """(waiting, limit) of a listening TCP socket; None for another kind of socket."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return None
    if len(raw) < _QUEUE.size:
        return None
    _ato, _snd_mss, _rcv_mss, unacked, sacked = _QUEUE.unpack_from(raw)
    return unacked, sacked


def listen_drops(path: str = NETSTAT) -> dict[str, int]:
    """The host's (network namespace's) ``TcpExt.ListenOverflows`` and ``ListenDrops``."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            counters = parse_netstat(f.read(MAX_TEXT))
    except OSError:
        return {}
    names = ("ListenOverflows", "ListenDrops")
    return {name: counters[f"TcpExt.{name}"] for name in names if f"TcpExt.{name}" in counters}
