"""A release-directory deploy (docs/systemd.md): ``current -> releases/N`` flipped
atomically between reloads, under load. Each generation must run its own release: its
code, its files, its ``/proc/PID/cwd``; and no request may fail.

The releases are real directories, each with its own ``server.py`` (started by a
relative path, so the file run is the release's own) and its own ``VERSION`` (read by
the demo app through a relative ``--version-file``): an answer's version proves which
directory the worker runs in. Once with ``--chdir``, once with the default (the master
started inside ``current`` by a shell, ``PWD`` naming the symlink).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import psutil
import pytest

from tests.integration.control_harness import error_lines, handoff, shown, start
from tests.integration.harness import Event, Load, Master, running
from tests.integration.http import get

SERVER = """\
# Release {number}'s own code: the demo app, reporting this release's VERSION file,
# looked up relative to the directory the worker was started in.
import sys

from handoff.demo.app import main

RELEASE = {number}
sys.exit(main(["--version-file", "VERSION"]))
"""


def make_releases(root: Path, count: int) -> Path:
    """root/releases/1..count, each with its server.py and VERSION; current -> releases/1."""
    for number in range(1, count + 1):
        release = root / "releases" / str(number)
        release.mkdir(parents=True)
        (release / "server.py").write_text(SERVER.format(number=number))
        (release / "VERSION").write_text(f"release-{number}")
    flip(root, 1)
    return root / "current"


def flip(root: Path, number: int) -> None:
    """Point current at releases/number atomically: a new symlink renamed over it."""
    staged = root / "current.new"
    staged.symlink_to(f"releases/{number}")
    os.replace(staged, root / "current")


def generation_pids(master: Master, gen: int) -> list[int]:
    return [e["pid"] for e in master.named("worker.spawned") if e["gen"] == gen]


def assert_runs_release(master: Master, outcome: Event, root: Path, number: int) -> None:
    """Every process of the generation's worker trees runs in releases/number, and a
    fresh connection is answered by that release."""
    expected = str(root / "releases" / str(number))
    pids = generation_pids(master, outcome["gen"])
    assert pids, master.diagnose(f"no worker of generation {outcome['gen']}")
    for pid in pids:
        worker = psutil.Process(pid)
        for proc in [worker, *worker.children(recursive=True)]:
            assert os.readlink(f"/proc/{proc.pid}/cwd") == expected
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"PWD={root / 'current'}".encode() in environ
    port = master.port()
    for _ in range(5):
        status, body = get(port)
        assert status == 200
        assert (body["generation"], body["version"]) == (outcome["gen"], f"release-{number}")


def deploy_under_load(master: Master, root: Path) -> Load:
    """Start on release 1, then flip to 2 and reload, then back to 1 and reload."""
    port = master.wait_ready()
    assert_runs_release(master, master.named("master.ready")[0], root, 1)
    with Load(port) as load:
        load.wait_for_requests(100)
        for number in (2, 1):
            flip(root, number)
            outcome = master.reload()
            assert outcome["event"] == "reload.succeeded", master.diagnose(str(outcome))
            assert_runs_release(master, outcome, root, number)
            load.wait_for_requests(100)
    return load


@pytest.mark.timeout(120)
def test_chdir_follows_the_release_symlink_at_every_reload_under_load(tmp_path: Path) -> None:
    current = make_releases(tmp_path, 2)
    args = ["--workers", "2", "--chdir", str(current)]
    # The master itself runs elsewhere: only --chdir says where the workers go.
    with running([sys.executable, "server.py"], args=args, cwd=Path("/")) as master:
        load = deploy_under_load(master, tmp_path)
        assert load.stats.total_failures() == 0, load.stats.to_dict()
        assert {"1", "2", "3"} <= set(load.stats.by_generation)
        master.signal(signal.SIGTERM)
        assert master.wait_exit(60) == 0


@pytest.mark.timeout(120)
def test_started_in_current_by_a_shell_the_default_follows_the_symlink(tmp_path: Path) -> None:
    current = make_releases(tmp_path, 2)
    # What a shell does after `cd /srv/app/current`: the cwd is the release the symlink
    # named then, PWD is the symlink's name.
    env = {"PWD": str(current)}
    with running(
        [sys.executable, "server.py"], args=["--workers", "2"], cwd=current, env=env
    ) as master:
        load = deploy_under_load(master, tmp_path)
        assert load.stats.total_failures() == 0, load.stats.to_dict()
        master.signal(signal.SIGTERM)
        assert master.wait_exit(60) == 0


@pytest.mark.timeout(60)
def test_a_respawn_stays_in_its_generations_release_after_a_flip(tmp_path: Path) -> None:
    """A generation is one release: `current` flipped before the reload (or left on a
    release that failed) does not reach a worker respawned into the serving generation."""
    current = make_releases(tmp_path, 2)
    with running([sys.executable, "server.py"], args=["--chdir", str(current)]) as master:
        master.wait_ready()
        (first,) = generation_pids(master, 1)
        flip(tmp_path, 2)
        mark = master.mark()
        os.kill(first, signal.SIGKILL)
        respawned = master.wait_for("worker.ready", 30, after=mark)
        assert respawned["gen"] == 1
        assert os.readlink(f"/proc/{respawned['pid']}/cwd") == str(tmp_path / "releases" / "1")
        assert get(master.port())[1]["version"] == "release-1"

        outcome = master.reload()

        assert outcome["event"] == "reload.succeeded", outcome
        assert_runs_release(master, outcome, tmp_path, 2)


@pytest.mark.timeout(120)
def test_a_reexecuted_master_keeps_the_directory_name_and_each_generations_setup(
    tmp_path: Path,
) -> None:
    """handoff upgrade (a re-exec in place) after a flip: the master, started in
    `current` by a shell, keeps following the name (it does not look at the disk again,
    where PWD and getcwd() now differ); generation 1's respawns keep release 1 and its
    env file values; the next reload runs release 2 with the new values."""
    current = make_releases(tmp_path, 2)
    env_file = tmp_path / "app.env"
    env_file.write_text("COLOR=red\n")
    control = tmp_path / "ctl.sock"
    args = ["--workers", "2", "--control", str(control), "--env-file", str(env_file)]
    env = {"PWD": str(current)}
    with running([sys.executable, "server.py"], args=args, cwd=current, env=env) as master:
        start(master, control)
        flip(tmp_path, 2)
        env_file.write_text("COLOR=blue\n")
        mark = master.mark()
        result = handoff("upgrade", "--control", str(control), merged=True)
        assert result.returncode == 0, shown(result)
        master.wait_for("master.resumed", 30, after=mark)

        # Both at once: no worker of generation 1 is left to ask where it runs; what the
        # old code handed over says it.
        mark = master.mark()
        for pid in generation_pids(master, 1):
            os.kill(pid, signal.SIGKILL)
        for slot in (0, 1):
            respawned = master.wait_for(
                "worker.ready", 30, after=mark, where=lambda e, s=slot: e["worker"] == s
            )
            assert respawned["gen"] == 1
            cwd = os.readlink(f"/proc/{respawned['pid']}/cwd")
            assert cwd == str(tmp_path / "releases" / "1")
            assert environ_of(respawned["pid"])["COLOR"] == "red"

        result = handoff("reload", "--wait", "--control", str(control), merged=True)
        assert result.returncode == 0, shown(result)
        outcome = master.named("reload.succeeded")[-1]
        assert_runs_release(master, outcome, tmp_path, 2)
        for pid in generation_pids(master, outcome["gen"]):
            assert environ_of(pid)["COLOR"] == "blue"


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


@pytest.mark.timeout(60)
def test_exec_probes_run_in_the_release_of_the_worker_they_probe(tmp_path: Path) -> None:
    current = make_releases(tmp_path, 2)
    seen = tmp_path / "probe-dirs"
    # A relative path in the probe is the release's own file.
    ready = f"exec:test -s VERSION && pwd -P >> {seen}"
    args = ["--chdir", str(current), "--ready", ready]
    with running([sys.executable, "server.py"], args=args) as master:
        master.wait_ready()
        flip(tmp_path, 2)
        outcome = master.reload()
        assert outcome["event"] == "reload.succeeded", outcome

    releases = [str(tmp_path / "releases" / n) for n in ("1", "2")]
    assert seen.read_text().split() == releases


@pytest.mark.timeout(60)
def test_without_pwd_naming_the_symlink_the_default_is_the_resolved_directory(
    tmp_path: Path,
) -> None:
    """As under systemd's WorkingDirectory= (it sets PWD to the resolved path) or sudo:
    the name is lost, the workers stay in the release handoff was started in. This is
    why the docs say to write --chdir /srv/app/current in ExecStart=."""
    current = make_releases(tmp_path, 2)
    env = {"PWD": str(current.resolve())}
    with running([sys.executable, "server.py"], cwd=current, env=env) as master:
        master.wait_ready()
        flip(tmp_path, 2)
        outcome = master.reload()
        assert outcome["event"] == "reload.succeeded", outcome
        (pid,) = generation_pids(master, outcome["gen"])
        assert os.readlink(f"/proc/{pid}/cwd") == str(tmp_path / "releases" / "1")


@pytest.mark.timeout(90)
def test_a_missing_release_fails_the_reload_and_the_old_one_keeps_serving(
    tmp_path: Path,
) -> None:
    current = make_releases(tmp_path, 2)
    control = tmp_path / "ctl.sock"
    args = ["--workers", "2", "--chdir", str(current), "--control", str(control)]
    with running([sys.executable, "server.py"], args=args) as master:
        port = start(master, control)
        with Load(port) as load:
            load.wait_for_requests(100)
            staged = tmp_path / "current.new"
            staged.symlink_to("releases/3")  # a release that was never unpacked
            os.replace(staged, current)

            result = handoff("reload", "--wait", "--control", str(control), merged=True)

            assert result.returncode == 1, shown(result)
            reason = f"chdir {current}: No such file or directory"
            assert error_lines(result.stdout) == [f"handoff: error: reload failed: {reason}"]
            assert master.named("reload.failed")[-1]["reason"] == reason
            load.wait_for_requests(100)
            status, body = get(port)
            assert (status, body["generation"], body["version"]) == (200, 1, "release-1")
        assert load.stats.total_failures() == 0, load.stats.to_dict()


@pytest.mark.timeout(30)
def test_a_chdir_that_does_not_exist_at_start_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "current"

    result = handoff("run", "--chdir", str(missing), "--", sys.executable, "server.py")

    assert result.returncode == 2, shown(result)
    assert error_lines(result.stderr) == [f"handoff: error: --chdir {missing}: no such directory"]
    assert "hint: " in result.stderr
    assert result.stdout == ""
