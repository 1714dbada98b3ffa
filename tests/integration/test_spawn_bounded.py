"""A real master whose worker command hangs in execve, or is gone from PATH (review #14).

The hang is a fanotify permission mark on the worker's program (tests/unit/
test_spawn_bounded.py): the kernel holds its execve, as a hung NFS or FUSE mount would.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from tests.integration.harness import APPS, running
from tests.integration.http import get
from tests.unit.test_spawn_bounded import ExecGate


def worker_script(directory: Path, mode_file: Path) -> Path:
    """A command found through PATH, as `app`: the test app, serving in `select` mode."""
    mode_file.write_text("ok")
    Path(f"{mode_file}.version").write_text("v1")
    script = directory / "app"
    script.write_text(
        f"#!/bin/sh\nexec {sys.executable} {APPS / 'misbehave.py'} select {mode_file}\n"
    )
    script.chmod(0o755)
    return script


def path_with(directory: Path) -> dict[str, str]:
    return {"PATH": f"{directory}{os.pathsep}{os.environ.get('PATH', os.defpath)}"}


@pytest.mark.timeout(90)
def test_a_worker_whose_execve_hangs_is_spawned_and_the_master_goes_on(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = worker_script(bin_dir, tmp_path / "mode")
    args = ["--workers", "1", "--name", "spawn-hangs"]
    with running(["app"], args=args, env=path_with(bin_dir)) as master:
        port = master.wait_ready()
        serving = master.worker_pids()
        gate = ExecGate(script)
        try:
            mark = master.mark()
            master.signal(signal.SIGHUP)
            event_fd, held = gate.held(20)
            # Its execve is still held, yet the master has spawned it and goes on.
            master.wait_for("worker.spawned", 20, after=mark, where=lambda e: e["pid"] == held)
            assert get(port)[0] == 200
            gate.answer(event_fd, allow=False)
            failed = master.wait_for("reload.failed", 30, after=mark)
            assert "exited 127" in str(failed["reason"])
        finally:
            gate.close()
        assert master.worker_pids()[: len(serving)] == serving
        assert master.reload()["event"] == "reload.succeeded"


@pytest.mark.timeout(90)
def test_a_command_gone_from_path_fails_the_reload_as_command_not_found(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = worker_script(bin_dir, tmp_path / "mode")
    args = ["--workers", "1", "--name", "spawn-gone"]
    with running(["app"], args=args, env=path_with(bin_dir)) as master:
        port = master.wait_ready()
        script.rename(tmp_path / "app.away")

        outcome = master.reload()

        assert outcome["event"] == "reload.failed"
        assert "command not found: 'app'" in str(outcome["reason"])
        failed = master.named("worker.spawn_failed")
        assert failed
        assert failed[-1]["reason"] == "command not found: 'app'"
        assert get(port)[0] == 200
        (tmp_path / "app.away").rename(script)
        assert master.reload()["event"] == "reload.succeeded"
