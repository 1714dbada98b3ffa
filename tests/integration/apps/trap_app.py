"""An ASGI app for the keep-alive rescue traps (tests/integration/test_rescue_traps.py).

Plain ASGI, no framework: what goes on the wire is uvicorn's own doing.

  GET /              a JSON answer at once: {"generation": ..., "pid": ..., "path": ...}
  GET /slow?s=2      the same answer after s seconds
  GET /stream?s=3    a streamed answer (chunked on HTTP/1.1): one line every 0.1 s for s seconds
  /ws (WebSocket)    accepted, then every message echoed back

/slow and /stream also take ``gate=PATH`` and ``then=SECONDS``: they end ``then`` seconds
after the file PATH exists (polled every 10 ms), or after s seconds, whichever comes first.
The tests create the file when the master reports the old worker's stop signal, so the
answer ends at a known moment after it (inside the rescue window) whatever the reload took.
The generation is HANDOFF_GENERATION, which the master gives each worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

GENERATION = os.environ.get("HANDOFF_GENERATION", "?")
TICK_S = 0.01  # the gate's polling interval
LINE_S = 0.1  # between two lines of /stream

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def _body(path: str) -> bytes:
    return json.dumps({"generation": GENERATION, "pid": os.getpid(), "path": path}).encode()


async def _echo(scope: dict[str, Any], receive: Receive) -> bytes:
    length, more = 0, True
    while more:
        message = await receive()
        length += len(message.get("body", b""))
        more = bool(message.get("more_body"))
    headers = {name.decode(): value.decode() for name, value in scope["headers"]}
    return json.dumps(
        {
            "generation": GENERATION,
            "body_length": length,
            "client": scope["client"][0] if scope.get("client") else None,
            "x-forwarded-for": headers.get("x-forwarded-for"),
            "connection": headers.get("connection"),
        }
    ).encode()


def _params(scope: dict[str, Any]) -> dict[str, str]:
    query = parse_qs(scope.get("query_string", b"").decode())
    return {key: values[-1] for key, values in query.items()}


class Deadline:
    """Until when an answer lasts: s seconds, or `then` seconds after the gate file exists."""

    def __init__(self, params: dict[str, str], default_s: float) -> None:
        self.end = time.monotonic() + float(params.get("s", default_s))
        self.gate = Path(params["gate"]) if "gate" in params else None
        self.then = float(params.get("then", "0"))

    def remaining(self) -> float:
        now = time.monotonic()
        if self.gate is not None and self.gate.exists():
            self.end = min(self.end, now + self.then)
            self.gate = None
        return self.end - now


async def _wait(deadline: Deadline, at_most: float) -> None:
    """Sleep at_most seconds, or less if the deadline comes first (the gate polled)."""
    until = time.monotonic() + at_most
    while (left := min(deadline.remaining(), until - time.monotonic())) > 0:
        await asyncio.sleep(min(left, TICK_S) if deadline.gate is not None else left)


async def _answer(send: Send, body: bytes) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-generation", GENERATION.encode()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _stream(send: Send, deadline: Deadline) -> None:
    headers = [(b"content-type", b"text/plain"), (b"x-generation", GENERATION.encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    line = 0
    while deadline.remaining() > 0:
        body = f"line {line}\n".encode()
        await send({"type": "http.response.body", "body": body, "more_body": True})
        line += 1
        await _wait(deadline, LINE_S)
    await send({"type": "http.response.body", "body": b"end\n"})


async def _websocket(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.accept"})
        elif message["type"] == "websocket.receive":
            await send(
                {"type": "websocket.send", **{k: v for k, v in message.items() if k != "type"}}
            )
        else:
            return


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] == "websocket":
        await _websocket(receive, send)
        return
    path = scope["path"]
    params = _params(scope)
    if path == "/slow":
        deadline = Deadline(params, 2.0)
        await _wait(deadline, deadline.remaining())
        await _answer(send, _body(path))
    elif path == "/stream":
        await _stream(send, Deadline(params, 3.0))
    elif path == "/echo":  # what a request brought: its body's length, who sent it
        await _answer(send, await _echo(scope, receive))
    else:
        await _answer(send, _body(path))
