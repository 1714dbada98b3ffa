"""Keep-alive rescue's traps: what a client sees must not change with ``--rescue-keepalive``.

Each trap is a connection the rescue must leave alone, one uvicorn worker (asyncio + h11,
tests/integration/apps/trap_app.py) under ``handoff run``, run without and with
``--rescue-keepalive``: raw-socket clients record every byte until the connection ends, and
both runs must see the same (plain uvicorn's behaviour). The master's ``rescue.finished``
says how the run with rescue let go of the connection.

- In flight at the old worker's stop signal (the worker has read the request, proven from
  /proc/net/tcp, before the reload starts): an HTTP/1.0 request, an HTTP/1.1
  ``Connection: close`` request, a chunked stream, a pipelined pair. Each answer ends
  either inside the 0.5 s rescue window (``in-window``: the app's ``gate`` file is created
  when the master reports the signal, and the answer ends 0.2 s later) or after it
  (``late``): the full answer, then EOF right after its last byte (within 0.3 s; the only
  wait rescue may add is its 0.1 s grace after an answer written in the window), never a
  hold.
- A request the drain timeout kills: the connection ends at the kill, no answer, no hang.
- An idle keep-alive connection whose next bytes (sent once the old worker has let go of
  it, while the rescue holds it) are an HTTP/2 preface, a TLS ClientHello or a WebSocket
  upgrade: never handed on; closed without a byte, as without rescue.
- The control: the same idle connection with a plain ``GET /`` fails without rescue and is
  answered by the new generation (``Connection: close``) with it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import APPS, Event, Master, running
from tests.integration.waiting import wait_until

pytestmark: list[pytest.MarkDecorator] = [pytest.mark.integration]
if os.geteuid() != 0:
    pytestmark.append(pytest.mark.skip(reason="pidfd_getfd needs root (ptrace)"))

BIN = Path(sys.executable).parent
UVICORN = [
    str(BIN / "uvicorn"),
    *("--fd", "{fd}", "--loop", "asyncio", "--http", "h11"),
    *("--timeout-graceful-shutdown", "20", "--log-level", "warning", "trap_app:app"),
]
HOLD_S = 2.0  # --rescue-hold's default
EOF_AFTER_LAST_BYTE_S = 0.3  # "no added delay": the end follows the answer's last byte
THEN_S = 0.2  # in-window answers end this long after the stop signal (the window is 0.5 s)
LATE_THEN_S = 1.0  # gated late answers: well after the window
CLOSED = ("eof", "reset")

MODES = pytest.mark.parametrize("rescue", [False, True], ids=["without", "with"])
TIMINGS = pytest.mark.parametrize("timing", ["in-window", "late"])


# -- the client's side ---------------------------------------------------------------------


@dataclass
class Seen:
    """Everything one client read until its connection ended, and when."""

    data: bytes
    end: str  # "eof", "reset" or "timeout"
    last_at: float | None  # when the last byte came (time.time()), None without any
    end_at: float  # when the end came (time.time(), as the master's event timestamps)

    @property
    def eof_delay(self) -> float:
        assert self.last_at is not None
        return self.end_at - self.last_at


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes  # chunked bodies decoded
    complete: bool  # its framing (Content-Length, last chunk) says it ended
    chunked: bool

    def json(self) -> dict[str, Any]:
        found = json.loads(self.body)
        assert isinstance(found, dict)
        return found


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until(sock: socket.socket, enough: Callable[[bytes], bool], timeout: float) -> bytes:
    """Bytes until enough(bytes) holds; fails at EOF or after timeout seconds."""
    data = b""
    deadline = time.monotonic() + timeout
    while not enough(data):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        assert chunk, f"EOF before the expected bytes; got {data!r}"
        data += chunk
    return data


def read_to_end(sock: socket.socket, timeout: float, data: bytes = b"") -> Seen:
    """Every byte until EOF or a reset; "timeout" if neither came within timeout seconds."""
    deadline = time.monotonic() + timeout
    last_at: float | None = time.time() if data else None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return Seen(data, "timeout", last_at, time.time())
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError as exc:
            if exc.errno in (errno.ECONNRESET, errno.EPIPE):
                return Seen(data, "reset", last_at, time.time())
            raise
        if not chunk:
            return Seen(data, "eof", last_at, time.time())
        data += chunk
        last_at = time.time()


def parse_responses(data: bytes) -> tuple[list[Response], bytes]:
    """The HTTP/1.x responses in data, and the bytes after the last one (a partial one)."""
    found: list[Response] = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            break
        lines = data[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        rest = data[end + 4 :]
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body, complete, rest = _dechunk(rest)
            found.append(Response(status, headers, body, complete, chunked=True))
        elif "content-length" in headers:
            length = int(headers["content-length"])
            body, rest = rest[:length], rest[length:]
            found.append(Response(status, headers, body, len(body) == length, chunked=False))
        else:  # until the connection ends
            found.append(Response(status, headers, rest, True, chunked=False))
            rest = b""
        data = rest
        if not found[-1].complete:
            break
    return found, data


def _dechunk(data: bytes) -> tuple[bytes, bool, bytes]:
    body = b""
    while True:
        line_end = data.find(b"\r\n")
        if line_end < 0:
            return body, False, b""
        size = int(data[:line_end].split(b";")[0], 16)
        chunk_end = line_end + 2 + size
        if len(data) < chunk_end + 2:
            return body + data[line_end + 2 :], False, b""
        body += data[line_end + 2 : chunk_end]
        data = data[chunk_end + 2 :]
        if size == 0:  # no trailers from uvicorn: the CRLF after the last chunk ends it
            return body, True, data


def one_response(data: bytes) -> Response:
    responses, rest = parse_responses(data)
    assert (len(responses), rest) == (1, b""), (responses, rest)
    return responses[0]


def request(path: str, version: str = "1.1", *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/{version}", "Host: trap", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def server_has_read(port: int, client: socket.socket) -> Callable[[], bool]:
    """Has a process accepted client's connection and read every byte it sent?

    The server side's line in /proc/net/tcp: an inode once accepted, rx_queue 0 once read.
    """
    client_port = client.getsockname()[1]

    def check() -> bool:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, queues, inode = fields[1], fields[2], fields[4], fields[9]
            if int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) == (
                client_port
            ):
                return inode != "0" and int(queues.split(":")[1], 16) == 0
        return False

    return check


# -- the master's side ---------------------------------------------------------------------


@contextlib.contextmanager
def trap_master(rescue: bool, *args: str) -> Iterator[Master]:
    """One uvicorn worker under handoff, with debug events (worker.signalled)."""
    argv = ["--workers", "1", "--log-level", "debug", *args]
    argv += ["--rescue-keepalive"] if rescue else []
    with running(UVICORN, args=argv, env={"PYTHONPATH": str(APPS)}) as master:
        yield master


def old_worker(master: Master) -> int:
    return int(master.named("worker.spawned")[0]["pid"])


def stamp(event: Event) -> float:
    """An event's timestamp (UTC, ISO) as seconds since the epoch, like time.time()."""
    return datetime.datetime.fromisoformat(str(event["timestamp"])).timestamp()


