"""A WSGI and ASGI app that reports the version it read at start-up and its generation.

VERSION_FILE (env) is read once at import: a reload proves that the new generation runs
the code and configuration as they are on disk now.

Some contents stand for bad releases (bench/peers and the rollback tests deploy them); any
other content is served as it is:

  broken     the import raises RuntimeError, as a release with a bug at start-up would
  slow       the import takes SLOW_IMPORT_S seconds, then the app serves version "slow"
  crashing   serves, then the process exits 1 CRASH_AFTER_S seconds after the import
  unhealthy  GET /healthz answers 200 for UNHEALTHY_AFTER_S seconds after the import, then 500

GET /healthz answers 200 otherwise (the body as for any path). With FAIL_SLOT set (an
--env-file value) the worker whose HANDOFF_WORKER equals it raises at import: one bad
batch of a --rollout. RELEASE_ENV (another --env-file value), if set, is in the body.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

with open(os.environ["VERSION_FILE"]) as _f:
    VERSION = _f.read().strip()
SLOW_IMPORT_S = 3.0
CRASH_AFTER_S = 2.0
UNHEALTHY_AFTER_S = 2.0
IMPORTED_AT = time.monotonic()
if VERSION == "broken":
    raise RuntimeError("broken release (on purpose)")
if os.environ.get("FAIL_SLOT") not in (None, "") and os.environ.get("FAIL_SLOT") == os.environ.get(
    "HANDOFF_WORKER"
):
    raise RuntimeError(f"worker {os.environ['FAIL_SLOT']} of this release fails (on purpose)")
if VERSION == "slow":
    time.sleep(SLOW_IMPORT_S)
if VERSION == "crashing":
    threading.Timer(CRASH_AFTER_S, os._exit, args=(1,)).start()
GENERATION = os.environ.get("HANDOFF_GENERATION", "?")
RELEASE_ENV = os.environ.get("RELEASE_ENV", "")


def _body() -> bytes:
    env = f', "env": "{RELEASE_ENV}"' if RELEASE_ENV else ""
    return (
        f'{{"version": "{VERSION}", "generation": "{GENERATION}", "pid": {os.getpid()}{env}}}'
    ).encode()


def _status(path: str) -> str:
    late = time.monotonic() - IMPORTED_AT > UNHEALTHY_AFTER_S
    return (
        "500 Internal Server Error"
        if path == "/healthz" and VERSION == "unhealthy" and late
        else "200 OK"
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
    start_response(_status(str(environ.get("PATH_INFO", "/"))), _headers(body))
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
    status = int(_status(str(scope.get("path", "/"))).split()[0])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
