"""Reloads under continuous load: nothing refused, nothing failed, the new code answers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from tests.integration.harness import APPS, Load, Master, running
from tests.integration.http import get

RELOADS = 10


def demo_app(version_file: Path) -> list[str]:
    return [sys.executable, "-m", "handoff.demo.app", "--version-file", str(version_file)]


def reload_under_load(
    master: Master, version_file: Path, *, reloads: int, per_reload: int = 100
) -> Load:
    """Reload `reloads` times under load; after each, the new version must answer."""
    port = master.wait_ready()
    with Load(port) as load:
        load.wait_for_requests(per_reload)
        for number in range(1, reloads + 1):
            version_file.write_text(f"v{number}")
            outcome = master.reload()
            assert outcome["event"] == "reload.succeeded", outcome
            replaced = outcome["gen"] - 1
            master.wait_for("generation.gone", where=lambda e, g=replaced: e["gen"] == g)
            for _ in range(5):
                status, body = get(port)
                assert (status, body["version"]) == (200, f"v{number}")
            load.wait_for_requests(per_reload)
    return load


def assert_no_failures(load: Load) -> None:
    stats = load.stats
    assert stats.total_failures() == 0, stats.to_dict()


def assert_clean_exit(master: Master) -> None:
    master.signal(signal.SIGTERM)
    assert master.wait_exit(60) == 0
    assert master.named("master.exited")[-1]["exit_code"] == 0
    _, alive = psutil.wait_procs(master.live_workers(), timeout=5)
    assert not alive


@pytest.mark.timeout(120)
def test_notify_server_reloads_under_load_with_zero_failures(tmp_path: Path) -> None:
    version = tmp_path / "version"
    version.write_text("v0")
    with running(demo_app(version), args=["--workers", "2", "--ready", "notify"]) as master:
        load = reload_under_load(master, version, reloads=RELOADS)
        assert_no_failures(load)
        assert {str(g) for g in range(1, RELOADS + 2)} <= set(load.stats.by_generation)
        assert_clean_exit(master)


GUNICORN_VARIANTS = {
    "fd-placeholder": ["--bind", "fd://{fd}"],
    "listen-fds": [],
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("variant", GUNICORN_VARIANTS)
def test_gunicorn_reloads_under_load_with_zero_failures(tmp_path: Path, variant: str) -> None:
    version = tmp_path / "version"
    version.write_text("v0")
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    command = [
        gunicorn,
        *GUNICORN_VARIANTS[variant],
        "--workers",
        "2",
        "--preload",
        "--chdir",
        str(APPS),
        "--graceful-timeout",
        "20",
        "versioned_app:wsgi",
    ]
    env = {"VERSION_FILE": str(version)}
    with running(command, args=["--ready", "notify"], env=env) as master:
        load = reload_under_load(master, version, reloads=RELOADS, per_reload=50)
        assert_no_failures(load)
        assert_clean_exit(master)


@pytest.mark.timeout(180)
def test_uvicorn_reloads_under_load_with_zero_refused_and_zero_fresh_failures(
    tmp_path: Path,
) -> None:
    """uvicorn never sends READY=1: --ready auto (the default) sees it accepting in /proc.

    The master takes each old worker off the listening socket before its stop signal, so
    no fresh connection is accepted and dropped unread at its shutdown. uvicorn closes
    idle keep-alive connections when it shuts down, which a client can see as an EOF on a
    reused connection (the keep-alive race): those are counted, not asserted.
    """
    version = tmp_path / "version"
    version.write_text("v0")
    uvicorn = str(Path(sys.executable).with_name("uvicorn"))
    command = [
        uvicorn,
        "--fd",
        "{fd}",
        "--app-dir",
        str(APPS),
        "--log-level",
        "warning",
        "versioned_app:asgi",
    ]
    env = {"VERSION_FILE": str(version)}
    with running(command, args=["--workers", "2"], env=env) as master:
        load = reload_under_load(master, version, reloads=RELOADS, per_reload=50)
        stats = load.stats
        print("uvicorn under reloads:", stats.to_dict())
        assert stats.failures.get("refused", 0) == 0, stats.to_dict()
        assert sum(stats.failures_fresh.values()) == 0, stats.to_dict()
        assert {e["via"] for e in master.named("worker.ready")} == {"auto"}
        assert {e["path"] for e in master.named("worker.detached")} == {"epoll"}
        assert stats.ok > 1000
        assert_clean_exit(master)


def open_fds(pid: int) -> Counter[str]:
    """The master's open fds by kind (a pidfd's number may change, its count may not).

    /proc files are left out: psutil opens one for a moment while the master reaps, and
    the listing may catch it open.
    """
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if not target.startswith("/proc/"):
                kinds[re.sub(r"\d+", "N", target)] += 1
    return kinds


@pytest.mark.timeout(60)
def test_two_hundred_reloads_leave_the_master_fd_count_unchanged() -> None:
    with running(["sleep", "1000"], args=["--ready", "delay:0"]) as master:
        master.wait_ready()
        before = open_fds(master.pid)
        for _ in range(200):
            assert master.reload()["event"] == "reload.succeeded"
        master.wait_for("generation.gone", where=lambda e: e["gen"] == 200)
        after = open_fds(master.pid)
        assert after == before, f"before: {before}\nafter: {after}"
        assert len(master.live_workers()) == 1
        assert_clean_exit(master)


@pytest.mark.timeout(90)
def test_fifty_hups_in_one_second_coalesce_and_serve_the_newest(tmp_path: Path) -> None:
    version = tmp_path / "version"
    version.write_text("v0")
    with running(demo_app(version), args=["--workers", "2"]) as master:
        port = master.wait_ready()
        with Load(port) as load:
            load.wait_for_requests(100)
            for number in range(1, 51):
                version.write_text(f"v{number}")
                master.signal(signal.SIGHUP)
                time.sleep(0.02)  # pacing, not synchronisation: 50 signals over one second
            mark = master.mark()
            # The last HUP either started a reload or queued one; both end with v50 serving.
            while get(port)[1]["version"] != "v50":
                master.wait_for("reload.succeeded", 30, after=mark)
                mark = master.mark()
            load.wait_for_requests(100)
        assert_no_failures(load)
        started = master.named("generation.started")
        assert 2 <= len(started) <= 15, len(started)
        assert_clean_exit(master)


NOISY_WORKER = """
import os, time
while True:
    os.write(2, b"worker output line " + b"." * 60 + b"\\n")
    time.sleep(0.0005)
"""


@pytest.mark.timeout(60)
def test_log_lines_stay_whole_while_workers_write_to_the_same_stderr() -> None:
    with running([sys.executable, "-c", NOISY_WORKER], args=["--ready", "delay:0.05"]) as master:
        master.wait_for("master.ready")
        for _ in range(30):
            assert master.reload()["event"] == "reload.succeeded"
        master.signal(signal.SIGTERM)
        assert master.wait_exit(30) == 0
        for line in master.lines:
            assert line.startswith(("{", "worker output line ")), line
            if line.startswith("{"):
                json.loads(line)  # a master line split by a worker's write would not parse
            else:
                assert line == "worker output line " + "." * 60, line