@dataclass
class Reloaded:
    mark: int
    old: int
    signalled_at: float  # the old worker's stop signal (worker.signalled's timestamp)


def reload_until_signalled(master: Master, gate: Path | None = None) -> Reloaded:
    """Reload; return once the master reports the old worker's stop signal, and open the
    gate: the old worker's gated answer ends its ``then`` seconds later."""
    old = old_worker(master)
    mark = master.mark()
    outcome = master.reload()
    assert outcome["event"] == "reload.succeeded", outcome
    signalled = master.wait_for("worker.signalled", 30, after=mark, where=lambda e: e["pid"] == old)
    if gate is not None:
        gate.touch()
    return Reloaded(mark, old, stamp(signalled))


def finished(master: Master, reloaded: Reloaded, rescue: bool) -> Event | None:
    """The old worker's rescue.finished (None without rescue, after checking there is none)."""
    master.wait_for("generation.gone", 30, after=reloaded.mark, where=lambda e: e["gen"] == 1)
    assert not master.named("rescue.unavailable")
    if not rescue:
        assert master.named("rescue.copied") == []
        assert master.named("rescue.finished") == []
        return None
    event = master.wait_for(
        "rescue.finished", 15, after=reloaded.mark, where=lambda e: e["pid"] == reloaded.old
    )
    assert event["copied"] == 1, event
    return event


