"""An internal fault re-executes the master in place; ``handoff upgrade`` does the same on
purpose. Real masters, real workers, real load.

Faults are injected with the documented failpoint switch (``HANDOFF_FAILPOINT``): the
master raises right after it logs the named event. Each test ends with the master alive
under the same pid, the workers that were serving still serving (unless a reload
replaced them), zero failed requests and a reload that succeeds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.integration.control_harness import demo_app, reload_result, request, serving, status_of
from tests.integration.harness import Load, Master, running
from tests.integration.waiting import wait_until

SRC = Path(__file__).resolve().parents[2] / "src"


def upgrade_result(control: Path) -> dict[str, object]:
    replies = request(control, {"v": 1, "cmd": "upgrade", "wait": True}, timeout=90)
    assert replies[-1]["type"] == "result", replies
    return replies[-1]


def start(tmp_path: Path, failpoint: str = "", **kwargs: object) -> tuple[Master, Path, int]:
    version = tmp_path / "version"
    version.write_text("v1")
    control = tmp_path / "ctl.sock"
    env = dict(kwargs.pop("env", {}) or {})  # type: ignore[call-overload]
    if failpoint:
        env["HANDOFF_FAILPOINT"] = failpoint
    master = Master(
        demo_app(version),
        args=["--workers", "2", "--control", str(control)],
        env=env,
        **kwargs,  # type: ignore[arg-type]
    )
    master.wait_for("master.ready", 60)
    master.wait_for("control.listening", 30)
    return master, control, master.port()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("failpoint", ["reload.requested", "generation.draining"])
def test_an_internal_fault_in_a_reload_re_executes_the_master_and_the_reload_ends_well(
    tmp_path: Path, failpoint: str
) -> None:
    master, control, port = start(tmp_path, failpoint)
    try:
        with Load(port) as load:
            load.wait_for_requests(100)
            result = reload_result(control)
            load.wait_for_requests(200)
            assert result["ok"] is True, result
            assert master.process.poll() is None, "the master died"
            crashed = master.wait_for("master.crashed", 10)
            assert failpoint in str(crashed["error"])
            resumed = master.wait_for("master.resumed", 10)
            assert (resumed["reason"], resumed["lost"]) == ("crash", 0)
            master.wait_for("generation.gone", 60, where=lambda e: e["gen"] == 1)
            assert not master.named("worker.killed"), "a worker was killed"
            old = {e["pid"] for e in master.named("worker.spawned") if e["gen"] == 1}
            exits = [e for e in master.named("worker.exited") if e["pid"] in old]
            assert [e["expected"] for e in exits] == [True, True], exits
            serving_now = serving(control)
            assert reload_result(control)["ok"] is True  # the failpoint fired once only
            load.wait_for_requests(100)
            assert serving(control).isdisjoint(serving_now)
        assert load.stats.total_failures() == 0, load.stats.to_dict()
        assert len(master.named("master.crashed")) == 1
        assert status_of(control)["master"]["pid"] == master.pid
    finally:
        master.kill()


@pytest.mark.timeout(120)
def test_a_master_that_keeps_crashing_stops_its_workers_gracefully(tmp_path: Path) -> None:
    marks = tmp_path / "terms"
    script = f'trap "echo $$ >> {marks}; exit 0" TERM; while :; do sleep 0.05; done'
    control = tmp_path / "ctl.sock"
    env = {"HANDOFF_FAILPOINT": "reload.requested,master.resumed:2"}
    with running(
        ["sh", "-c", script],
        args=["--workers", "2", "--ready", "delay:0", "--control", str(control)],
        env=env,
    ) as master:
        master.wait_ready()
        workers = set(master.worker_pids())
        master.signal(signal.SIGHUP)
        code = master.wait_exit(60)
        assert code != 0
        loop = master.wait_for("master.crash_loop", 5)
        assert loop["crashes"] == 3
        assert len(master.named("master.crashed")) == 3
        got_term = {int(line) for line in marks.read_text().split()}
        assert workers <= got_term, "every worker got the stop signal, not SIGKILL"
        assert not any(psutil.pid_exists(pid) and _alive(pid) for pid in workers)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def master_resources(pid: int) -> tuple[int, int, int]:
    process = psutil.Process(pid)
    return len(os.listdir(f"/proc/{pid}/fd")), process.memory_info().rss, process.num_threads()


@pytest.mark.timeout(300)
def test_twenty_upgrades_under_load_keep_the_pid_the_workers_and_every_request(
    tmp_path: Path,
) -> None:
    master, control, port = start(tmp_path)
    try:
        with Load(port) as load:
            load.wait_for_requests(100)
            reload_result(control)  # one reload first: its old generation's fds are gone
            master.wait_for("generation.gone", 60, where=lambda e: e["gen"] == 1)
            before = serving(control)
            fds, rss, threads = master_resources(master.pid)
            for _ in range(20):
                result = upgrade_result(control)
                assert result["ok"] is True, result
                assert result["pid"] == master.pid
                load.wait_for_requests(20)
            after_fds, after_rss, after_threads = master_resources(master.pid)
            assert serving(control) == before, "a worker was replaced by an upgrade"
            # None leaked (one fewer is a pipe of the replaced generation closed late).
            assert after_fds <= fds, (fds, after_fds)
            assert after_threads == threads == 1
            assert after_rss < rss * 1.5, (rss, after_rss)
            assert reload_result(control)["ok"] is True
            load.wait_for_requests(100)
        assert load.stats.total_failures() == 0, load.stats.to_dict()
        assert status_of(control)["master"]["reexecs"] == 20
        assert len(master.named("upgrade.succeeded")) == 20
    finally:
        master.kill()


@pytest.mark.timeout(180)
def test_a_broken_new_version_fails_its_pre_flight_and_the_old_master_serves_on(
    tmp_path: Path,
) -> None:
    installed = tmp_path / "installed"
    shutil.copytree(SRC / "handoff", installed / "handoff")
    env = {"PYTHONPATH": str(installed)}
    master, control, port = start(tmp_path, env=env)
    try:
        with Load(port) as load:
            load.wait_for_requests(100)
            before = serving(control)
            upgrade = installed / "handoff" / "master" / "upgrade.py"
            good = upgrade.read_text()
            upgrade.write_text(good + '\nraise ImportError("a broken release")\n')
            cli = [sys.executable, "-m", "handoff", "upgrade", "--control", str(control)]
            failed = _run(cli)  # the client is the good code; the master's is broken
            assert failed.returncode == 1, failed
            assert "upgrade failed: the new code failed its pre-flight" in failed.stderr
            assert "a broken release" in failed.stderr
            assert master.process.poll() is None
            assert serving(control) == before
            assert status_of(control)["master"]["version"] == "0.1.0"
            load.wait_for_requests(100)

            upgrade.write_text(good)
            init = installed / "handoff" / "__init__.py"
            init.write_text(init.read_text().replace('"0.1.0"', '"0.2.0"'))
            done = _run(cli)
            assert done.returncode == 0, done
            assert "runs handoff 0.2.0 (was 0.1.0)" in done.stdout
            wait_until(lambda: status_of(control)["master"]["version"] == "0.2.0", 10, "0.2.0 runs")
            assert serving(control) == before
            assert reload_result(control)["ok"] is True
            load.wait_for_requests(100)
        assert load.stats.total_failures() == 0, load.stats.to_dict()
        assert master.process.poll() is None
    finally:
        master.kill()


@pytest.mark.timeout(120)
def test_a_re_exec_after_the_release_was_deleted_keeps_serving(tmp_path: Path) -> None:
    """The command's existence is checked at a fresh start only: a re-executed master whose
    release directory is gone by now takes over its workers; the next reload fails."""
    version = tmp_path / "version"
    version.write_text("v1")
    release = tmp_path / "release"
    release.mkdir()
    app = release / "app"
    app.write_text(
        f'#!/bin/sh\nexec {sys.executable} -m handoff.demo.app --version-file {version} "$@"\n'
    )
    app.chmod(0o755)
    control = tmp_path / "ctl.sock"
    master = Master([str(app)], args=["--workers", "2", "--control", str(control)])
    try:
        master.wait_for("master.ready", 60)
        master.wait_for("control.listening", 30)
        with Load(master.port()) as load:
            load.wait_for_requests(100)
            before = serving(control)
            shutil.rmtree(release)
            mark = master.mark()
            assert upgrade_result(control)["ok"] is True
            master.wait_for("master.resumed", 30, after=mark)
            assert serving(control) == before
            failed = reload_result(control)
            assert failed["ok"] is False, failed
            assert serving(control) == before
            load.wait_for_requests(100)
        assert load.stats.total_failures() == 0, load.stats.to_dict()
        assert status_of(control)["master"]["pid"] == master.pid
    finally:
        master.kill()


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=90, check=False)
