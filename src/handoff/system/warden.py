"""The warden: a small forked process that kills worker process groups if the master dies.

PR_SET_PDEATHSIG (set on every worker) reaches only the worker
itself, not its children: gunicorn's or uvicorn's own workers would live on holding the
port. So the master forks, before it opens any socket, a warden that holds the read end of
a pipe whose only write end the master keeps. The master writes "+PID" when it spawns a
worker (each is a process-group leader) and "-PID" once it has reaped it. When the master
dies, however it dies (SIGKILL, OOM), the pipe reaches EOF and the warden SIGKILLs every
group still registered, then exits. What it cannot reach: a descendant that left its
worker's process group (setsid, double fork). Under systemd, KillMode=mixed and the
unit's cgroup catch those too; nothing short of a cgroup can.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass

from handoff.core.model import Pid
from handoff.system.process_tree import set_title


@dataclass(slots=True)
class Warden:
    pid: Pid
    pidfd: int
    _pipe: int

    @property
    def lifeline(self) -> int:
        return self._pipe

    @classmethod
    def adopt(cls, pid: Pid, lifeline: int) -> Warden:
        """After the master re-executed: the warden it forked, and the lifeline it kept."""
        os.set_inheritable(lifeline, False)
        return cls(pid, os.pidfd_open(pid), lifeline)

    def register(self, pid: Pid) -> None:
        self._send(f"+{pid}\n")

    def unregister(self, pid: Pid) -> None:
        self._send(f"-{pid}\n")

    def _send(self, line: str) -> None:
        # A few bytes into a pipe the warden keeps reading: this never blocks for long.
        with contextlib.suppress(BrokenPipeError):
            os.write(self._pipe, line.encode())

    def release(self) -> None:
        """Close the lifeline (at a clean exit: nothing is registered any more) and reap."""
        if self._pipe >= 0:
            os.close(self._pipe)
            self._pipe = -1
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED)
        os.close(self.pidfd)


def start_warden(name: str) -> Warden:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the warden
        os.close(write_end)
        _watch(read_end, name)
    os.close(read_end)
    return Warden(Pid(pid), os.pidfd_open(pid), write_end)


def _watch(lifeline: int, name: str) -> None:  # pragma: no cover - runs in the warden
    code = 0
    try:
        # Ctrl-C reaches the master's whole group: the warden must outlive a graceful stop.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        os.closerange(3, lifeline)
        os.closerange(lifeline + 1, 1 << 16)
        set_title(f"handoff: warden [{name}]")
        groups: set[int] = set()
        pending = b""
        while chunk := os.read(lifeline, 4096):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.startswith(b"+"):
                    groups.add(int(line[1:]))
                elif line.startswith(b"-"):
                    groups.discard(int(line[1:]))
        for pgid in groups:
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)
    except BaseException:  # - never run the master's code in the warden
        code = 1
    os._exit(code)