def report(name: str, rescue: bool, seen: Seen, event: Event | None, **more: object) -> None:
    """One line for the run's record (pytest -s / -rP)."""
    rescued = None if event is None else {k: event[k] for k in ("handed", "released")}
    summary = [(r.status, r.complete, len(r.body)) for r in parse_responses(seen.data)[0]]
    delay = f"{seen.eof_delay:.3f}" if seen.last_at is not None else "-"
    print(
        f"\n{name} rescue={rescue}: responses={summary} end={seen.end} "
        f"eof_after_last_byte_s={delay} rescue.finished={rescued} {more}"
    )


def gated(path: str, gate: Path, then: float) -> str:
    return f"{path}?s=10&gate={gate}&then={then}"


# -- 1, 2: a request in flight, the client reads until EOF ---------------------------------


def _in_flight_until_eof(
    tmp_path: Path, rescue: bool, timing: str, version: str, *headers: str
) -> tuple[Seen, Event | None, Reloaded]:
    gate = tmp_path / "gate"
    path = gated("/slow", gate, THEN_S) if timing == "in-window" else "/slow?s=2"
    with trap_master(rescue) as master:
        port = master.wait_ready()
        with connect(port) as sock:
            sock.sendall(request(path, version, *headers))
            wait_until(server_has_read(port, sock), 10, "the worker to read the request")
            reloaded = reload_until_signalled(master, gate)
            seen = read_to_end(sock, HOLD_S + 8)
        return seen, finished(master, reloaded, rescue), reloaded


def _assert_answer_then_eof(seen: Seen, reloaded: Reloaded, timing: str) -> Response:
    assert seen.end == "eof", seen
    response = one_response(seen.data)
    assert (response.status, response.complete) == (200, True), response
    assert response.json()["generation"] == "1", response
    assert response.json()["path"] == "/slow", response
    assert seen.last_at is not None
    assert seen.last_at > reloaded.signalled_at, "the answer ended before the stop signal"
    if timing == "in-window":
        assert seen.last_at - reloaded.signalled_at < 0.5, "the answer ended outside the window"
    assert seen.eof_delay < EOF_AFTER_LAST_BYTE_S, seen
    return response


def _released_after_answer(event: Event | None, timing: str) -> None:
    if event is not None:
        assert event["handed"] == 0, event
        assert event["released"] == ({"quiet": 1} if timing == "in-window" else {"busy": 1})


@pytest.mark.timeout(60)
@TIMINGS
@MODES
def test_http10_request_in_flight_ends_with_eof_right_after_the_answer(
    tmp_path: Path, rescue: bool, timing: str
) -> None:
    seen, event, reloaded = _in_flight_until_eof(tmp_path, rescue, timing, "1.0")
    report("http/1.0 in flight", rescue, seen, event, timing=timing)

    _assert_answer_then_eof(seen, reloaded, timing)
    _released_after_answer(event, timing)


