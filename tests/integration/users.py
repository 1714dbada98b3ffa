"""Running things as another user in the tests: a Python that user may execute.

The test's interpreter may live where only root can reach (a pyenv build under /root):
a master or a worker running as another uid could not exec it. `python_for` finds one
that uid may execute and that imports what the test needs, with `python_path()` (the
source tree and the test environment's site-packages) as its PYTHONPATH.
`PrefixedMaster` starts a master through a prefix such as setpriv or prlimit.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil
import pytest

from tests.integration.control_harness import client_env
from tests.integration.harness import Event, Master

NOBODY = 65534
SRC = Path(__file__).resolve().parents[2] / "src"


def python_path() -> str:
    """PYTHONPATH for another interpreter: handoff's source and this venv's packages."""
    paths = [str(SRC), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return os.pathsep.join(dict.fromkeys(paths))


def python_for(uid: int, *modules: str) -> str:
    """A Python >= 3.11 that `uid` may execute and that imports `modules` (default: the
    demo app) with python_path() as PYTHONPATH; the test is skipped if there is none.

    The probe execs the candidate from a shell already running as `uid`, as the master
    (or a worker) will: setpriv itself still has root's capabilities when it execs its
    command.
    """
    imports = "; ".join(f"import {name}" for name in modules or ("handoff.demo.app",))
    check = f"import sys; assert sys.version_info >= (3, 11); {imports}"
    for candidate in dict.fromkeys((sys.executable, "/usr/bin/python3")):
        as_uid = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        probe = subprocess.run(
            [*as_uid, "/bin/sh", "-c", 'exec "$0" -c "$1"', candidate, check],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=client_env({"PYTHONPATH": python_path()}),
            timeout=30,
            check=False,
        )
        if probe.returncode == 0:
            return candidate
    pytest.skip(f"no Python >= 3.11 that uid {uid} may execute and that imports {imports}")


class PrefixedMaster(Master):
    """harness.Master whose ``python -m handoff run`` is started through a prefix.

    The prefix's programs (prlimit, setpriv) exec what follows them, so the process
    started is the master itself: its pid, its process group, its output, as in Master.
    Its output is a pipe the test (root) made: a master run as another user cannot
    reopen it, and its output relay must still carry every line (it used to exit at once,
    losing the log and every worker that wrote to its stderr).
    """

    def __init__(
        self,
        prefix: Sequence[str],
        command: Sequence[str],
        *,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        python: str = sys.executable,
        binds: Sequence[str] = ("127.0.0.1:0",),
        pass_fds: Sequence[int] = (),
    ) -> None:
        argv = [
            *prefix, python, "-m", "handoff", "run", "--log-format", "json",
            *(f"--bind={bind}" for bind in binds), *args, "--", *command,
        ]  # fmt: skip
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
        full_env.update(env or {})
        self.events: list[Event] = []
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._workers: dict[int, psutil.Process] = {}
        read_end, write_end = os.pipe()
        try:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=write_end,
                stderr=write_end,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
                pass_fds=pass_fds,
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        self.process.stdout = open(read_end, "rb")  # noqa: SIM115 - Master.kill closes it
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()


@contextlib.contextmanager
def prefixed(
    prefix: Sequence[str], command: Sequence[str], **kwargs: object
) -> Iterator[PrefixedMaster]:
    master = PrefixedMaster(prefix, command, **kwargs)  # type: ignore[arg-type]
    try:
        yield master
    finally:
        master.kill()
