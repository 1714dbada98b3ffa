"""``--ready http:PATH`` for ``Probes``: starting one HTTP try and reading its report.

A try is a short process (system/http_probe.py says why) that runs as the master's own
user, not ``--user``: it is handoff's code, and it reads the worker tree's /proc as the
master does. Its stdout and stderr go to a pipe the master reads once the try has exited:
non-blocking, at most MAX_REPORT_BYTES, so a try cannot make the master wait or read
much. Which worker a try is for, and whether /proc ever showed that worker accepting or
serving (tries start only after that), is kept here by the worker's pid.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from typing import Final

from handoff.core import events as ev
from handoff.core.model import ExitStatus, Pid
from handoff.errors import SpawnError
from handoff.formats.http_check import MAX_REPORT_BYTES, decode_report
from handoff.formats.options import ReadySpec
from handoff.formats.worker_contract import clean_environment
from handoff.system import http_probe
from handoff.system.children import SpawnRequest
from handoff.system.sockets import Listener

PIPE_BYTES: Final = 65536


class HttpTries:
    """The target and request of every try, and the workers /proc has shown serving."""

    def __init__(
        self, ready: ReadySpec, listeners: Sequence[Listener], environ: Mapping[str, str]
    ) -> None:
        self._ready = ready
        # The first --bind a probe can speak HTTP to (a stream socket).
        self._target = next(
            (t for lst in listeners if (t := http_probe.probe_target(lst.sock)) is not None), None
        )
        self._environ = clean_environment(environ)
        self._serving: set[Pid] = set()  # workers /proc showed accepting or serving

    def seen_serving(self, worker: Pid) -> bool:
        return worker in self._serving

    def note_serving(self, worker: Pid) -> None:
        self._serving.add(worker)

    def forget(self, worker: Pid) -> None:
        self._serving.discard(worker)

    def request(self, worker: Pid, fd_limit: int | None) -> tuple[SpawnRequest, int]:
        """The spawn of one try, and the read end of its report pipe (the caller closes it;
        the write end is the request's output, closed by the caller after the spawn)."""
        if self._target is None:
            raise SpawnError("no listening stream socket to send the HTTP probe to")
        argv = http_probe.command(
            worker,
            self._target,
            self._ready.path,
            self._ready.statuses,
            self._ready.try_timeout_s,
        )
        read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        os.set_blocking(write_end, True)  # the probe writes a line; it may wait for room
        spawn = SpawnRequest(
            executable=argv[0], argv=argv, env=self._environ, fd_soft_limit=fd_limit,
            output=write_end,
        )  # fmt: skip
        return spawn, read_end


def finished(worker: Pid, report_fd: int, status: ExitStatus) -> ev.ProbeFinished:
    """A try exited: its report (closing report_fd)."""
    data, total = b"", 0
    try:
        with contextlib.suppress(OSError):  # EAGAIN: nothing (more) was written
            while total < PIPE_BYTES:  # all a pipe can hold, and the try has exited
                chunk = os.read(report_fd, PIPE_BYTES)
                if not chunk:
                    break
                total += len(chunk)
                data = (data + chunk)[-MAX_REPORT_BYTES:]  # the report is its last line
    finally:
        os.close(report_fd)
    report = decode_report(data, status.code if status.signal is None else None)
    return ev.ProbeFinished(
        pid=worker, ok=report.ok, detail=report.detail, asked=True, answer=report.answer
    )
