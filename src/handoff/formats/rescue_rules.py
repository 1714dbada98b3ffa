"""Keep-alive rescue: when may a connection an old worker let go of be handed on?

Pure. The master copies an old worker's connections before its stop signal (``T0``) and
watches each until the worker lets go of it (``T1``: no process of its tree holds the fd
any more). The kernel's counters of the connection at both moments (``TCP_INFO``,
``SIOCINQ``, ``SIOCOUTQ``) then say exactly where the conversation stands: every byte
the worker wrote (``bytes_acked`` + what is still queued) and every byte it read
(``bytes_received`` - what is still waiting). ``judge`` turns them into one of three
answers: hold the idle connection for the client's next request, check the request that
is already waiting, or release the connection (close the master's copy: the client sees
exactly what it would have seen without rescue). docs/rescue.md explains each rule.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

TCP_ESTABLISHED: Final = 1
# struct tcp_info up to tcpi_bytes_received (Linux >= 4.1); offsets of the fields read.
TCP_INFO_SIZE: Final = 136
_STATE: Final = 0
_LAST_DATA_SENT: Final = 44
_LAST_DATA_RECV: Final = 52
_BYTES_ACKED: Final = 120
_BYTES_RECEIVED: Final = 128


@dataclass(frozen=True, slots=True)
class TcpCounters:
    """One connection's counters at one moment (``read_counters`` in system/rescue_copies.py).

    The two ``last_*_ms`` fields are milliseconds *ago*, counted in jiffies: equal values
    say nothing about order, so they only ever decide where they differ."""

    state: int
    last_data_sent_ms: int
    last_data_recv_ms: int
    bytes_acked: int
    bytes_received: int
    inq: int  # received, not read yet (SIOCINQ)
    outq: int  # written, not acknowledged yet (SIOCOUTQ)

    @property
    def written(self) -> int:
        """Every byte the server side ever wrote to the connection."""
        return self.bytes_acked + self.outq

    @property
    def consumed(self) -> int:
        """Every byte the server side ever read from the connection."""
        return self.bytes_received - self.inq


def parse_tcp_info(raw: bytes, inq: int, outq: int) -> TcpCounters:
    """The fields of ``getsockopt(TCP_INFO)`` the rules use; ValueError if too short."""
    if len(raw) < TCP_INFO_SIZE:
        raise ValueError(f"TCP_INFO is {len(raw)} bytes, need {TCP_INFO_SIZE} (Linux >= 4.1)")
    return TcpCounters(
        state=raw[_STATE],
        last_data_sent_ms=struct.unpack_from("=I", raw, _LAST_DATA_SENT)[0],
        last_data_recv_ms=struct.unpack_from("=I", raw, _LAST_DATA_RECV)[0],
        bytes_acked=struct.unpack_from("=Q", raw, _BYTES_ACKED)[0],
        bytes_received=struct.unpack_from("=Q", raw, _BYTES_RECEIVED)[0],
        inq=inq,
        outq=outq,
    )


class Release(StrEnum):
    """Why the master let go of a connection it copied (a ``handoff_rescue_released``
    label); the client then sees what it would have seen without rescue."""

    CLOSED = "closed"  # a FIN or a reset, from either side
    UNSENT = "unsent"  # the worker's last bytes were not acknowledged within the window
    QUIET = "quiet"  # it answered after its stop signal, and the client sent nothing more
    UNANSWERED = "unanswered"  # the worker read a request it did not answer
    PIPELINED = "pipelined"  # the waiting bytes came before the worker's last response
    NOT_HTTP1 = "not_http1"  # TLS, an HTTP/2 preface, CONNECT, anything but HTTP/1.x
    UPGRADE = "upgrade"  # WebSocket or h2c: Upgrade, Connection: upgrade, HTTP2-Settings
    REQUEST_BODY = "request_body"  # Transfer-Encoding, or a Content-Length that is not one
    HEAD_TOO_LARGE = "head_too_large"
    BUSY = "busy"  # the worker still held it when the rescue window closed
    KILLED = "killed"  # the worker was killed, or died of a signal
    HOLD_TIMEOUT = "hold_timeout"  # the client sent nothing within --rescue-hold
    LIMIT = "limit"  # more connections than the master takes at once
    STOPPING = "stopping"  # the master stops: no generation to hand to
    UPSTREAM = "upstream"  # the new generation could not be reached, or did not answer


class Verdict(StrEnum):
    """What to do with a connection the worker let go of, if it is not released."""

    HOLD = "hold"  # idle at a request boundary: wait for the client's next request
    CHECK = "check"  # bytes are waiting: hand them on if they are one HTTP/1.x request
    # It went on answering after its stop signal, then closed: its last response may have
    # said keep-alive (a client sends again within moments: CHECK) or close (a client
    # reads until EOF: released after ANSWER_GRACE_S).
    WAIT = "wait"
    LOOK_AGAIN = "look_again"  # its last bytes are not acknowledged yet


def in_flight(counters: TcpCounters) -> bool:
    """Was a request being served (read, not answered) at this moment, for sure?"""
    if counters.written == 0:
        return counters.consumed > 0  # a first request read, nothing written yet
    return counters.last_data_recv_ms < counters.last_data_sent_ms


def judge(before: TcpCounters, after: TcpCounters) -> Verdict | Release:
    """The rules, from the counters at the copy (before the stop signal) and at the moment
    the worker let go. Anything but a proven request boundary is a release."""
    if after.state != TCP_ESTABLISHED:
        return Release.CLOSED  # a FIN either way: the client's, or the server's shutdown()
    if after.outq > 0:
        return Verdict.LOOK_AGAIN  # the worker is gone: only the acknowledgement can come
    wrote = after.written != before.written
    read = after.consumed != before.consumed
    if read and not wrote:
        return Release.UNANSWERED  # it read after the signal and answered nothing
    if after.inq == 0:
        if not wrote:
            # Quiet since the signal: at a boundary unless a request was left unanswered.
            return Release.UNANSWERED if in_flight(before) or in_flight(after) else Verdict.HOLD
        if in_flight(after):
            return Release.UNANSWERED  # a request came after its last answer, and it read it
        # Even the answer to the request in flight at the signal may have said keep-alive
        # (written before the server noticed its stop): only the client can tell.
        return Verdict.WAIT
    if after.last_data_recv_ms > after.last_data_sent_ms:
        return Release.PIPELINED  # sent before the last response: a pipelining client
    return Verdict.CHECK
