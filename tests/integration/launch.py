"""Starting a process the way systemd hands it a socket: the socket on fd 3, LISTEN_PID
its own pid (the caller sets LISTEN_FDS and the rest of the environment), in a session of
its own, and its whole group SIGKILLed when the test is done with it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

# Runs in the child: the socket moved to fd 3, LISTEN_PID set, then the real command.
_ON_FD3 = """import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execvp(sys.argv[2], sys.argv[2:])
"""


@contextlib.contextmanager
def socket_at_fd3(
    fd: int, argv: Sequence[str], env: Mapping[str, str], **popen: Any
) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [sys.executable, "-c", _ON_FD3, str(fd), *argv],
        env=dict(env),
        pass_fds=(fd,),
        start_new_session=True,
        **popen,
    )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
        if process.stdout is not None:
            process.stdout.close()
