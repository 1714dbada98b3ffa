"""``--env-file`` read again at every reload, under load (docs/cli.md).

Real masters and demo-app workers; what a worker got is read from its
``/proc/PID/environ`` (the environment it was exec'd with). The new generation sees the
new values, the old one kept its own, a respawn inside a generation gets that
generation's values; a broken file fails the reload with its line (``handoff reload
--wait`` exits 1 with it) while the old generation serves, and fails a fresh start with
exit 2 before anything runs.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import psutil
import pytest

from tests.integration.control_harness import demo_app, error_lines, handoff, shown, start
from tests.integration.harness import Load, Master, running
from tests.integration.http import get
from tests.integration.waiting import wait_until


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def workers_of(master: Master, gen: int) -> list[int]:
    return [e["pid"] for e in master.named("worker.spawned") if e["gen"] == gen]


@pytest.mark.timeout(120)
def test_each_generation_gets_the_files_as_they_were_at_its_start(tmp_path: Path) -> None:
    version = tmp_path / "version"
    version.write_text("v1")
    shared = tmp_path / "shared.env"
    shared.write_text('# shared by every release\nexport COLOR=red\nGREETING="hello one"\n')
    local = tmp_path / "local.env"
    local.write_text("GREETING='local wins'\n")
    control = tmp_path / "ctl.sock"
    args = ["--workers", "2", "--control", str(control)]
    args += ["--env-file", str(shared), "--env-file", str(local)]
    with running(demo_app(version), args=args, env={"COLOR": "from the shell"}) as master:
        port = start(master, control)
        first = workers_of(master, 1)
        for pid in first:
            assert environ_of(pid)["COLOR"] == "red"
            assert environ_of(pid)["GREETING"] == "local wins"
        with Load(port) as load:
            load.wait_for_requests(100)
            shared.write_text("COLOR=blue\n")
            local.write_text("")

            result = handoff("reload", "--wait", "--control", str(control), merged=True)

            assert result.returncode == 0, shown(result)
            second = workers_of(master, 2)
            assert len(second) == 2
            for pid in second:
                assert environ_of(pid)["COLOR"] == "blue"
                assert "GREETING" not in environ_of(pid)
            for pid in first:  # still draining or gone: what it had is what it had
                if psutil.pid_exists(pid):
                    assert environ_of(pid)["COLOR"] == "red"
            loaded = master.named("env_files.loaded")
            assert [(e["gen"], e["variables"]) for e in loaded] == [(1, 2), (2, 1)]
            load.wait_for_requests(100)
        assert load.stats.total_failures() == 0, load.stats.to_dict()

        # A respawn inside generation 2 gets generation 2's values, not the files'.
        shared.write_text("COLOR=green\n")
        mark = master.mark()
        os.kill(second[0], signal.SIGKILL)
        respawned = master.wait_for("worker.spawned", 30, after=mark)
        assert respawned["gen"] == 2
        assert environ_of(respawned["pid"])["COLOR"] == "blue"
        master.wait_for(
            "worker.ready", 30, after=mark, where=lambda e: e["pid"] == respawned["pid"]
        )
        assert len(master.named("env_files.loaded")) == 2
        master.signal(signal.SIGTERM)
        assert master.wait_exit(60) == 0


@pytest.mark.timeout(120)
def test_a_broken_env_file_fails_the_reload_with_its_line_and_the_old_one_serves(
    tmp_path: Path,
) -> None:
    version = tmp_path / "version"
    version.write_text("v1")
    env_file = tmp_path / "app.env"
    env_file.write_text("COLOR=red\n")
    control = tmp_path / "ctl.sock"
    args = ["--workers", "2", "--control", str(control), "--env-file", str(env_file)]
    with running(demo_app(version), args=args) as master:
        port = start(master, control)
        with Load(port) as load:
            load.wait_for_requests(100)
            version.write_text("v2")
            env_file.write_text("COLOR=blue\n# the next line has a typo\nDB-URL=postgres://db\n")

            result = handoff("reload", "--wait", "--control", str(control), merged=True)

            assert result.returncode == 1, shown(result)
            reason = f"env file {env_file}, line 3: invalid variable name 'DB-URL'"
            (line,) = error_lines(result.stdout)
            assert line.startswith(f"handoff: error: reload failed: {reason}"), line
            assert str(master.named("reload.failed")[-1]["reason"]).startswith(reason)
            assert not [e for e in master.named("worker.spawned") if e["gen"] == 2]
            load.wait_for_requests(100)
            for _ in range(5):
                status, body = get(port)
                assert (status, body["generation"], body["version"]) == (200, 1, "v1")

            # Fixed: the next reload reads it again and works.
            env_file.write_text("COLOR=blue\n")
            result = handoff("reload", "--wait", "--control", str(control), merged=True)
            assert result.returncode == 0, shown(result)
            (pid, _) = workers_of(master, 3)
            assert environ_of(pid)["COLOR"] == "blue"
            load.wait_for_requests(100)
        assert load.stats.total_failures() == 0, load.stats.to_dict()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('COLOR=red\nGREETING="unterminated\n', "line 2: unterminated double quote"),
        (None, "No such file or directory"),
    ],
)
def test_a_broken_env_file_at_start_is_a_usage_error_and_nothing_runs(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    env_file = tmp_path / "app.env"
    if content is not None:
        env_file.write_text(content)
    pidfile = tmp_path / "master.pid"
    command = [sys.executable, "-m", "handoff.demo.app"]

    result = handoff("run", "--env-file", str(env_file), "--pidfile", str(pidfile), "--", *command)

    assert result.returncode == 2, shown(result)
    prefix = f"handoff: error: env file {env_file}"
    assert error_lines(result.stderr) == [f"{prefix}{', ' if content else ': '}{expected}"]
    assert "hint: " in result.stderr
    assert not pidfile.exists()
    wait_until(lambda: not mentioning(str(env_file)), 5, "no process left from that start")


def mentioning(text: str) -> list[psutil.Process]:
    """Processes whose command line mentions text."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if text in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found