@pytest.mark.timeout(60)
@TIMINGS
@MODES
def test_connection_close_request_in_flight_ends_with_eof_right_after_the_answer(
    tmp_path: Path, rescue: bool, timing: str
) -> None:
    seen, event, reloaded = _in_flight_until_eof(
        tmp_path, rescue, timing, "1.1", "Connection: close"
    )
    report("http/1.1 connection: close in flight", rescue, seen, event, timing=timing)

    response = _assert_answer_then_eof(seen, reloaded, timing)
    assert response.headers.get("connection") == "close", response
    _released_after_answer(event, timing)


# -- 3: a chunked stream in progress --------------------------------------------------------


@pytest.mark.timeout(60)
@TIMINGS
@MODES
def test_stream_in_progress_is_complete_then_eof(tmp_path: Path, rescue: bool, timing: str) -> None:
    gate = tmp_path / "gate"
    path = gated("/stream", gate, THEN_S) if timing == "in-window" else "/stream?s=3"
    with trap_master(rescue) as master:
        port = master.wait_ready()
        with connect(port) as sock:
            sock.sendall(request(path))
            started = read_until(sock, lambda data: b"line 0\n" in data, 10)
            reloaded = reload_until_signalled(master, gate)
            seen = read_to_end(sock, HOLD_S + 8, started)
        event = finished(master, reloaded, rescue)
    report("stream in progress", rescue, seen, event, timing=timing)

    assert seen.end == "eof", seen
    response = one_response(seen.data)
    assert (response.status, response.chunked, response.complete) == (200, True, True)
    assert response.body.startswith(b"line 0\n"), response
    assert response.body.endswith(b"end\n"), response
    assert response.headers["x-generation"] == "1"
    assert seen.last_at is not None
    assert seen.last_at > reloaded.signalled_at
    assert seen.eof_delay < EOF_AFTER_LAST_BYTE_S, seen
    if event is not None:
        assert event["handed"] == 0, event
        # A stream that ends in the window: the worker wrote after its signal and closed,
        # the master waits ANSWER_GRACE_S (0.1 s) for the client's next request: "quiet".
        assert event["released"] == ({"quiet": 1} if timing == "in-window" else {"busy": 1})


# -- 4: the drain timeout kills the worker mid-request --------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("drain", ["1", "0.3"])
@MODES
def test_request_killed_by_the_drain_timeout_ends_at_the_kill(rescue: bool, drain: str) -> None:
    with trap_master(rescue, "--drain-timeout", drain) as master:
        port = master.wait_ready()
        with connect(port) as sock:
            sent_at = time.time()
            sock.sendall(request("/slow?s=5"))
            wait_until(server_has_read(port, sock), 10, "the worker to read the request")
            reloaded = reload_until_signalled(master)
            seen = read_to_end(sock, 3.5)  # well below the answer's 5 s (+ a hold)
        killed = master.wait_for("worker.killed", 10, where=lambda e: e["pid"] == reloaded.old)
        event = finished(master, reloaded, rescue)
    after_signal = seen.end_at - reloaded.signalled_at
    after_kill = seen.end_at - stamp(killed)
    report(
        "killed by the drain timeout",
        rescue,
        seen,
        event,
        drain=drain,
        end_after_signal_s=round(after_signal, 3),
        end_after_kill_s=round(after_kill, 3),
    )

    assert (seen.end in CLOSED, seen.data) == (True, b""), seen
    assert seen.end_at - sent_at < 5.0
    # At the kill (its event is logged just after it), not earlier: not at the window's end.
    assert float(drain) - 0.05 < after_signal < float(drain) + 0.5, after_signal
    assert -0.2 < after_kill < 0.2, after_kill
    if event is not None:
        # Still the worker's at the window's end (0.5 s): busy; killed inside it: killed.
        assert event["handed"] == 0, event
        assert event["released"] == ({"busy": 1} if drain == "1" else {"killed": 1})


# -- 5: a pipelined pair in flight ----------------------------------------------------------


