"""Keep-alive rescue on the server matrix: 16 keep-alive clients and fresh ones, 10 reloads.

For each server whose shutdown closes its idle keep-alive connections at once (uvicorn on
h11 and on httptools, hypercorn, aiohttp, gunicorn's UvicornWorker, Node.js's plain
``server.close()``, Go's plain ``Shutdown``), the same run twice: without
``--rescue-keepalive`` it must reproduce today's failures (so the test proves the
feature, not the load), and with it not one request may fail. The servers that already
drain properly, and those without keep-alive, run once with rescue: it must change
nothing (zero failures). Each run is recorded in the matrix (suite "rescue"), rendered
into docs/servers.md's keep-alive rescue table by bench/servers_table.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration import matrix, test_servers_other, test_servers_python
from tests.integration.harness import APPS, running
from tests.integration.test_servers_other import _runtime_or_skip, go_bin  # noqa: F401

pytestmark = pytest.mark.integration
if os.geteuid() != 0:
    pytestmark = [pytestmark, pytest.mark.skip(reason="pidfd_getfd needs root (ptrace)")]

KEEPALIVE_CLIENTS = 16
FRESH_CLIENTS = 2


@dataclass(frozen=True)
class Case:
    key: str
    server: str
    variant: str
    command: Callable[[Path], list[str]]
    workers: int
    runtime: str = ""  # an executable the case needs besides Python
    env: tuple[tuple[str, str], ...] = ()
    races: bool = True  # its shutdown closes idle keep-alive connections: fails without
    # Its shutdown() sends the FIN itself before close(), which no copy can hold back
    # (docs/rescue.md, limits): rescue cannot help it.
    half_closes: bool = False


def _python_case(key: str, variant: str, *, races: bool = True, half_closes: bool = False) -> Case:
    found = next(c for c in test_servers_python.CASES if c.variant == variant)
    command = found.command
    return Case(
        key,
        found.server,
        variant,
        lambda _: command(),
        found.workers,
        races=races,
        half_closes=half_closes,
    )


def _other_case(key: str, *, races: bool = True, half_closes: bool = False) -> Case:
    found = next(c for c in test_servers_other.CASES if c.key == key)
    workers = int(found.handoff_args[found.handoff_args.index("--workers") + 1])
    return Case(
        key,
        found.server,
        found.variant,
        found.command,
        workers,
        runtime=found.runtime,
        env=tuple(found.env.items()),
        races=races,
        half_closes=half_closes,
    )


# The servers the issue names run in every CI run; the rest of the matrix (gunicorn's
# UvicornWorker, and the servers that do not race) with HANDOFF_FULL_MATRIX=1, as when
# docs/servers.md's rescue table is regenerated.
FULL_MATRIX = pytest.mark.skipif(
    not os.environ.get("HANDOFF_FULL_MATRIX"),
    reason="the full rescue matrix: set HANDOFF_FULL_MATRIX=1 (docs/servers.md)",
)

CASES = [
    _python_case("uvicorn-h11", "asyncio + h11"),
    _python_case("uvicorn-httptools", "uvloop + httptools"),
    _python_case("hypercorn", "--bind fd://{fd}", half_closes=True),
    _python_case("aiohttp", "web.run_app(sock=fd 3)"),
    pytest.param(
        _python_case("gunicorn-uvicornworker", "uvicorn.workers.UvicornWorker, --bind fd://{fd}"),
        marks=FULL_MATRIX,
    ),
    _other_case("node-plain"),
    _other_case("go-plain"),
]
# Drained properly already, or no keep-alive: rescue must change nothing.
HARMLESS = [
    _python_case("gunicorn-gthread", "gthread --threads 4, --bind fd://{fd}", races=False),
    _python_case("gunicorn-sync", "sync, --bind fd://{fd}", races=False),
    _python_case("waitress", "create_server(sockets=[fd 3]) launcher", races=False),
    _other_case("node-graceful", races=False),
    _other_case("go-graceful", races=False),
]


def _run(request: pytest.FixtureRequest, tmp_path: Path, case: Case, *, rescue: bool) -> None:
    if case.runtime:
        _runtime_or_skip(case.runtime)
    bin_dir = request.getfixturevalue("go_bin") if case.runtime == "go" else tmp_path
    version = tmp_path / "version"
    version.write_text("v0")
    command = case.command(bin_dir)
    env = {"VERSION_FILE": str(version), "PYTHONPATH": str(APPS), **dict(case.env)}
    args = ["--ready", "auto", "--workers", str(case.workers), "--drain-timeout", "30"]
    args += ["--rescue-keepalive"] if rescue else []
    reloads = matrix.RESCUE_RELOADS if case.races else matrix.RELOADS
    with running(command, args=args, env=env) as master:
        port = master.wait_ready()
        load, mark = matrix.reload_under_load(
            master, version, port, reloads=reloads, keepalive=KEEPALIVE_CLIENTS, fresh=FRESH_CLIENTS
        )
        stats = load.stats
        finished = master.named("rescue.finished", after=mark)
        rescued = matrix.rescue_totals(finished)
        matrix.record_rescue(
            master,
            server=case.server,
            variant=case.variant,
            command=command,
            rescue=rescue,
            reloads=reloads,
            clients=KEEPALIVE_CLIENTS,
            stats=stats,
            totals=rescued,
            mark=mark,
        )
        summary = {**stats.to_dict(), "rescued": rescued}
        print(f"{case.key} rescue={rescue}: {summary}")
        assert not master.named("rescue.unavailable"), summary
        if rescue:
            _assert_rescued(case, stats.total_failures(), rescued, summary)
        else:
            assert sum(stats.failures_fresh.values()) == 0, summary
            assert sum(stats.failures_keepalive.values()) > 0, summary  # today's race
            assert finished == [], summary
        matrix.assert_stops_cleanly(master)


# Releases that can cost the client its request: the server itself read the request (or
# its first byte) and dropped it, or the counters could not rule out a pipelining client.
# Each is what the client would have seen without rescue; docs/rescue.md explains them.
DOUBT = ("unanswered", "quiet", "not_http1", "pipelined")


def _assert_rescued(
    case: Case, failed: int, rescued: dict[str, Any], summary: dict[str, Any]
) -> None:
    released: dict[str, int] = rescued["released"]
    if not case.races:
        assert failed == 0, summary
    elif case.half_closes:
        # Its own FIN reached the client (shutdown() before close()): let go at once.
        assert released.get("closed", 0) >= rescued["copied"] // 2, summary
    else:
        assert rescued["handed"] > 0, summary
        # Every failure is one of the releases above, and they are fewer: without rescue,
        # every copied connection fails once (aiohttp, the worst here, reads and drops
        # 1 to 4 requests of 16 per reload by itself).
        assert failed <= sum(released.get(reason, 0) for reason in DOUBT), summary
        assert failed <= rescued["copied"] // 2, summary


@pytest.mark.timeout(150)
@pytest.mark.parametrize("rescue", [False, True], ids=["without", "with"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.key)
def test_keepalive_rescue_under_load(
    request: pytest.FixtureRequest, tmp_path: Path, case: Case, rescue: bool
) -> None:
    _run(request, tmp_path, case, rescue=rescue)


@pytest.mark.timeout(150)
@FULL_MATRIX
@pytest.mark.parametrize("case", HARMLESS, ids=lambda c: c.key)
def test_rescue_changes_nothing_where_nothing_races(
    request: pytest.FixtureRequest, tmp_path: Path, case: Case
) -> None:
    _run(request, tmp_path, case, rescue=True)
