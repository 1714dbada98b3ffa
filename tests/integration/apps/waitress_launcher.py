"""versioned_app served by waitress on the socket handoff hands over (fd 3, LISTEN_FDS).

    handoff run -- python waitress_launcher.py

`waitress-serve` cannot take a file descriptor, so this launcher builds the server with
`waitress.server.create_server(app, sockets=[socket.socket(fileno=3)])`. It passes a large
`backlog`: waitress calls listen() on the socket again (default 1024), which sets the
accept queue of every worker sharing it; the kernel caps it at net.core.somaxconn.

waitress has no SIGTERM handler of its own: the default action kills it at once, losing
the requests in flight and dropping every keep-alive connection. This launcher drains:

1. stop accepting: the listener leaves waitress's select() set (the socket stays open:
   the master and the other workers keep the port);
2. every response from then on says `Connection: close` and closes its connection, so
   each keep-alive client's next request is answered, not cut off;
3. exit when no connection is left, or DRAIN_GRACE_S after the signal (connections that
   stay silent that long are closed then).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any

import versioned_app
from waitress.channel import HTTPChannel
from waitress.server import create_server
from waitress.task import WSGITask

LISTEN_FDS_START = 3
DRAIN_GRACE_S = 10.0


class Drain:
    since: float | None = None  # time.monotonic() of the stop signal


class DrainingTask(WSGITask):  # type: ignore[misc]
    def build_response_header(self) -> bytes:
        if Drain.since is not None:
            self.set_close_on_finish()  # adds "Connection: close" and closes after it
        return super().build_response_header()  # type: ignore[no-any-return]


class DrainingChannel(HTTPChannel):  # type: ignore[misc]
    task_class = DrainingTask


def main() -> None:
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        raise SystemExit("expected one socket in LISTEN_FDS: run me under 'handoff run'")
    sock = socket.socket(fileno=LISTEN_FDS_START)
    server: Any = create_server(versioned_app.wsgi, sockets=[sock], backlog=65535, threads=4)
    server.channel_class = DrainingChannel

    def stop(signum: int, frame: object) -> None:
        if Drain.since is None:
            Drain.since = time.monotonic()
            server.accepting = False  # readable() is now False: out of the select() set
            server.pull_trigger()  # wake select() so that the next round leaves it out

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        server.asyncore.loop(timeout=0.5, map=server._map, count=1)
        if Drain.since is not None:
            channels = [c for c in server._map.values() if isinstance(c, HTTPChannel)]
            if not channels or time.monotonic() - Drain.since > DRAIN_GRACE_S:
                break
    server.task_dispatcher.shutdown()


if __name__ == "__main__":
    main()
