"""Rollback by restart and progressive reloads, on real uvicorn workers under real load
(docs/rollback.md).

- With nothing parked (--keep-previous 0), ``rollback`` starts the previous release again
  from its recorded directory and env-file values, though the release symlink and the env
  file were changed meanwhile; readiness-gated, zero failed requests.
- ``--rollout 1`` with 4 workers: never more than 5 workers alive (sampled every few
  milliseconds), zero failures; a third batch that fails puts the two replaced (parked)
  old workers back: the host ends on the old release entirely.
- ``reload --canary 1`` beside 3 old workers serves part of the traffic (the share is
  measured), then ``promote`` completes the reload; another canary is removed by
  ``rollback``; both with zero failures.

The load is fresh connections only where zero failures of every kind are asserted: uvicorn's
own shutdown closes idle keep-alive connections at once, which loses a keep-alive request
now and then whatever the supervisor does (docs/servers.md; the keep-alive rescue issue).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.integration.harness import APPS, Load, Master, running
from tests.integration.http import get
from tests.integration.test_rollback import assert_clean, control, gen_pids, uvicorn
from tests.integration.waiting import wait_until

pytestmark = pytest.mark.integration
if os.geteuid() != 0:
    pytestmark = [pytestmark, pytest.mark.skip(reason="pidfd_getfd needs root (ptrace)")]

# -- the restart path ------------------------------------------------------------------------


def release(root: Path, name: str) -> Path:
    """releases/NAME: the app, its version file, and its env file (RELEASE_ENV=NAME)."""
    path = root / "releases" / name
    path.mkdir(parents=True)
    shutil.copy(APPS / "versioned_app.py", path)
    (path / "version").write_text(name)
    return path


def flip(current: Path, target: Path) -> None:
    """Point the `current` symlink at target, atomically (as deploy tools do)."""
    tmp = current.with_name("current.tmp")
    tmp.symlink_to(target)
    tmp.replace(current)


@pytest.mark.timeout(180)
def test_rollback_restarts_the_previous_release_from_its_directory_and_values(
    tmp_path: Path,
) -> None:
    r1, r2 = release(tmp_path, "r1"), release(tmp_path, "r2")
    current = tmp_path / "current"
    flip(current, r1)
    env_file = tmp_path / "app.env"
    env_file.write_text("RELEASE_ENV=env-1\n")
    ctl = tmp_path / "ctl.sock"
    args = [
        *("--workers", "2", "--chdir", str(current), "--env-file", str(env_file)),
        *("--control", str(ctl)),
    ]
    with running(uvicorn(app_dir="."), args=args, env={"VERSION_FILE": "version"}) as master:
        port = master.wait_ready(60)
        assert get(port)[1] | {"pid": 0} == {
            "version": "r1",
            "generation": "1",
            "pid": 0,
            "env": "env-1",
        }
        flip(current, r2)
        env_file.write_text("RELEASE_ENV=env-2\n")
        assert master.reload(60)["event"] == "reload.succeeded"
        assert get(port)[1]["version"] == "r2"
        master.wait_for("generation.gone", 60, where=lambda e: e["gen"] == 1)
        # The deploy tool moves on; the rollback must not follow it.
        flip(current, release(tmp_path, "r3"))
        env_file.write_text("RELEASE_ENV=env-3\n")

        with Load(port, keepalive=0, fresh=4) as load:
            load.wait_for_requests(100)
            mark = master.mark()
            result = control(ctl, {"cmd": "rollback"})
            load.wait_for_requests(200)
            bodies = [get(port)[1] for _ in range(4)]

        assert result["ok"] is True, result
        assert result["path"] == "restart", result
        assert result["gen"] == 3, result
        assert {(b["version"], b["env"], b["generation"]) for b in bodies} == {("r1", "env-1", "3")}
        ready = master.named("worker.ready", after=mark)
        assert {e["gen"] for e in ready} == {3}, "readiness-gated like a reload"
        assert master.named("reload.succeeded", after=mark)[0]["gen"] == 3
        for pid in gen_pids(master, 3):
            assert psutil.Process(pid).cwd() == str(r1)
    assert_clean(load.stats)
    assert load.stats.total_failures() == 0, load.stats.to_dict()


# -- --rollout --------------------------------------------------------------------------------


class WorkerCount:
    """Samples how many workers are alive, in a thread, until stopped."""

    def __init__(self, master: Master) -> None:
        self._master = master
        self._stop = threading.Event()
        self.most = 0
        self.samples = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.003):
            alive = 0
            for pid in self._master.worker_pids():
                try:
                    if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                        alive += 1
                except psutil.NoSuchProcess:
                    pass
            self.most = max(self.most, alive)
            self.samples += 1

    def __enter__(self) -> WorkerCount:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def version(tmp_path: Path) -> Path:
    path = tmp_path / "version"
    path.write_text("v1")
    return path


@pytest.mark.timeout(180)
def test_rollout_one_at_a_time_never_runs_more_than_five_of_four(
    tmp_path: Path, version: Path
) -> None:
    args = ["--workers", "4", "--rollout", "1"]
    with running(uvicorn(), args=args, env={"VERSION_FILE": str(version)}) as master:
        port = master.wait_ready(60)
        with Load(port, keepalive=0, fresh=4) as load, WorkerCount(master) as count:
            load.wait_for_requests(100)
            version.write_text("v2")
            outcome = master.reload(120)
            master.wait_for("generation.gone", 60, where=lambda e: e["gen"] == 1)
            load.wait_for_requests(100)

        assert outcome["event"] == "reload.succeeded", outcome
        assert len(master.named("rollout.batch")) == 3
        assert count.samples > 100
        assert count.most <= 5, f"{count.most} workers alive at once"
        assert {get(port)[1]["version"] for _ in range(8)} == {"v2"}
    assert_clean(load.stats)
    assert load.stats.total_failures() == 0, load.stats.to_dict()


@pytest.mark.timeout(180)
def test_a_failing_third_batch_puts_the_replaced_old_workers_back(
    tmp_path: Path, version: Path
) -> None:
    env_file = tmp_path / "app.env"
    env_file.write_text("FAIL_SLOT=\n")
    args = [
        "--workers",
        "4",
        "--rollout",
        "1",
        "--keep-previous",
        "60",
        "--env-file",
        str(env_file),
    ]
    with running(uvicorn(), args=args, env={"VERSION_FILE": str(version)}) as master:
        port = master.wait_ready(60)
        old = gen_pids(master, 1)
        with Load(port, keepalive=0, fresh=4) as load:
            load.wait_for_requests(100)
            version.write_text("v2")
            env_file.write_text("FAIL_SLOT=2\n")  # the release's third worker fails
            outcome = master.reload(120)
            load.wait_for_requests(200)
            answers = [get(port)[1] for _ in range(12)]

        assert outcome["event"] == "reload.failed", outcome
        assert "worker 2" in outcome["reason"]
        assert len(master.named("worker.reattached")) == 2
        restored = master.named("generation.restored")[0]
        assert restored == restored | {"gen": 1, "workers": 2}
        assert {a["version"] for a in answers} == {"v1"}
        assert {a["pid"] for a in answers} <= old
        wait_until(lambda: set(master_serving(master)) == old, 10, "the old workers serving")
    assert_clean(load.stats)
    assert load.stats.total_failures() == 0, load.stats.to_dict()


def master_serving(master: Master) -> list[int]:
    """The pids the status shows ready."""
    status = control_status(master)
    return [w["pid"] for g in status["generations"] for w in g["workers"] if w["phase"] == "ready"]


def control_status(master: Master) -> dict[str, object]:
    path = next(e["path"] for e in master.named("control.listening"))
    result = control(Path(path), {"cmd": "status"})
    status = result["status"]
    assert isinstance(status, dict)
    return status


# -- reload --canary ----------------------------------------------------------------------------


@pytest.fixture
def canary_master(tmp_path: Path, version: Path) -> Iterator[tuple[Master, Path, int]]:
    ctl = tmp_path / "ctl.sock"
    args = ["--workers", "3", "--control", str(ctl)]
    with running(uvicorn(), args=args, env={"VERSION_FILE": str(version)}) as master:
        yield master, ctl, master.wait_ready(60)


def start_canary(ctl: Path, version: Path) -> dict[str, object]:
    version.write_text("canary")
    result = control(ctl, {"cmd": "reload", "canary": 1})
    assert result.get("canary") is True, result
    return result


@pytest.mark.timeout(180)
def test_a_canary_serves_a_share_then_promote_completes_the_reload(
    canary_master: tuple[Master, Path, int], version: Path
) -> None:
    master, ctl, port = canary_master
    with Load(port, keepalive=0, fresh=4) as load:
        load.wait_for_requests(100)
        result = start_canary(ctl, version)
        before = dict(load.stats.by_generation)
        load.wait_for_requests(1500)
        served = {g: n - before.get(g, 0) for g, n in load.stats.by_generation.items()}
        share = served.get("2", 0) / max(1, sum(served.values()))

        promoted = control(ctl, {"cmd": "promote"}, timeout=120)
        master.wait_for("generation.gone", 60, where=lambda e: e["gen"] == 1)
        load.wait_for_requests(200)

    print(f"canary of 1 beside 3: {share:.1%} of {sum(served.values())} requests")
    assert result["beside"] == 1
    assert 0 < share < 1, served
    assert promoted["ok"] is True, promoted
    assert promoted["gen"] == 2
    assert {get(port)[1]["version"] for _ in range(6)} == {"canary"}
    assert_clean(load.stats)
    assert load.stats.total_failures() == 0, load.stats.to_dict()


@pytest.mark.timeout(180)
def test_rollback_removes_the_canary(
    canary_master: tuple[Master, Path, int], version: Path
) -> None:
    master, ctl, port = canary_master
    old = gen_pids(master, 1)
    with Load(port, keepalive=0, fresh=4) as load:
        load.wait_for_requests(100)
        start_canary(ctl, version)
        load.wait_for_requests(300)

        result = control(ctl, {"cmd": "rollback"})
        master.wait_for("generation.gone", 60, where=lambda e: e["gen"] == 2)
        load.wait_for_requests(200)
        answers = [get(port)[1] for _ in range(6)]

    assert (result["ok"], result["path"], result["gen"]) == (True, "cancel", 1), result
    assert {a["version"] for a in answers} == {"v1"}
    assert {a["pid"] for a in answers} <= old
    assert_clean(load.stats)
    assert load.stats.total_failures() == 0, load.stats.to_dict()
