"""Exit statuses as ``children.wait`` decodes them from the kernel, on real short processes.

Each case runs ``/bin/sh`` for a few milliseconds: an exit code, or a signal it sends
itself (core dumps are switched off, so SIGSEGV and SIGABRT end it the same way).
"""

from __future__ import annotations

import os
import signal

import pytest

from handoff.core.model import ExitStatus
from handoff.system import children


def run(script: str) -> ExitStatus:
    child = children.spawn(
        children.SpawnRequest(
            executable="/bin/sh",
            argv=["sh", "-c", f"ulimit -c 0; {script}"],
            env={"PATH": os.defpath},
            die_with_parent=True,
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
