"""handoff behind a real nginx with upstream keep-alive, GET and POST load, 10 reloads.

nginx is configured as production configures it (docs/fleet.md): `keepalive 16` in the
upstream, HTTP/1.1 and an empty Connection header to the app, so nginx keeps a pool of
idle connections to the workers and reuses them. A server whose old workers close those
idle connections at SIGTERM races nginx: nginx may send a request on a connection the
worker has just closed. nginx retries such a GET on a new connection by itself, but not a
POST (not idempotent): that POST gets a 502. Servers that drain idle keep-alive
connections properly (answer, then close) give zero 5xx; for the others the 502s are
measured (printed, and in docs/fleet.md) and the remedy, `proxy_next_upstream error
timeout non_idempotent`, is tested to bring them to zero.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.balancers import NGINX_RETRY_POST, BalancerLoad, needs_nginx, nginx
from tests.integration.harness import APPS, Master, running

BIN = Path(sys.executable).parent
RELOADS = 10
PER_RELOAD = 100
pytestmark = needs_nginx


def _demo(version: Path) -> list[str]:
    return [sys.executable, "-m", "handoff.demo.app", "--version-file", str(version)]


def _gunicorn_gthread(version: Path) -> list[str]:
    return [
        str(BIN / "gunicorn"),
        "--bind",
        "fd://{fd}",
        "-k",
        "gthread",
        "--threads",
        "4",
        "--workers",
        "2",
        "--preload",
        "--graceful-timeout",
        "20",
        "--no-control-socket",
        "versioned_app:wsgi",
    ]


def _uvicorn(version: Path) -> list[str]:
    return [
        str(BIN / "uvicorn"),
        "--fd",
        "{fd}",
        "--timeout-graceful-shutdown",
        "20",
        "--log-level",
        "warning",
        "versioned_app:asgi",
    ]


def _hypercorn(version: Path) -> list[str]:
    return [
        str(BIN / "hypercorn"),
        "--bind",
        "fd://{fd}",
        "--graceful-timeout",
        "20",
        "versioned_app:asgi",
    ]


@dataclass(frozen=True)
class Case:
    server: str
    command: Callable[[Path], list[str]]
    workers: int
    drains_keepalive: bool  # answers, then closes: zero 5xx without any nginx remedy


CASES = [
    Case("demo", _demo, 2, True),
    Case("gunicorn-gthread", _gunicorn_gthread, 1, True),
    Case("uvicorn", _uvicorn, 2, False),
    Case("hypercorn", _hypercorn, 2, False),
]


def wait_gone(master: Master, gen: int) -> None:
    master.wait_for("generation.gone", where=lambda e: e["gen"] == gen)


def reloads_through_nginx(
    tmp_path: Path, case: Case, extra: str = "", handoff_args: tuple[str, ...] = ()
) -> BalancerLoad:
    """RELOADS reloads of `case` behind nginx under GET and POST load; the load's counts."""
    version = tmp_path / "version"
    version.write_text("v0")
    env = {"VERSION_FILE": str(version), "PYTHONPATH": str(APPS)}
    args = ["--ready", "auto", "--workers", str(case.workers), "--drain-timeout", "30"]
    args += ["--control", str(tmp_path / "control.sock")]  # not the default: tests run in parallel
    args += handoff_args
    command = case.command(version)
    with running(command, args=args, binds=("127.0.0.2:0",), env=env) as master:
        port = master.wait_ready()
        with (
            nginx(tmp_path / "nginx", f"127.0.0.2:{port}", extra=extra) as (host, nport),
            BalancerLoad(host, nport) as load,
        ):
            load.wait_for_requests(PER_RELOAD)
            for number in range(1, RELOADS + 1):
                version.write_text(f"v{number}")
                outcome = master.reload()
                assert outcome["event"] == "reload.succeeded", outcome
                wait_gone(master, outcome["gen"] - 1)
                load.wait_for_requests(PER_RELOAD)
        print(f"{case.server} behind nginx, {RELOADS} reloads: {load.summary()}")
        return load


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.server)
def test_reloads_behind_nginx_keepalive(tmp_path: Path, case: Case) -> None:
    load = reloads_through_nginx(tmp_path, case)
    assert not load.errors, load.summary()  # nginx itself always answers its clients
    if case.drains_keepalive:
        assert load.server_errors() == 0, load.summary()
    # The others: 502s measured (printed with -s, reported in docs/fleet.md), never a GET.
    assert all(m == "POST" for (m, s), n in load.statuses.items() if s >= 500), load.summary()


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "case", [c for c in CASES if not c.drains_keepalive], ids=lambda c: c.server
)
def test_retrying_posts_removes_the_502s(tmp_path: Path, case: Case) -> None:
    load = reloads_through_nginx(tmp_path, case, extra=NGINX_RETRY_POST)
    assert not load.errors, load.summary()
    assert load.server_errors() == 0, load.summary()


@pytest.mark.timeout(240)
def test_keepalive_rescue_removes_the_502s(tmp_path: Path) -> None:
    """--rescue-keepalive (docs/rescue.md) with nginx as it is configured: no nginx remedy,
    uvicorn, whose old workers close idle upstream connections at SIGTERM."""
    case = next(c for c in CASES if c.server == "uvicorn")
    load = reloads_through_nginx(tmp_path, case, handoff_args=("--rescue-keepalive",))
    assert not load.errors, load.summary()
    assert load.server_errors() == 0, load.summary()
    assert {m for m, s in load.statuses} == {"GET", "POST"}, load.summary()
