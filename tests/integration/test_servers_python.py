"""The Python server matrix: each server under handoff, under load, through reloads.

Every case runs the server as docs/servers.md tells users to, with keep-alive and
fresh-connection load, and reloads it RELOADS times with a new version on disk; after
each reload the new version must answer. Then: zero refused connections, zero failed
fresh-connection requests, and the measured numbers go to the matrix
(tests/integration/matrix.py, rendered into docs/servers.md by bench/servers_table.py).
Keep-alive failures are recorded, not asserted: a server that closes idle keep-alive
connections at shutdown races its clients (docs/protocol.md, "The idle keep-alive race").
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration import matrix
from tests.integration.harness import APPS, running
from tests.integration.matrix import (
    listener_backlog,
    reload_under_load,
)

READY = ["--ready", "auto"]
BIN = Path(sys.executable).parent
BACKLOG = "65535"  # servers that call listen() again: the kernel caps it at somaxconn


def _uvicorn(*extra: str) -> list[str]:
    return [
        str(BIN / "uvicorn"),
        "--fd",
        "{fd}",
        *extra,
        "--backlog",
        BACKLOG,
        "--timeout-graceful-shutdown",
        "20",
        "--log-level",
        "warning",
        "versioned_app:asgi",
    ]


def _gunicorn(*extra: str, app: str = "versioned_app:wsgi") -> list[str]:
    return [
        str(BIN / "gunicorn"),
        *extra,
        "--workers",
        "2",
        "--preload",
        "--graceful-timeout",
        "20",
        "--backlog",
        BACKLOG,
        "--no-control-socket",
        app,
    ]


@dataclass(frozen=True)
class Case:
    server: str
    variant: str
    command: Callable[[], list[str]]
    workers: int = 2  # handoff workers; 1 for servers with their own worker processes
    notes: str = ""


CASES = [
    Case(
        "uvicorn",
        "asyncio + h11",
        lambda: _uvicorn("--loop", "asyncio", "--http", "h11"),
        notes="closes idle keep-alive at SIGTERM",
    ),
    Case(
        "uvicorn",
        "uvloop + httptools",
        lambda: _uvicorn("--loop", "uvloop", "--http", "httptools"),
        notes="closes idle keep-alive at SIGTERM",
    ),
    Case(
        "gunicorn",
        "sync, --bind fd://{fd}",
        lambda: _gunicorn("--bind", "fd://{fd}"),
        workers=1,
        notes="2 gunicorn workers; sync worker: no keep-alive; READY=1 at arbiter boot",
    ),
    Case(
        "gunicorn",
        "sync, LISTEN_FDS",
        _gunicorn,
        workers=1,
        notes="2 gunicorn workers; sync worker: no keep-alive; READY=1 at arbiter boot",
    ),
    Case(
        "gunicorn",
        "gthread --threads 4, --bind fd://{fd}",
        lambda: _gunicorn("--bind", "fd://{fd}", "-k", "gthread", "--threads", "4"),
        workers=1,
        notes="2 gunicorn workers; idle keep-alive: next answer closes; READY=1 at arbiter boot",
    ),
    Case(
        "gunicorn",
        "uvicorn.workers.UvicornWorker, --bind fd://{fd}",
        lambda: _gunicorn(
            "--bind", "fd://{fd}", "-k", "uvicorn.workers.UvicornWorker", app="versioned_app:asgi"
        ),
        workers=1,
        notes="2 gunicorn workers; closes idle keep-alive at SIGTERM; READY=1 at arbiter boot",
    ),
    Case(
        "gunicorn",
        "UvicornWorker, READY=1 withheld (env -u NOTIFY_SOCKET)",
        lambda: [
            "env",
            "-u",
            "NOTIFY_SOCKET",
            *_gunicorn(
                "--bind",
                "fd://{fd}",
                "-k",
                "uvicorn.workers.UvicornWorker",
                app="versioned_app:asgi",
            ),
        ],
        workers=1,
        notes="2 gunicorn workers; ready when a worker accepts, not at arbiter boot",
    ),
    Case(
        "hypercorn",
        "--bind fd://{fd}",
        lambda: [
            str(BIN / "hypercorn"),
            "--bind",
            "fd://{fd}",
            "--backlog",
            BACKLOG,
            "--graceful-timeout",
            "20",
            "versioned_app:asgi",
        ],
        notes="serves from a child process; closes idle keep-alive at SIGTERM",
    ),
    Case(
        "aiohttp",
        "web.run_app(sock=fd 3)",
        lambda: [sys.executable, str(APPS / "aiohttp_app.py")],
        notes="closes idle keep-alive at SIGTERM",
    ),
    Case(
        "waitress",
        "create_server(sockets=[fd 3]) launcher",
        lambda: [sys.executable, str(APPS / "waitress_launcher.py")],
        notes="the launcher drains on SIGTERM (waitress alone dies of it)",
    ),
]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.server}-{c.variant}")
def test_server_reloads_under_load(tmp_path: Path, case: Case) -> None:
    version = tmp_path / "version"
    version.write_text("v0")
    command = case.command()
    env = {"VERSION_FILE": str(version), "PYTHONPATH": str(APPS)}
    args = [*READY, "--workers", str(case.workers), "--drain-timeout", "30"]
    with running(command, args=args, env=env) as master:
        port = master.wait_ready()
        load, mark = reload_under_load(master, version, port)
        backlog = listener_backlog(port)
        stats = load.stats
        matrix.record_run(
            master,
            server=case.server,
            variant=case.variant,
            command=command,
            notes=case.notes,
            stats=stats,
            mark=mark,
        )
        matrix.assert_nothing_refused_or_lost(stats, backlog)
        # auto proved every new worker ready: from /proc, or by the server's own READY=1.
        ready = master.named("worker.ready", after=mark)
        assert {e.get("via") for e in ready} <= {"auto", "notify"}, ready
        matrix.assert_stops_cleanly(master)
