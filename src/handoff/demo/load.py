"""An asyncio HTTP load generator that classifies every failure.

Not part of the master: `handoff demo`, the reload benchmark and the integration tests use
it to prove that a reload loses nothing. Two kinds of client run side by side, because
they fail in different ways during a reload: keep-alive clients (one connection, many
requests) see the old worker's drain, fresh clients (one connection per request) see the
listening socket itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from handoff.demo.http_responses import EarlyEof, Response, read_response

_RESERVOIR_SIZE: Final = 10_000
_RECENT_ERRORS: Final = 20
_HEADER_LIMIT: Final = 64 * 1024
# After a failure a client pauses briefly, so that a dead server does not turn the
# generator into a busy loop of refused connects that starves everything else.
_FAILURE_PAUSE_S: Final = 0.005


class FailureClass(StrEnum):
    """Why a request did not end in a complete 200 response."""

    REFUSED = "refused"  # connect() got ECONNREFUSED: nobody listening
    RESET = "reset"  # ECONNRESET or EPIPE at any point
    EOF_FRESH = "eof_fresh"  # connection ended before a complete response (not the race below)
    EOF_REUSED = "eof_reused"  # a reused keep-alive connection ended before any response byte
    TIMEOUT = "timeout"  # no complete response within timeout_s
    BAD_STATUS = "bad_status"  # complete response, status other than 200
    OTHER = "other"  # unparseable response or another OS error


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadConfig:
    """Where to send load and how much."""

    host: str = "127.0.0.1"
    port: int
    path: str = "/"
    keepalive_clients: int = 8
    fresh_clients: int = 4
    timeout_s: float = 5.0
    generation_header: str = "x-handoff-generation"


@dataclass(slots=True)
class LoadStats:
    """Live counters of a load run; updated in place while the run goes on."""

    ok: int = 0
    ok_keepalive: int = 0
    ok_fresh: int = 0
    failures: collections.Counter[FailureClass] = field(default_factory=collections.Counter)
    failures_keepalive: collections.Counter[FailureClass] = field(
        default_factory=collections.Counter
    )
    failures_fresh: collections.Counter[FailureClass] = field(default_factory=collections.Counter)
    # Keep-alive connections found closed by the server *before* reuse: like urllib3 and
    # browsers, the client reconnects without sending, so these are not failures.
    idle_closes: int = 0
    by_generation: dict[str, int] = field(default_factory=dict)
    first_seen: dict[str, float] = field(default_factory=dict)  # time.monotonic()
    latencies_ms: list[float] = field(default_factory=list)  # uniform reservoir sample
    latency_count: int = 0
    recent_errors: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=_RECENT_ERRORS)
    )
    started_at: float | None = None  # time.monotonic()
    stopped_at: float | None = None
    # Sampling, not secrets; seeded so that runs are comparable.
    _rng: random.Random = field(default_factory=lambda: random.Random(0), repr=False)  # noqa: S311

    def total_failures(self) -> int:
        """Return the number of failed requests of every class."""
        return sum(self.failures.values())

    def median_latency_ms(self) -> float | None:
        """Return the median latency of successful requests, None before the first."""
        return statistics.median(self.latencies_ms) if self.latencies_ms else None

    def latency_percentile_ms(self, percent: float) -> float | None:
        """Return the given percentile (0-100) of successful requests' latency."""
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        index = min(len(ordered) - 1, round(percent / 100 * (len(ordered) - 1)))
        return ordered[index]

    def duration_s(self) -> float | None:
        """Return how long the load ran (so far, while it runs)."""
        if self.started_at is None:
            return None
        end = self.stopped_at if self.stopped_at is not None else time.monotonic()
        return end - self.started_at

    def requests_per_s(self) -> float | None:
        """Return successful requests per second over the run."""
        duration = self.duration_s()
        return self.ok / duration if duration else None

    def record_ok(self, *, fresh: bool, latency_ms: float, generation: str | None) -> None:
        """Count one complete 200 response."""
        self.ok += 1
        if fresh:
            self.ok_fresh += 1
        else:
            self.ok_keepalive += 1
        if generation is not None:
            self.by_generation[generation] = self.by_generation.get(generation, 0) + 1
            self.first_seen.setdefault(generation, time.monotonic())
        # Algorithm R: every latency seen has the same chance to be in the sample.
        self.latency_count += 1
        if len(self.latencies_ms) < _RESERVOIR_SIZE:
            self.latencies_ms.append(latency_ms)
        else:
            slot = self._rng.randrange(self.latency_count)
            if slot < _RESERVOIR_SIZE:
                self.latencies_ms[slot] = latency_ms

    def record_failure(self, failure: FailureClass, *, fresh: bool, detail: str) -> None:
        """Count one failed request."""
        self.failures[failure] += 1
        (self.failures_fresh if fresh else self.failures_keepalive)[failure] += 1
        self.recent_errors.append(f"{'fresh' if fresh else 'keep-alive'} {failure}: {detail}")

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-serialisable summary."""
        started = self.started_at
        return {
            "ok": self.ok,
            "ok_keepalive": self.ok_keepalive,
            "ok_fresh": self.ok_fresh,
            "failures": self.total_failures(),
            "failures_by_class": {str(c): self.failures[c] for c in FailureClass},
            "failures_keepalive": {str(c): n for c, n in self.failures_keepalive.items()},
            "failures_fresh": {str(c): n for c, n in self.failures_fresh.items()},
            "idle_closes": self.idle_closes,
            "by_generation": dict(self.by_generation),
            "first_seen_s": {
                gen: round(at - started, 6) if started is not None else None
                for gen, at in self.first_seen.items()
            },
            "duration_s": self.duration_s(),
            "requests_per_s": self.requests_per_s(),
            "median_latency_ms": self.median_latency_ms(),
            "p99_latency_ms": self.latency_percentile_ms(99),
            "recent_errors": list(self.recent_errors),
        }


def _classify(exc: Exception, *, reused: bool) -> FailureClass:
    match exc:
        case ConnectionRefusedError():
            return FailureClass.REFUSED
        case ConnectionResetError() | BrokenPipeError():
            return FailureClass.RESET
        case TimeoutError():
            return FailureClass.TIMEOUT
        case EarlyEof(before_first_byte=True) if reused:
            return FailureClass.EOF_REUSED
        case EarlyEof():
            return FailureClass.EOF_FRESH
        case _:
            return FailureClass.OTHER


class _Connection:
    __slots__ = ("reader", "served", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.served = 0  # complete responses received on this connection

    def closed_by_peer(self) -> bool:
        return self.reader.at_eof() or self.writer.transport.is_closing()

    async def request(self, payload: bytes) -> Response:
        self.writer.write(payload)
        await self.writer.drain()
        response = await read_response(self.reader)
        self.served += 1
        return response

    def close(self) -> None:
        # Without waiting for anything: the response has been read (or the connection
        # failed), so the kernel has nothing left to flush or to answer with a reset.
        self.writer.transport.abort()


_Waiter = tuple[Callable[[LoadStats], bool], "asyncio.Future[None]"]


class LoadGenerator:
    """Run keep-alive and fresh-connection HTTP clients against one address."""

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.stats = LoadStats()
        self._header = config.generation_header.lower()
        self._waiters: list[_Waiter] = []
        host = f"[{config.host}]" if ":" in config.host else config.host
        base = (
            f"GET {config.path} HTTP/1.1\r\nHost: {host}:{config.port}\r\n"
            "User-Agent: handoff-loadgen\r\nAccept: */*\r\n"
        )
        self._keepalive_request = (base + "\r\n").encode("latin-1")
        self._fresh_request = (base + "Connection: close\r\n\r\n").encode("latin-1")

    async def run(self, stop: asyncio.Event) -> LoadStats:
        """Run the clients until stop is set; each finishes its current request first."""
        self.stats.started_at = time.monotonic()
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(self.config.keepalive_clients):
                    group.create_task(self._keepalive_client(stop))
                for _ in range(self.config.fresh_clients):
                    group.create_task(self._fresh_client(stop))
        finally:
            self.stats.stopped_at = time.monotonic()
        return self.stats

    async def wait_until(self, predicate: Callable[[LoadStats], bool]) -> None:
        """Return once predicate(stats) holds; it is checked after every request."""
        if predicate(self.stats):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter: _Waiter = (predicate, future)
        self._waiters.append(waiter)
        try:
            await future
        finally:
            self._waiters.remove(waiter)

    def _recorded(self) -> None:
        for predicate, future in self._waiters:
            if not future.done() and predicate(self.stats):
                future.set_result(None)

    async def _connect(self) -> _Connection:
        reader, writer = await asyncio.open_connection(
            self.config.host, self.config.port, limit=_HEADER_LIMIT
        )
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio already sets it on TCP transports; say so explicitly, since small
            # requests stuck behind Nagle would measure the client, not the server.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Connection(reader, writer)

    def _record(
        self, response: Response | Exception, *, fresh: bool, reused: bool, started: float
    ) -> bool:
        """Count one outcome; return True if it was a success."""
        if isinstance(response, Exception):
            detail = f"{type(response).__name__}: {response}"
            self.stats.record_failure(
                _classify(response, reused=reused), fresh=fresh, detail=detail
            )
            success = False
        elif response.status != 200:
            self.stats.record_failure(
                FailureClass.BAD_STATUS, fresh=fresh, detail=f"status {response.status}"
            )
            success = False
        else:
            latency_ms = (time.perf_counter() - started) * 1000
            generation = response.headers.get(self._header)
            self.stats.record_ok(fresh=fresh, latency_ms=latency_ms, generation=generation)
            success = True
        if self._waiters:
            self._recorded()
        return success

    async def _pause_after_failure(self, stop: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), _FAILURE_PAUSE_S)

    async def _keepalive_client(self, stop: asyncio.Event) -> None:
        connection: _Connection | None = None
        try:
            while not stop.is_set():
                if connection is not None and connection.closed_by_peer():
                    self.stats.idle_closes += 1
                    connection.close()
                    connection = None
                reused = connection is not None
                started = time.perf_counter()
                outcome: Response | Exception
                try:
                    async with asyncio.timeout(self.config.timeout_s):
                        if connection is None:
                            connection = await self._connect()
                        outcome = await connection.request(self._keepalive_request)
                except Exception as exc:  # every failure is data here, classified below
                    outcome = exc
                ok = self._record(outcome, fresh=False, reused=reused, started=started)
                finished = isinstance(outcome, Exception) or outcome.close
                if connection is not None and finished:
                    connection.close()
                    connection = None
                if not ok:
                    await self._pause_after_failure(stop)
        finally:
            if connection is not None:
                connection.close()

    async def _fresh_client(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            connection: _Connection | None = None
            outcome: Response | Exception
            try:
                async with asyncio.timeout(self.config.timeout_s):
                    connection = await self._connect()
                    outcome = await connection.request(self._fresh_request)
            except Exception as exc:  # every failure is data here, classified below
                outcome = exc
            if connection is not None:
                connection.close()
            if not self._record(outcome, fresh=True, reused=False, started=started):
                await self._pause_after_failure(stop)
