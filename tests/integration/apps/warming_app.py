"""An ASGI app that accepts before it is warm, like one loading a model or a cache.

Run by uvicorn (``uvicorn warming_app:app --fd {fd}``). Its clock starts at import, and
WARM_S (seconds, or ``never``) is read then from the file WARM_FILE if that is set (so a
reload can deploy another value), else from the environment:

- ``/healthz`` answers 503 until WARM_S seconds have passed, then 200. The first 200
  each process gives is appended to READY_LOG as a JSON line: its pid, generation and
  ``time.time()``, so a test can check that handoff called the worker ready only after
  it said so itself. WARM_S=never: always 503.
- Any other path is a real request: it waits until the app is warm (as a request that
  needs the model would), then answers 200 with the generation in X-Handoff-Generation.
  With WARM_S=never it is answered at once.

Like a real deployment, the kernel hands this worker its share of the connections as
soon as it accepts: readiness cannot keep traffic away from a new worker that accepts,
only decide when the old generation is drained.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

STARTED = time.monotonic()
if os.environ.get("WARM_FILE"):
    with open(os.environ["WARM_FILE"], encoding="utf-8") as _f:
        _WARM = _f.read().strip()
else:
    _WARM = os.environ.get("WARM_S", "1.5")
WARM_S = float("inf") if _WARM == "never" else float(_WARM)
READY_LOG = os.environ.get("READY_LOG", "")
GENERATION = os.environ.get("HANDOFF_GENERATION", "?")
_said_ready = False


def _warm() -> bool:
    return time.monotonic() - STARTED >= WARM_S


def _log_first_ready() -> None:
    global _said_ready  # noqa: PLW0603 - one flag per process, set once
    if _said_ready or not READY_LOG:
        return
    _said_ready = True
    line = json.dumps({"pid": os.getpid(), "gen": GENERATION, "t": time.time()}) + "\n"
    with open(READY_LOG, "a", encoding="utf-8") as f:
        f.write(line)


async def app(
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
    if scope["path"] == "/healthz":
        status = 200 if _warm() else 503
        if status == 200:
            _log_first_ready()
        body = b"ok\n" if status == 200 else b"warming up\n"
    else:
        if math.isfinite(WARM_S):
            await asyncio.sleep(max(0.0, WARM_S - (time.monotonic() - STARTED)))
        status = 200
        body = json.dumps({"generation": GENERATION, "pid": os.getpid()}).encode()
    headers = [
        (b"content-type", b"application/json" if status == 200 else b"text/plain"),
        (b"content-length", str(len(body)).encode()),
        (b"x-handoff-generation", GENERATION.encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
