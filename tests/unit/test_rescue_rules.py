"""Keep-alive rescue's pure parts: the rules on the kernel's counters (formats/rescue_rules.py)
and the one request handed on (formats/rescue_request.py)."""

from __future__ import annotations

import struct

import pytest

from handoff.errors import ConfigError
from handoff.formats.rescue_request import (
    INCOMPLETE,
    MAX_HEAD,
    Forwarded,
    Request,
    RescueOptions,
    read_request,
    rewrite,
)
from handoff.formats.rescue_rules import (
    TCP_ESTABLISHED,
    TCP_INFO_SIZE,
    Release,
    TcpCounters,
    Verdict,
    in_flight,
    judge,
    parse_tcp_info,
)

FIN_WAIT2 = 5


def counters(
    *,
    acked: int = 1000,
    received: int = 400,
    inq: int = 0,
    outq: int = 0,
    sent_ms: int = 50,
    recv_ms: int = 50,
    state: int = TCP_ESTABLISHED,
) -> TcpCounters:
    return TcpCounters(state, sent_ms, recv_ms, acked, received, inq, outq)


IDLE = counters()  # answered everything it read; the last bytes went out after the last came


def test_tcp_info_fields_are_read_at_their_offsets() -> None:
    raw = bytearray(TCP_INFO_SIZE)
    raw[0] = TCP_ESTABLISHED
    struct.pack_into("=I", raw, 44, 7)
    struct.pack_into("=I", raw, 52, 9)
    struct.pack_into("=QQ", raw, 120, 1234, 567)
    got = parse_tcp_info(bytes(raw), inq=17, outq=3)
    assert got == TcpCounters(TCP_ESTABLISHED, 7, 9, 1234, 567, 17, 3)
    assert (got.written, got.consumed) == (1237, 550)
    with pytest.raises(ValueError, match=r"Linux >= 4\.1"):
        parse_tcp_info(bytes(raw[:100]), 0, 0)


def test_an_idle_connection_left_quiet_is_held() -> None:
    assert judge(IDLE, counters(sent_ms=80, recv_ms=80)) is Verdict.HOLD


def test_a_request_waiting_in_the_queue_is_checked() -> None:
    # The next request arrived after the worker let go (uvicorn under load).
    after = counters(received=441, inq=41, sent_ms=3, recv_ms=1)
    assert judge(IDLE, after) is Verdict.CHECK


def test_it_went_on_answering_then_closed_wait_for_the_client() -> None:
    after = counters(acked=3000, received=800, sent_ms=0, recv_ms=0)
    assert judge(IDLE, after) is Verdict.WAIT
    # Even the answer to the request in flight at the signal: it may have said keep-alive.
    first = counters(acked=0, received=120)
    assert judge(first, counters(acked=300, received=120)) is Verdict.WAIT
    pending = counters(sent_ms=900, recv_ms=20)
    assert judge(pending, counters(acked=1500, sent_ms=0, recv_ms=60)) is Verdict.WAIT


def test_its_last_bytes_not_acknowledged_yet_look_again() -> None:
    assert judge(IDLE, counters(outq=200)) is Verdict.LOOK_AGAIN


@pytest.mark.parametrize(
    ("before", "after", "why"),
    [
        # The client's FIN, or the server's own shutdown(SHUT_WR): the FIN is out.
        (IDLE, counters(state=FIN_WAIT2), Release.CLOSED),
        # It read after the signal and wrote nothing: a request read and dropped.
        (IDLE, counters(received=480), Release.UNANSWERED),
        # A request in flight at the signal (read after the last answer) never answered.
        (counters(sent_ms=900, recv_ms=20), counters(sent_ms=950, recv_ms=70), Release.UNANSWERED),
        # A first request read, nothing ever written, then closed without an answer.
        (counters(acked=0, received=120), counters(acked=0, received=120), Release.UNANSWERED),
        # It answered, then read one more request after its last answer, and closed.
        (IDLE, counters(acked=1500, received=480, sent_ms=30, recv_ms=10), Release.UNANSWERED),
        # The waiting bytes came before its last response: a pipelining client.
        (
            IDLE,
            counters(acked=1500, received=500, inq=100, sent_ms=5, recv_ms=9),
            Release.PIPELINED,
        ),
    ],
)
def test_anything_but_a_proven_boundary_is_released(
    before: TcpCounters, after: TcpCounters, why: Release
) -> None:
    assert judge(before, after) is why


