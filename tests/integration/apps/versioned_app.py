"""A WSGI and ASGI app that reports the version it read at start-up and its generation.

VERSION_FILE (env) is read once at import: a reload proves that the new generation runs
the code and configuration as they are on disk now.

Two contents stand for bad releases (bench/peers deploys them); any other content is
served as it is:

  broken  the import raises RuntimeError, as a release with a bug at start-up would
  slow    the import takes SLOW_IMPORT_S seconds, then the app serves version "slow"
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

with open(os.environ["VERSION_FILE"]) as _f:
    VERSION = _f.read().strip()
SLOW_IMPORT_S = 3.0
if VERSION == "broken":
    raise RuntimeError("broken release (on purpose)")
if VERSION == "slow":
    time.sleep(SLOW_IMPORT_S)
GENERATION = os.environ.get("HANDOFF_GENERATION", "?")


def _body() -> bytes:
    return (
        f'{{"version": "{VERSION}", "generation": "{GENERATION}", "pid": {os.getpid()}}}'.encode()
    )


def _headers(body: bytes) -> list[tuple[str, str]]:
    return [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("X-Handoff-Generation", GENERATION),
        ("X-Handoff-Version", VERSION),
    ]


def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    body = _body()
    start_response("200 OK", _headers(body))
    return [body]


async def asgi(
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = _body()
    headers = [(k.lower().encode(), v.encode()) for k, v in _headers(body)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
