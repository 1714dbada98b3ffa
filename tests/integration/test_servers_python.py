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

import collections
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from handoff.loadgen import FailureClass
from tests.integration import matrix
from tests.integration.harness import APPS, Event, Load, Master, running
from tests.integration.http import get

READY = ["--ready", "auto"]
RELOADS = 5
PER_RELOAD = 100  # successful requests between reloads (the load never stops)
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


def listener_backlog(port: int) -> int | None:
    """The listening socket's accept queue limit (ss's Send-Q), None without ss."""
    if shutil.which("ss") is None:
        return None
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    return int(out[2]) if len(out) >= 3 else None


def _summary(values: list[str]) -> str:
    """One value if all agree, else each with its count, most common first."""
    counts = collections.Counter(values)
    if len(counts) == 1:
        return values[0]
    return ", ".join(f"{value} x{n}" for value, n in counts.most_common())


def readiness(ready: list[Event]) -> tuple[str, str]:
    """How the reloads' workers were proved ready: (via, most common detail)."""
    via = _summary([str(e.get("via", "?")) for e in ready])
    details = collections.Counter(str(e["detail"]) for e in ready if e.get("detail"))
    return via, details.most_common(1)[0][0] if details else ""


def detach_path(detached: list[Event]) -> str:
    """How old workers were told to stop accepting, from worker.detached events."""
    if not detached:
        return "signal-only (no worker.detached event)"
    paths = []
    for event in detached:
        path = str(event.get("path", "?"))
        if path == "signal-only" and event.get("reason"):
            path = f"signal-only ({event['reason']})"
        paths.append(path)
    return _summary(paths)


def reload_under_load(master: Master, version: Path, port: int) -> tuple[Load, int]:
    """RELOADS reloads under load; the new version answers after each. Returns (load, mark)."""
    with Load(port) as load:
        load.wait_for_requests(PER_RELOAD)
        first = master.mark()
        for number in range(1, RELOADS + 1):
            version.write_text(f"v{number}")
            outcome = master.reload()
            assert outcome["event"] == "reload.succeeded", outcome
            master.wait_for("generation.gone", where=lambda e, g=outcome["gen"] - 1: e["gen"] == g)
            for _ in range(3):
                status, body = get(port)
                assert (status, body.get("version")) == (200, f"v{number}")
            load.wait_for_requests(PER_RELOAD)
    return load, first


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
        ready = master.named("worker.ready", after=mark)
        via, detail = readiness(ready)
        detached = detach_path(master.named("worker.detached", after=mark))
        matrix.record(
            server=case.server,
            variant=case.variant,
            command=command,
            reloads=RELOADS,
            stats=stats,
            ready_via=via,
            ready_detail=detail,
            detach_path=detached,
            notes=case.notes,
        )
        summary = stats.to_dict()
        assert stats.failures.get(FailureClass.REFUSED, 0) == 0, summary
        assert sum(stats.failures_fresh.values()) == 0, summary
        # auto proved every new worker ready: from /proc, or by the server's own READY=1.
        assert {e.get("via") for e in ready} <= {"auto", "notify"}, ready
        assert {f"{g}" for g in range(2, RELOADS + 2)} <= set(stats.by_generation), summary
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
        assert backlog in (None, somaxconn), f"the server lowered the backlog to {backlog}"
        master.signal(signal.SIGTERM)
        assert master.wait_exit(60) == 0
        _, alive = psutil.wait_procs(master.live_workers(), timeout=5)
        assert not alive
