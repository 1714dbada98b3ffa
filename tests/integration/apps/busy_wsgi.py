"""A WSGI app that takes REQUEST_S seconds (default 0.02) per request, for gunicorn's sync
workers: with more clients than workers, every worker is always busy with a connection
it accepted (never caught waiting on the listening socket), as under real load.

Answers with its generation in X-Handoff-Generation, like versioned_app.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

REQUEST_S = float(os.environ.get("REQUEST_S", "0.02"))
GENERATION = os.environ.get("HANDOFF_GENERATION", "?")


def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    time.sleep(REQUEST_S)
    body = f'{{"generation": "{GENERATION}", "pid": {os.getpid()}}}'.encode()
    start_response(
        "200 OK",
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("X-Handoff-Generation", GENERATION),
        ],
    )
    return [body]