@pytest.mark.timeout(60)
@TIMINGS
@MODES
def test_pipelined_pair_in_flight_gets_no_extra_answer(
    tmp_path: Path, rescue: bool, timing: str
) -> None:
    gate = tmp_path / "gate"
    slow = gated("/slow", gate, THEN_S if timing == "in-window" else LATE_THEN_S)
    with trap_master(rescue) as master:
        port = master.wait_ready()
        with connect(port) as sock:
            sock.sendall(request(slow) + request("/"))
            wait_until(server_has_read(port, sock), 10, "the worker to read both requests")
            reloaded = reload_until_signalled(master, gate)
            seen = read_to_end(sock, HOLD_S + 8)
        event = finished(master, reloaded, rescue)
    report("pipelined pair", rescue, seen, event, timing=timing)

    # uvicorn answers the first and closes at its shutdown: the second is never answered.
    assert seen.end == "eof", seen
    responses, rest = parse_responses(seen.data)
    assert [(r.status, r.complete, r.json()["path"]) for r in responses] == [(200, True, "/slow")]
    assert rest == b""
    assert responses[0].json()["generation"] == "1"
    assert seen.eof_delay < EOF_AFTER_LAST_BYTE_S, seen
    if event is not None:
        assert event["handed"] == 0, event
        assert event["released"] == ({"quiet": 1} if timing == "in-window" else {"busy": 1})


# -- 6, 7, 8 and the control: an idle keep-alive connection's next bytes after the reload ---

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HTTP2_SETTINGS = struct.pack(">I", 6)[1:] + bytes([0x4, 0x0]) + struct.pack(">I", 0)
HTTP2_SETTINGS += struct.pack(">HI", 0x3, 100)  # one setting: MAX_CONCURRENT_STREAMS 100
WEBSOCKET = request(
    "/ws",
    "1.1",
    "Upgrade: websocket",
    "Connection: Upgrade",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version: 13",
)


