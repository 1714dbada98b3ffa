"""The control socket (docs/control.md): where it is, and how the commands find it.

--control, --pidfile and --name; RUNTIME_DIRECTORY before XDG_RUNTIME_DIR before
/tmp/handoff-UID; a stale socket file replaced; and no master at all, a clear error.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.integration.control_harness import cli_status, handoff, shown, start, status_of
from tests.integration.harness import running

# -- finding the master --------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_name_finds_the_master_under_xdg_runtime_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    env = {"XDG_RUNTIME_DIR": str(xdg)}
    expected = xdg / "handoff" / "locate-me.handoff.sock"
    args = ["--ready", "delay:0", "--name", "locate-me"]
    with running(["sleep", "1000"], args=args) as master:
        start(master, expected)
        assert stat.S_IMODE(expected.stat().st_mode) == 0o600
        status = cli_status(handoff("status", "--json", "--name", "locate-me", env=env))
        assert status["master"]["pid"] == master.pid
        assert status["master"]["control"] == str(expected)
        result = handoff("reload", "--name", "locate-me", env=env)
        assert result.returncode == 0, shown(result)

        other = xdg / "handoff" / "other.handoff.sock"
        result = handoff("status", "--name", "other", env=env)
        assert result.returncode == 1, shown(result)
        assert result.stderr.startswith(f"handoff: error: no handoff master at {other}")

        result = handoff("stop", "--name", "locate-me", env=env)
        assert result.returncode == 0, shown(result)
        assert master.wait_exit(30) == 0
    assert not expected.exists()


@pytest.mark.timeout(60)
def test_pidfile_and_the_default_name_find_the_master(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    env = {"XDG_RUNTIME_DIR": str(xdg)}
    pidfile = tmp_path / "master.pid"
    expected = xdg / "handoff" / "sleep.handoff.sock"  # NAME defaults to COMMAND's basename
    args = ["--ready", "delay:0", "--pidfile", str(pidfile)]
    with running(["sleep", "1000"], args=args) as master:
        start(master, expected)
        by_pidfile = cli_status(handoff("status", "--json", "--pidfile", str(pidfile)))
        assert by_pidfile["master"]["pid"] == master.pid
        assert by_pidfile["master"]["control"] == str(expected)
        by_name = cli_status(handoff("status", "--json", "--name", "sleep", env=env))
        assert by_name["master"]["pid"] == master.pid
        master.signal(signal.SIGTERM)
        assert master.wait_exit(30) == 0


@pytest.mark.timeout(60)
def test_runtime_directory_comes_before_xdg_runtime_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o755)
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    env = {"RUNTIME_DIRECTORY": str(runtime), "XDG_RUNTIME_DIR": str(xdg)}
    expected = runtime / "handoff.sock"
    with running(["sleep", "1000"], args=["--ready", "delay:0", "--name", "app"]) as master:
        start(master, expected)
        assert not (xdg / "handoff" / "app.handoff.sock").exists()
        status = cli_status(handoff("status", "--json", "--name", "app", env=env))
        assert status["master"]["pid"] == master.pid
        master.signal(signal.SIGTERM)
        assert master.wait_exit(30) == 0
    assert not expected.exists()


@pytest.mark.timeout(60)
def test_without_a_runtime_dir_the_socket_is_in_tmp_handoff_uid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    name = f"test-{uuid.uuid4().hex[:12]}"
    directory = Path(f"/tmp/handoff-{os.getuid()}")
    expected = directory / f"{name}.handoff.sock"
    with running(["sleep", "1000"], args=["--ready", "delay:0", "--name", name]) as master:
        start(master, expected)
        info = directory.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o700, os.getuid())
        status = cli_status(handoff("status", "--json", "--name", name))
        assert status["master"]["pid"] == master.pid
        master.signal(signal.SIGTERM)
        assert master.wait_exit(30) == 0
    assert not expected.exists()


@pytest.mark.timeout(60)
def test_a_stale_control_socket_file_is_replaced(tmp_path: Path) -> None:
    control = tmp_path / "ctl.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(control))  # left behind, as by a SIGKILLed master
    with running(["sleep", "1000"], args=["--ready", "delay:0", "--control", str(control)]) as m:
        start(m, control)
        assert status_of(control)["master"]["pid"] == m.pid
        m.signal(signal.SIGTERM)
        assert m.wait_exit(30) == 0


def assert_no_master(result: subprocess.CompletedProcess[str], path: Path) -> None:
    assert result.returncode == 1, shown(result)
    assert "Traceback" not in result.stderr, shown(result)
    lines = result.stderr.splitlines()
    assert lines, shown(result)
    assert lines[0].startswith(f"handoff: error: no handoff master at {path}"), shown(result)
    assert "is it running?" in result.stderr, shown(result)
    assert "--control" in result.stderr, shown(result)
    assert "--name" in result.stderr, shown(result)


@pytest.mark.parametrize("command", [["status"], ["reload"], ["stop"], ["scale", "2"]])
def test_no_master_is_a_clear_error(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "nothing.sock"
    assert_no_master(handoff(*command, "--control", str(path)), path)


def test_no_master_by_name_or_behind_a_stale_socket_is_a_clear_error(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    result = handoff("status", "--name", "absent", env={"XDG_RUNTIME_DIR": str(xdg)})
    assert_no_master(result, xdg / "handoff" / "absent.handoff.sock")

    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))  # a socket file nobody listens on: ECONNREFUSED
    assert_no_master(handoff("status", "--control", str(stale)), stale)
