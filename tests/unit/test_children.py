"""Exit statuses as ``children.wait`` decodes them from the kernel, on real short processes.

Each case runs ``/bin/sh`` for a few milliseconds: an exit code, or a signal it sends
itself (core dumps are switched off, so SIGSEGV and SIGABRT end it the same way).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from handoff.core.model import ExitStatus
from handoff.system import children


def run(script: str, *, fd_soft_limit: int | None = None) -> ExitStatus:
    child = children.spawn(
        children.SpawnRequest(
            executable="/bin/sh",
            argv=["sh", "-c", f"ulimit -c 0; {script}"],
            env={"PATH": os.defpath},
            die_with_parent=True,
            fd_soft_limit=fd_soft_limit,
        )
    )
    try:
        status = children.wait(child, block=True)
    finally:
        child.close()
    assert status is not None
    return status


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("exit 0", ExitStatus(code=0)),
        ("exit 1", ExitStatus(code=1)),
        ("exit 3", ExitStatus(code=3)),
        ("exit 127", ExitStatus(code=127)),
        ("exit 255", ExitStatus(code=255)),
        ("kill -TERM $$", ExitStatus(signal=signal.SIGTERM)),
        ("kill -KILL $$", ExitStatus(signal=signal.SIGKILL)),
        ("kill -SEGV $$", ExitStatus(signal=signal.SIGSEGV)),
        ("kill -ABRT $$", ExitStatus(signal=signal.SIGABRT)),
    ],
)
def test_wait_decodes_exit_codes_and_signals(script: str, expected: ExitStatus) -> None:
    decoded = run(script)

    assert decoded == expected
    assert (decoded.code is None) != (decoded.signal is None)


def test_describe_decoded_statuses() -> None:
    assert run("exit 127").describe() == "exited 127 (command not found?)"
    assert run("kill -KILL $$").describe() == "killed by SIGKILL (out of memory?)"


def test_an_executable_that_cannot_run_is_a_spawn_error(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(children.SpawnError, match="cannot execute"):
        children.spawn(children.SpawnRequest(executable=os.fspath(tmp_path), argv=["x"], env={}))


def test_a_child_gets_the_soft_fd_limit_it_is_given(tmp_path: Path) -> None:
    out = tmp_path / "limit"
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 777)

    assert run(f"ulimit -n > {out}", fd_soft_limit=wanted) == ExitStatus(code=0)
    assert out.read_text().strip() == str(wanted)


# Run in a fresh interpreter: the fd limit is lowered to just what is open, so the spawn's
# pipe cannot be had; then the master's limit is raised again and restored for the child.
_OUT_OF_FDS = """
import os, resource, sys
from handoff.system import children
from handoff.errors import SpawnError
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
open_now = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now, hard))
try:
    children.spawn(children.SpawnRequest(executable="/bin/true", argv=["true"], env={}))
except SpawnError as exc:
    print("SpawnError:", exc.message)
else:
    print("spawned")
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
old = children.raise_fd_limit()
print("raised", old, resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard)
"""


def test_out_of_file_descriptors_is_a_spawn_error_and_the_limit_is_raised() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _OUT_OF_FDS], capture_output=True, text=True, timeout=30, check=False
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "SpawnError: cannot start a process: pipe2: Too many open files (EMFILE)"
    assert lines[1] == "raised 64 True"