def _client_hello() -> bytes:
    """A well-formed TLS 1.2 ClientHello record (one cipher suite, SNI "trap")."""
    name = b"trap"
    sni = struct.pack(">HHHBH", 0, len(name) + 5, len(name) + 3, 0, len(name)) + name
    extensions = sni
    body = (
        b"\x03\x03"
        + bytes(range(32))  # random
        + b"\x00"  # no session id
        + struct.pack(">H", 2)
        + b"\xc0\x2f"  # TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        + b"\x01\x00"  # compression: null
        + struct.pack(">H", len(extensions))
        + extensions
    )
    handshake = b"\x01" + struct.pack(">I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack(">H", len(handshake)) + handshake


def _answered(data: bytes) -> bool:
    return any(response.complete for response in parse_responses(data)[0])


def _next_bytes_after_the_reload(
    rescue: bool, payload: bytes, *args: str
) -> tuple[Seen, Event | None]:
    """An idle keep-alive connection (one answer read), a reload, payload sent once the old
    worker has exited (it closed the connection; with rescue, the master holds it)."""
    with trap_master(rescue, *args) as master:
        port = master.wait_ready()
        with connect(port) as sock:
            sock.sendall(request("/"))
            first = one_response(read_until(sock, _answered, 10))
            assert first.json()["generation"] == "1", first
            reloaded = reload_until_signalled(master)
            master.wait_for(
                "worker.exited", 10, after=reloaded.mark, where=lambda e: e["pid"] == reloaded.old
            )
            sent_after = time.time() - reloaded.signalled_at
            assert sent_after < HOLD_S / 2, f"sent {sent_after:.2f} s after the signal"
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                sock.sendall(payload)
            seen = read_to_end(sock, HOLD_S + 3)
        event = finished(master, reloaded, rescue)
    return seen, event


def _assert_closed_unanswered(seen: Seen, event: Event | None, reason: str) -> None:
    assert (seen.end in CLOSED, seen.data) == (True, b""), seen
    if event is not None:
        assert event["handed"] == 0, event
        assert event["released"] == {reason: 1}, event


@pytest.mark.timeout(60)
@MODES
def test_http2_preface_on_a_rescued_connection_is_not_handed_on(rescue: bool) -> None:
    seen, event = _next_bytes_after_the_reload(rescue, HTTP2_PREFACE + HTTP2_SETTINGS)
    report("http/2 preface", rescue, seen, event)
    _assert_closed_unanswered(seen, event, "not_http1")


@pytest.mark.timeout(60)
@MODES
def test_tls_client_hello_on_a_rescued_connection_is_not_handed_on(rescue: bool) -> None:
    seen, event = _next_bytes_after_the_reload(rescue, _client_hello())
    report("tls client hello", rescue, seen, event)
    _assert_closed_unanswered(seen, event, "not_http1")


@pytest.mark.timeout(60)
@MODES
def test_websocket_upgrade_on_a_rescued_connection_is_not_handed_on(rescue: bool) -> None:
    seen, event = _next_bytes_after_the_reload(rescue, WEBSOCKET)
    report("websocket upgrade", rescue, seen, event)
    _assert_closed_unanswered(seen, event, "upgrade")


@pytest.mark.timeout(60)
def test_websocket_upgrade_on_a_fresh_connection_is_accepted() -> None:
    """The app does serve /ws: an upgrade the master relayed would have been answered."""
    with trap_master(False) as master:
        port = master.wait_ready()
        with connect(port) as sock:
            sock.sendall(WEBSOCKET)
            head = read_until(sock, lambda data: b"\r\n\r\n" in data, 10)
    assert head.startswith(b"HTTP/1.1 101 "), head


@pytest.mark.timeout(60)
@MODES
def test_control_plain_request_on_an_idle_connection_is_answered_only_with_rescue(
    rescue: bool,
) -> None:
    seen, event = _next_bytes_after_the_reload(rescue, request("/"))
    report("control: plain GET", rescue, seen, event)

    if not rescue:
        assert (seen.end in CLOSED, seen.data) == (True, b""), seen  # the race rescue is for
        return
    assert seen.end == "eof", seen
    response = one_response(seen.data)
    assert (response.status, response.complete) == (200, True), response
    assert response.json()["generation"] == "2", response
    assert response.headers.get("connection") == "close", response
    assert seen.eof_delay < EOF_AFTER_LAST_BYTE_S, seen
    assert event is not None
    assert (event["handed"], event["released"]) == (1, {}), event


# -- what a client may send on a rescued connection: bounded, never crashes the master ---

NEVER_ENDING_HEAD = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 20_000
CHUNKED_POST = (
    b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
)
STALLED_LINE = b"GET /echo HT"  # and nothing more


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (NEVER_ENDING_HEAD, "head_too_large"),
        (CHUNKED_POST, "request_body"),
        (STALLED_LINE, "hold_timeout"),
    ],
    ids=["head-too-large", "chunked-body", "stalled-line"],
)
def test_what_cannot_be_handed_on_is_released_within_the_hold(payload: bytes, reason: str) -> None:
    started = time.monotonic()
    seen, event = _next_bytes_after_the_reload(True, payload)
    report(reason, True, seen, event)
    _assert_closed_unanswered(seen, event, reason)
    assert time.monotonic() - started < 30


@pytest.mark.timeout(60)
def test_a_rescued_post_goes_on_whole_with_the_clients_address_when_asked() -> None:
    body = b"x" * 100_000
    post = b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + body
    seen, event = _next_bytes_after_the_reload(True, post, "--rescue-forwarded", "x-forwarded-for")
    report("post with body", True, seen, event)
    response = one_response(seen.data)
    assert (response.status, response.complete) == (200, True), response
    echoed = response.json()
    assert echoed["generation"] == "2", echoed
    assert echoed["body_length"] == len(body), echoed
    assert echoed["x-forwarded-for"] == "127.0.0.1", echoed
    assert echoed["connection"] == "close", echoed
    assert event is not None
    assert (event["handed"], event["released"]) == (1, {}), event
