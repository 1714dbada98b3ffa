"""The control socket (docs/control.md): who may use it.

Another uid is stopped by the socket's mode and, should the mode let it through, by the
master itself (SO_PEERCRED); --control-group admits its members and no one else. The
other users are switched to with setpriv, so these tests need root.
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.control_harness import (
    check_reply,
    cli_status,
    client_env,
    error_lines,
    handoff,
    shown,
    start,
    status_of,
)
from tests.integration.harness import running

NOBODY = 65534
STRANGER = 65533  # a uid and gid that no group file admits

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="handoff-ctl-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- another uid ---------------------------------------------------------------------------

RAW_CLIENT = r"""
import json, socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.settimeout(10)
try:
    sock.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"connect_errno": exc.errno}))
    sys.exit(0)
try:
    sock.sendall(sys.argv[2].encode() + b"\n")
except OSError:
    pass
data = b""
while True:
    try:
        chunk = sock.recv(65536)
    except ConnectionResetError:
        break
    if not chunk:
        break
    data += chunk
print(json.dumps({"lines": [json.loads(l) for l in data.splitlines()]}))
"""


def raw_as(uid: int, gid: int, path: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """Speak the protocol as another user: {"connect_errno": N} or {"lines": [...]}."""
    result = subprocess.run(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={gid}",
            "--clear-groups",
            sys.executable,
            "-c",
            RAW_CLIENT,
            str(path),
            json.dumps(payload),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=client_env(),
    )
    assert result.returncode == 0, shown(result)
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def assert_refused_cleanly(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 1, shown(result)
    assert "Traceback" not in result.stderr, shown(result)
    errors = error_lines(result.stderr)
    assert len(errors) == 1, shown(result)
    assert "permission denied" in errors[0].lower(), shown(result)


@needs_root
@pytest.mark.timeout(90)
def test_another_uid_is_stopped_by_the_socket_mode_with_a_clear_error(public_dir: Path) -> None:
    control = public_dir / "ctl.sock"
    with running(["sleep", "1000"], args=["--ready", "delay:0", "--control", str(control)]) as m:
        start(m, control)
        info = control.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o600, os.getuid())
        # connect() itself fails for nobody (EACCES).
        assert raw_as(NOBODY, NOBODY, control, {"v": 1, "cmd": "status"}) == {"connect_errno": 13}
        for command in (["status"], ["reload"], ["stop"], ["scale", "3"]):
            assert_refused_cleanly(handoff(*command, "--control", str(control), user=NOBODY))
        assert m.process.poll() is None
        assert not m.named("master.stopping")
        m.signal(signal.SIGTERM)
        assert m.wait_exit(30) == 0


@needs_root
@pytest.mark.timeout(90)
def test_another_uid_is_refused_by_the_master_itself(public_dir: Path) -> None:
    """The socket file opened to everyone: SO_PEERCRED is what refuses nobody."""
    control = public_dir / "ctl.sock"
    with running(["sleep", "1000"], args=["--ready", "delay:0", "--control", str(control)]) as m:
        start(m, control)
        control.chmod(0o666)
        for cmd in ("status", "stop", "reload"):
            answer = raw_as(NOBODY, NOBODY, control, {"v": 1, "cmd": cmd})
            assert "lines" in answer, answer
            assert len(answer["lines"]) == 1, answer
            refusal = check_reply(answer["lines"][0])
            assert (refusal["type"], refusal["error"]) == ("error", "permission denied"), answer
        assert_refused_cleanly(handoff("status", "--control", str(control), user=NOBODY))
        assert_refused_cleanly(handoff("stop", "--control", str(control), user=NOBODY))

        # Nothing happened: no stop, no reload; root is still served.
        assert not m.named("master.stopping")
        assert not m.named("reload.requested")
        assert m.process.poll() is None
        assert status_of(control)["master"]["pid"] == m.pid
        m.signal(signal.SIGTERM)
        assert m.wait_exit(30) == 0


@needs_root
@pytest.mark.timeout(90)
def test_control_group_admits_its_members_and_no_one_else(public_dir: Path) -> None:
    control = public_dir / "ctl.sock"
    group = grp.getgrgid(NOBODY).gr_name
    args = ["--ready", "delay:0", "--control", str(control), "--control-group", group]
    with running(["sleep", "1000"], args=args) as master:
        start(master, control)
        info = control.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, NOBODY)

        status = cli_status(handoff("status", "--json", "--control", str(control), user=NOBODY))
        assert status["master"]["pid"] == master.pid
        answer = raw_as(NOBODY, NOBODY, control, {"v": 1, "cmd": "status"})
        assert answer["lines"][-1]["type"] == "result", answer

        # Another uid outside the group: the mode stops it, and so does the master.
        answer = raw_as(STRANGER, STRANGER, control, {"v": 1, "cmd": "status"})
        assert answer == {"connect_errno": 13}, answer
        control.chmod(0o666)
        answer = raw_as(STRANGER, STRANGER, control, {"v": 1, "cmd": "status"})
        assert [(r["type"], r["error"]) for r in answer["lines"]] == [
            ("error", "permission denied")
        ], answer
        assert_refused_cleanly(handoff("status", "--control", str(control), user=STRANGER))
        master.signal(signal.SIGTERM)
        assert master.wait_exit(30) == 0
