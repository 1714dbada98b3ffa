"""The load generator classifies every way a request can fail, against a real server.

The server is an in-process asyncio server on 127.0.0.1:0 whose behaviour is chosen by
the request path; each test runs its own event loop with asyncio.run and waits on the
generator's statistics with deadlines, never with sleeps.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Callable
from typing import Final

import pytest

from handoff.demo.load import FailureClass, LoadConfig, LoadGenerator, LoadStats

DEADLINE_S: Final = 10.0
BODY: Final = b'{"hello": "world"}'


def _ok(*, close: bool = False, generation: str = "7") -> bytes:
    connection = "close" if close else "keep-alive"
    return (
        f"HTTP/1.1 200 OK\r\nContent-Length: {len(BODY)}\r\n"
        f"x-Handoff-GENERATION: {generation}\r\nConnection: {connection}\r\n\r\n"
    ).encode() + BODY


class MisbehavingServer:
    """An HTTP server that does what the request path asks, right or wrong."""

    def __init__(self) -> None:
        self.writers: set[asyncio.StreamWriter] = set()
        self.requests = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> MisbehavingServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self.writers):
            writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        served = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests += 1
                path = head.split(b" ", 2)[1].decode()
                if not await self._respond(path, served, writer):
                    return
                await writer.drain()
                served += 1
        finally:
            self.writers.discard(writer)
            writer.close()

    async def _respond(self, path: str, served: int, writer: asyncio.StreamWriter) -> bool:
        """Answer (or not); return False to close the connection."""
        match path:
            case "/ok":
                writer.write(_ok())
            case "/slow":
                await asyncio.sleep(0.1)
                writer.write(_ok())
            case "/close":
                writer.write(_ok(close=True))
                return False
            case "/status500":
                writer.write(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n")
            case "/drop-second" if served > 0:
                return False  # a reused connection closed before any response byte
            case "/drop-second":
                writer.write(_ok())
            case "/eof":
                return False
            case "/reset":
                # Linger 0 turns close() into a reset.
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return False
            case "/hang":
                await asyncio.Event().wait()
            case "/partial":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                await writer.drain()
                return False
            case "/chunked":
                writer.write(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                    b"X-Handoff-Generation: 9\r\n\r\n"
                    b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n"
                )
            case "/continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + _ok())
            case "/http10":
                writer.write(b"HTTP/1.0 200 OK\r\nX-Handoff-Generation: 3\r\n\r\n" + BODY)
                return False
            case "/garbage":
                writer.write(b"HELLO THERE\r\n\r\n")
                return False
            case _:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        return True


async def _load(
    config: LoadConfig, until: Callable[[LoadStats], bool]
) -> tuple[LoadGenerator, LoadStats]:
    """Run the generator until `until` holds, then stop it and return its statistics."""
    generator = LoadGenerator(config)
    stop = asyncio.Event()
    run = asyncio.create_task(generator.run(stop))
    reached = asyncio.create_task(generator.wait_until(until))
    done, _ = await asyncio.wait({run, reached}, timeout=DEADLINE_S, return_when="FIRST_COMPLETED")
    stop.set()
    reached.cancel()
    stats = await asyncio.wait_for(run, DEADLINE_S)
    assert reached in done, f"condition not reached: {stats.to_dict()}"
    return generator, stats


def _run_against_server(
    path: str,
    until: Callable[[LoadStats], bool],
    *,
    keepalive: int = 0,
    fresh: int = 0,
    timeout_s: float = 5.0,
) -> LoadStats:
    async def scenario() -> LoadStats:
        async with MisbehavingServer() as server:
            config = LoadConfig(
                port=server.port,
                path=path,
                keepalive_clients=keepalive,
                fresh_clients=fresh,
                timeout_s=timeout_s,
            )
            _, stats = await _load(config, until)
            return stats

    return asyncio.run(scenario())


def _failures(stats: LoadStats) -> dict[str, int]:
    return {str(failure): count for failure, count in stats.failures.items() if count}


@pytest.mark.parametrize(("keepalive", "fresh"), [(1, 0), (0, 1), (2, 2)])
def test_good_responses_count_as_ok_with_their_generation(keepalive: int, fresh: int) -> None:
    stats = _run_against_server("/ok", lambda s: s.ok >= 20, keepalive=keepalive, fresh=fresh)

    assert _failures(stats) == {}
    assert stats.ok == stats.ok_keepalive + stats.ok_fresh >= 20
    assert stats.by_generation == {"7": stats.ok}
    assert set(stats.first_seen) == {"7"}
    assert len(stats.latencies_ms) == stats.ok
    assert (stats.median_latency_ms() or 0) > 0
    if keepalive == 0:
        assert stats.ok_keepalive == 0
    if fresh == 0:
        assert stats.ok_fresh == 0


@pytest.mark.parametrize(
    "path", ["/close", "/chunked", "/continue", "/http10"], ids=lambda p: p.strip("/")
)
def test_every_framing_a_server_may_use_parses(path: str) -> None:
    stats = _run_against_server(path, lambda s: s.ok >= 5, keepalive=1, fresh=1)

    assert _failures(stats) == {}
    assert stats.ok >= 5


def test_a_reused_connection_closed_before_the_response_is_eof_reused() -> None:
    stats = _run_against_server(
        "/drop-second", lambda s: s.failures[FailureClass.EOF_REUSED] >= 3, keepalive=1
    )

    # Every connection serves one request, then drops the next one unanswered.
    assert _failures(stats) == {"eof_reused": stats.failures[FailureClass.EOF_REUSED]}
    assert stats.ok >= 3
    assert stats.failures_keepalive[FailureClass.EOF_REUSED] >= 3
    assert not stats.failures_fresh


@pytest.mark.parametrize(("keepalive", "fresh"), [(1, 0), (0, 1)])
def test_a_new_connection_closed_before_the_response_is_eof_fresh(
    keepalive: int, fresh: int
) -> None:
    stats = _run_against_server(
        "/eof", lambda s: s.total_failures() >= 3, keepalive=keepalive, fresh=fresh
    )

    assert _failures(stats) == {"eof_fresh": stats.total_failures()}
    assert stats.ok == 0


def test_a_response_cut_short_is_eof_fresh() -> None:
    stats = _run_against_server("/partial", lambda s: s.total_failures() >= 3, fresh=1)

    assert _failures(stats) == {"eof_fresh": stats.total_failures()}


@pytest.mark.parametrize(("keepalive", "fresh"), [(1, 0), (0, 1)])
def test_a_reset_is_reset(keepalive: int, fresh: int) -> None:
    stats = _run_against_server(
        "/reset", lambda s: s.total_failures() >= 3, keepalive=keepalive, fresh=fresh
    )

    assert _failures(stats) == {"reset": stats.total_failures()}
    assert "ConnectionResetError" in stats.recent_errors[-1]


def test_a_server_that_never_answers_is_a_timeout() -> None:
    stats = _run_against_server(
        "/hang", lambda s: s.total_failures() >= 2, keepalive=1, fresh=1, timeout_s=0.2
    )

    assert set(_failures(stats)) == {"timeout"}
    assert stats.ok == 0


def test_a_status_other_than_200_is_bad_status() -> None:
    stats = _run_against_server(
        "/status500", lambda s: s.total_failures() >= 4, keepalive=1, fresh=1
    )

    assert set(_failures(stats)) == {"bad_status"}
    assert "status 500" in stats.recent_errors[-1]


def test_something_that_is_not_http_is_other() -> None:
    stats = _run_against_server("/garbage", lambda s: s.total_failures() >= 2, fresh=1)

    assert _failures(stats) == {"other": stats.total_failures()}


def test_nobody_listening_is_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Bound, never listened, now closed: connect() gets ECONNREFUSED.
    config = LoadConfig(port=port, keepalive_clients=1, fresh_clients=1, timeout_s=2.0)

    _, stats = asyncio.run(_load(config, lambda s: s.total_failures() >= 4))

    assert set(_failures(stats)) == {"refused"}
    assert stats.failures_keepalive[FailureClass.REFUSED] >= 1
    assert stats.failures_fresh[FailureClass.REFUSED] >= 1


def test_stop_lets_the_request_in_flight_finish() -> None:
    # The condition holds right after the first response; by the time stop is set the
    # client has already sent its second request, which must complete, not be dropped.
    stats = _run_against_server("/slow", lambda s: s.ok >= 1, keepalive=1)

    assert stats.ok == 2
    assert _failures(stats) == {}
    assert stats.started_at is not None
    assert stats.stopped_at is not None
    assert stats.stopped_at >= stats.started_at


def test_statistics_summarise_to_json() -> None:
    stats = LoadStats()
    for value in range(1, 101):
        stats.record_ok(fresh=value % 2 == 0, latency_ms=float(value), generation="2")
    stats.record_failure(FailureClass.RESET, fresh=True, detail="ConnectionResetError")

    summary = json.loads(json.dumps(stats.to_dict()))

    assert summary["ok"] == 100
    assert summary["ok_fresh"] == summary["ok_keepalive"] == 50
    assert summary["failures"] == 1
    assert summary["failures_by_class"]["reset"] == 1
    assert summary["failures_by_class"]["refused"] == 0
    assert summary["failures_fresh"] == {"reset": 1}
    assert summary["by_generation"] == {"2": 100}
    assert stats.median_latency_ms() == 50.5
    assert stats.latency_percentile_ms(99) == 99.0
    assert summary["recent_errors"] == ["fresh reset: ConnectionResetError"]


def test_the_latency_sample_stays_bounded() -> None:
    stats = LoadStats()

    for value in range(25_000):
        stats.record_ok(fresh=False, latency_ms=float(value), generation=None)

    assert stats.latency_count == 25_000
    assert len(stats.latencies_ms) == 10_000
    assert stats.by_generation == {}
    # A uniform sample of 0..24999 has its median near the middle.
    assert 10_000 < (stats.median_latency_ms() or 0) < 15_000
