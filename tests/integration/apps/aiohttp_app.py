"""versioned_app served by aiohttp on the socket handoff hands over (fd 3, LISTEN_FDS).

    handoff run -- python aiohttp_app.py

aiohttp's run_app takes a ready socket (`sock=`) and calls listen() on it again with its
own `backlog` (default 128, which would lower the shared accept queue for every worker):
pass a large one, the kernel caps it at net.core.somaxconn. On SIGTERM run_app stops
listening, closes idle keep-alive connections, lets requests in flight finish (up to
`shutdown_timeout`) and returns.
"""

from __future__ import annotations

import os
import socket

import versioned_app
from aiohttp import web

LISTEN_FDS_START = 3


async def handle(request: web.Request) -> web.Response:
    body = versioned_app._body()
    headers = {k: v for k, v in versioned_app._headers(body) if k != "Content-Length"}
    return web.Response(body=body, headers=headers)


def main() -> None:
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        raise SystemExit("expected one socket in LISTEN_FDS: run me under 'handoff run'")
    sock = socket.socket(fileno=LISTEN_FDS_START)
    app = web.Application()
    app.router.add_get("/", handle)
    web.run_app(app, sock=sock, backlog=65535, shutdown_timeout=20, print=None, access_log=None)


if __name__ == "__main__":
    main()
