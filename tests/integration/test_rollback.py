"""Blue-green at the socket, on real servers under real load (docs/rollback.md).

- For every event loop detach supports (asyncio: uvicorn h11; uvloop: uvicorn httptools;
  selectors: gunicorn gthread; libuv: Node.js; netpoll: Go): a reload parks the previous
  generation (--keep-previous), then ``rollback`` puts it back on the socket. Zero refused
  connections, zero failed fresh-connection requests; the first request after the rollback
  is answered by a pid of the previous generation; the switch time is printed.
- Automatic rollback: a release that starts crashing 2 s after it became ready, and one
  whose --verify http: endpoint starts failing, are rolled back within the window, and
  ``handoff reload --verify`` exits 1 with the reason.

Progressive rollouts and the restart path: test_rollout.py.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest

from handoff.cli.control_client import exchange
from handoff.demo.load import FailureClass, LoadStats
from tests.integration.harness import APPS, Load, Master, running
from tests.integration.http import get
from tests.integration.test_servers_other import _runtime_or_skip, go_bin  # noqa: F401
from tests.integration.waiting import wait_until

pytestmark = pytest.mark.integration
if os.geteuid() != 0:
    pytestmark = [pytestmark, pytest.mark.skip(reason="pidfd_getfd needs root (ptrace)")]

BIN = Path(sys.executable).parent
SERVERS_DIR = APPS / "servers"
KEEP = "120"


def uvicorn(loop: str = "asyncio", http: str = "h11", app_dir: str = str(APPS)) -> list[str]:
    return [
        str(BIN / "uvicorn"),
        *("--fd", "{fd}", "--loop", loop, "--http", http, "--log-level", "warning"),
        *("--app-dir", app_dir, "versioned_app:asgi"),
    ]


def _gunicorn(_: pytest.FixtureRequest) -> list[str]:
    return [
        str(BIN / "gunicorn"),
        *("--bind", "fd://{fd}", "-k", "gthread", "--threads", "4", "--workers", "1"),
        *("--no-control-socket", "--chdir", str(APPS), "versioned_app:wsgi"),
    ]


def _node(_: pytest.FixtureRequest) -> list[str]:
    _runtime_or_skip("node")
    return ["node", str(SERVERS_DIR / "node_server.js"), "--fd", "{fd}"]


def _go(request: pytest.FixtureRequest) -> list[str]:
    _runtime_or_skip("go")
    return [str(request.getfixturevalue("go_bin") / "go_server"), "-fd", "{fd}"]


# The event loops detach (and so reattach) supports, by the server that runs each.
SERVERS: dict[str, Callable[[pytest.FixtureRequest], list[str]]] = {
    "uvicorn-h11-asyncio": lambda _: uvicorn("asyncio", "h11"),
    "uvicorn-httptools-uvloop": lambda _: uvicorn("uvloop", "httptools"),
    "gunicorn-gthread-selectors": _gunicorn,
    "node-libuv": _node,
    "go-netpoll": _go,
}


def control(path: Path, request: Mapping[str, object], timeout: float = 60.0) -> dict[str, Any]:
    """The result line of one control request (an error line fails the test)."""
    lines = list(exchange(str(path), {"v": 1, **request}, timeout))
    assert lines, "no answer"
    last = lines[-1]
    assert last.get("type") == "result", lines
    return last


def gen_pids(master: Master, gen: int) -> set[int]:
    return {int(e["pid"]) for e in master.named("worker.spawned") if e["gen"] == gen}


def worker_of(pid: int, workers: set[int]) -> int | None:
    """The worker (of workers) whose process tree pid is in: gunicorn answers from a child."""
    process = psutil.Process(pid)
    return next((p.pid for p in [process, *process.parents()] if p.pid in workers), None)


def assert_clean(stats: LoadStats) -> None:
    summary = stats.to_dict()
    assert stats.failures.get(FailureClass.REFUSED, 0) == 0, summary
    assert sum(stats.failures_fresh.values()) == 0, summary


@pytest.fixture
def version(tmp_path: Path) -> Path:
    path = tmp_path / "version"
    path.write_text("v1")
    return path


@pytest.mark.timeout(240)
@pytest.mark.parametrize("server", list(SERVERS))
def test_rollback_puts_the_parked_generation_back_under_load(
    request: pytest.FixtureRequest, tmp_path: Path, version: Path, server: str
) -> None:
    command = SERVERS[server](request)
    ctl = tmp_path / "ctl.sock"
    args = ["--workers", "2", "--keep-previous", KEEP, "--control", str(ctl)]
    env = {"VERSION_FILE": str(version), "DRAIN": "graceful"}
    with running(command, args=args, env=env) as master:
        port = master.wait_ready(90)
        with Load(port) as load:
            load.wait_for_requests(100)
            version.write_text("v2")
            assert master.reload(90)["event"] == "reload.succeeded"
            parked = master.wait_for("generation.parked")
            assert parked["gen"] == 1
            assert parked["workers"] == 2
            old = gen_pids(master, 1)
            wait_until(lambda: get(port)[1].get("version") == "v2", 10, "v2 to answer")
            load.wait_for_requests(100)

            result = control(ctl, {"cmd": "rollback"})
            status, first = get(port)

            assert result["ok"] is True, result
            assert result["path"] == "reattach", result
            assert (status, first.get("version")) == (200, "v1"), first
            assert worker_of(first["pid"], old), f"answered by {first['pid']}, not in {old}"
            reattached = master.wait_for("worker.reattached")
            assert reattached["registrations"] == reattached["recorded"] >= 1, reattached
            took = [e["took_ms"] for e in master.named("worker.reattached")]
            print(f"{server}: switch {result['switch_ms']} ms, reattach {took} ms per worker")
            load.wait_for_requests(200)
        master.wait_for("generation.gone", 60, where=lambda e: e["gen"] == 2)
        for _ in range(5):
            assert get(port)[1].get("version") == "v1"
    assert_clean(load.stats)
    assert {"1", "2"} <= set(load.stats.by_generation), load.stats.to_dict()


def verified(
    ctl: Path, version: Path, *, workers: int, keep: str, rollback_after: int
) -> contextlib.AbstractContextManager[Master]:
    """uvicorn workers under a master with --keep-previous and --verify http:/healthz."""
    args = [
        *("--workers", str(workers), "--keep-previous", keep, "--control", str(ctl)),
        *("--verify", "http:/healthz", "--verify-interval", "0.5"),
        *("--rollback-after", str(rollback_after)),
    ]
    return running(uvicorn(), args=args, env={"VERSION_FILE": str(version)})


def _reload_verify(ctl: Path) -> subprocess.Popen[str]:
    """``handoff reload --verify``, running until the window ends or a rollback."""
    return subprocess.Popen(
        [sys.executable, "-m", "handoff", "reload", "--verify", "--control", str(ctl)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture
def clients() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for client in started:
        if client.poll() is None:
            client.kill()
        client.communicate(timeout=10)


def failures_from(stats: LoadStats, since: int, wanted: int, load: Load) -> int:
    """Failed requests while `wanted` more requests succeed, from a count taken before."""
    load.wait_for_requests(wanted)
    return stats.total_failures() - since


@pytest.mark.timeout(180)
def test_a_release_that_starts_crashing_is_rolled_back_by_itself(
    tmp_path: Path, version: Path, clients: list[subprocess.Popen[str]]
) -> None:
    ctl = tmp_path / "ctl.sock"
    args = ["--workers", "2", "--keep-previous", KEEP, "--rollback-after", "2"]
    command = uvicorn()
    with running(
        command, args=[*args, "--control", str(ctl)], env={"VERSION_FILE": str(version)}
    ) as master:
        port = master.wait_ready(60)
        old = gen_pids(master, 1)
        with Load(port) as load:
            load.wait_for_requests(100)
            version.write_text("crashing")
            reload = _reload_verify(ctl)
            clients.append(reload)
            rolled = master.wait_for("reload.rolled_back", 30)
            before = load.stats.total_failures()
            out, _ = reload.communicate(timeout=30)
            after = failures_from(load.stats, before, 300, load)
            status, body = get(port)

        assert rolled["source"] == "automatic"
        assert rolled["path"] == "reattach"
        assert "2 worker crashes in the window" in rolled["reason"]
        assert reload.returncode == 1, out
        assert "rolled back (reattach)" in out, out
        assert "crashes" in out, out
        assert (status, body.get("version")) == (200, "v1")
        assert body["pid"] in old
        assert after == 0, load.stats.to_dict()
        # Before the rollback: only requests the crashing workers held (printed, bounded).
        print(f"failed while the new release crashed: {before}")
        assert load.stats.failures.get(FailureClass.REFUSED, 0) == 0


@pytest.mark.timeout(180)
def test_a_release_whose_verify_endpoint_fails_is_rolled_back(
    tmp_path: Path, version: Path, clients: list[subprocess.Popen[str]]
) -> None:
    ctl = tmp_path / "ctl.sock"
    with verified(ctl, version, workers=2, keep=KEEP, rollback_after=3) as master:
        port = master.wait_ready(60)
        old = gen_pids(master, 1)
        with Load(port, keepalive=0, fresh=4) as load:
            load.wait_for_requests(100)
            version.write_text("unhealthy")  # (fresh-only load: see test_rollout.py)
            began = time.monotonic()
            reload = _reload_verify(ctl)
            clients.append(reload)
            out, _ = reload.communicate(timeout=60)
            took = time.monotonic() - began
            load.wait_for_requests(300)
            status, body = get(port)

        assert reload.returncode == 1, out
        assert "--verify failed 3 times in a row" in out, out
        assert "HTTP 500" in out, out
        rolled = master.named("reload.rolled_back")[0]
        assert (rolled["source"], rolled["path"]) == ("automatic", "reattach")
        assert len(master.named("verify.failed")) >= 3
        assert (status, body.get("version")) == (200, "v1")
        assert body["pid"] in old
        assert took < float(KEEP)
    assert_clean(load.stats)
    assert load.stats.total_failures() == 0, load.stats.to_dict()


@pytest.mark.timeout(120)
def test_a_healthy_release_is_confirmed_at_the_end_of_the_window(
    tmp_path: Path, version: Path, clients: list[subprocess.Popen[str]]
) -> None:
    ctl = tmp_path / "ctl.sock"
    with verified(ctl, version, workers=1, keep="3", rollback_after=3) as master:
        master.wait_ready(60)
        version.write_text("v2")
        reload = _reload_verify(ctl)
        clients.append(reload)
        out, _ = reload.communicate(timeout=60)

        assert reload.returncode == 0, out
        assert "reload confirmed: generation 2" in out, out
        confirmed = master.wait_for("reload.confirmed")
        assert confirmed["checks"] >= 3
        master.wait_for("generation.gone", 30, where=lambda e: e["gen"] == 1)


@pytest.mark.timeout(120)
def test_an_exec_verify_that_starts_failing_rolls_back(
    tmp_path: Path, clients: list[subprocess.Popen[str]]
) -> None:
    ctl = tmp_path / "ctl.sock"
    marker = tmp_path / "bad"
    check = f"exec:test ! -e {marker} || test $HANDOFF_GENERATION = 1"
    args = [
        *("--workers", "2", "--keep-previous", KEEP, "--control", str(ctl)),
        *("--verify", check, "--verify-interval", "0.2", "--rollback-after", "2"),
    ]
    command = [sys.executable, "-m", "handoff.demo.app"]
    with running(command, args=args) as master:
        port = master.wait_ready(60)
        old = gen_pids(master, 1)
        reload = _reload_verify(ctl)
        clients.append(reload)
        master.wait_for("reload.succeeded", 30)
        marker.write_text("the new generation is bad")
        out, _ = reload.communicate(timeout=60)
        status, body = get(port)

    assert reload.returncode == 1, out
    assert "--verify failed 2 times in a row: exec:" in out, out
    assert "exited 1" in out, out
    assert status == 200
    assert body["pid"] in old