def test_in_flight_is_only_said_when_certain() -> None:
    assert not in_flight(counters(sent_ms=5, recv_ms=5))  # same jiffy: no order known
    assert in_flight(counters(sent_ms=6, recv_ms=5))
    assert not in_flight(counters(acked=0, received=0))  # a new connection, nothing read


GET = b"GET /orders?id=1 HTTP/1.1\r\nHost: api\r\nConnection: keep-alive\r\nAccept: */*\r\n\r\n"


def test_one_plain_request_is_read_and_rewritten_to_close() -> None:
    request = read_request(GET)
    assert isinstance(request, Request)
    assert (request.head_length, request.body_length) == (len(GET), 0)
    assert rewrite(request, "10.1.2.3", Forwarded.NONE) == (
        b"GET /orders?id=1 HTTP/1.1\r\nHost: api\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )


def test_a_body_length_comes_from_content_length_and_the_rest_stays() -> None:
    data = b"POST /o HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello GET / HTTP/1.1"
    request = read_request(data)
    assert isinstance(request, Request)
    assert request.body_length == 5
    assert data[request.head_length :][: request.body_length] == b"hello"


@pytest.mark.parametrize(
    ("forwarded", "client", "header"),
    [
        (Forwarded.FORWARDED, "10.1.2.3", b"Forwarded: for=10.1.2.3\r\n"),
        (Forwarded.FORWARDED, "::1", b'Forwarded: for="[::1]"\r\n'),
        (Forwarded.X_FORWARDED_FOR, "10.1.2.3", b"X-Forwarded-For: 10.1.2.3\r\n"),
    ],
)
def test_the_client_address_goes_along_only_when_asked(
    forwarded: Forwarded, client: str, header: bytes
) -> None:
    request = read_request(GET)
    assert isinstance(request, Request)
    assert header in rewrite(request, client, forwarded)


def test_the_address_is_appended_to_a_hop_list_already_there() -> None:
    request = read_request(b"GET / HTTP/1.1\r\nX-Forwarded-For: 1.1.1.1\r\n\r\n")
    assert isinstance(request, Request)
    head = rewrite(request, "127.0.0.1", Forwarded.X_FORWARDED_FOR)
    assert b"X-Forwarded-For: 1.1.1.1, 127.0.0.1\r\n" in head


@pytest.mark.parametrize(
    "start", [b"G", b"GET", b"GET /", b"GET / HTTP/1.", b"GET / HTTP/1.1\r", b"GET / HTTP/1.1\r\n"]
)
def test_the_start_of_a_request_waits_for_more(start: bytes) -> None:
    assert read_request(start) is INCOMPLETE


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Release.NOT_HTTP1),  # the HTTP/2 preface
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", Release.NOT_HTTP1),  # TLS hello
        (b"CONNECT example.com:443 HTTP/1.1\r\n\r\n", Release.NOT_HTTP1),
        (b"get / HTTP/1.1\r\n\r\n", Release.NOT_HTTP1),
        (b"GET / HTTP/1.1 \r\n\r\n", Release.NOT_HTTP1),
        (b"GET / HTTP/2\r\n\r\n", Release.NOT_HTTP1),
        (b"ET / HTTP/1.1\r\nHost: a\r\n\r\n", Release.NOT_HTTP1),  # its first byte was read
        (b"GET / HTTP/1.1\r\nHost a\r\n\r\n", Release.NOT_HTTP1),
        (b"GET / HTTP/1.1\r\nX: 1\r\n folded\r\n\r\n", Release.NOT_HTTP1),
        (
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            Release.UPGRADE,
        ),
        (b"GET / HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\n\r\n", Release.UPGRADE),
        (b"GET / HTTP/1.1\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n", Release.UPGRADE),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", Release.REQUEST_BODY),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            Release.REQUEST_BODY,
        ),
        (b"POST / HTTP/1.1\r\nContent-Length: -5\r\n\r\n", Release.REQUEST_BODY),
        (b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * MAX_HEAD, Release.HEAD_TOO_LARGE),
    ],
)
def test_anything_but_one_plain_http1_request_is_released(data: bytes, why: Release) -> None:
    assert read_request(data) is why


def test_options_are_checked() -> None:
    assert RescueOptions().hold_s == 2.0
    with pytest.raises(ConfigError, match="--rescue-hold must be above 0"):
        RescueOptions(enabled=True, hold_s=0)
    with pytest.raises(ConfigError, match="needs --rescue-keepalive"):
        RescueOptions(forwarded=Forwarded.FORWARDED)
