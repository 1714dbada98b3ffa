"""structlog set-up: JSON lines off a terminal (journald), a readable console on one.

Event names are stable dotted identifiers, catalogued in docs/events.md.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import stat
import sys
from collections.abc import Callable
from typing import Final, TextIO

import structlog

from handoff.formats.log_events import EventName, Level
from handoff.formats.options import LogFormat

LEVELS: Final = ("debug", "info", "warning", "error")


class LineWriter:
    """A structlog logger that writes each line with a single write(2).

    Workers may share the master's stderr (``--worker-output direct``). Python's stderr is
    unbuffered on a pipe, so ``print`` (structlog's PrintLogger) writes the message and its
    newline separately, and a worker's output can land in between: a JSON line then no
    longer parses, in journald or anywhere else. One write of up to PIPE_BUF (4096) bytes
    is atomic on a pipe, so lines of that size stay whole (longer ones may interleave).

    Writing never raises and never blocks: the log reader may be gone (EPIPE: ``| tee``
    killed, a log driver restarted) or the disk full (ENOSPC), and the master must go on
    serving, so a line it cannot write is dropped and counted (``handoff status`` shows
    ``log_lines_dropped``). A pipe that is full for now (EAGAIN: the output relay is busy,
    or a worker made the shared stderr non-blocking) is not a reason to lose lines: what
    it does not take waits, in order, in a backlog of at most ``BACKLOG`` bytes (beyond
    it lines are dropped and counted), and ``on_backlog`` is called when one begins, so
    that the loop can wait for the pipe to take more (``flush``; master/worker_output.py
    stops reading the workers' output meanwhile: they wait on their own pipes).
    """

    BACKLOG: Final = 1 << 20

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.dropped = 0
        self.format = LogFormat.JSON  # as configure() resolved it (workers' lines follow it)
        self.on_backlog: Callable[[], None] | None = None
        self._backlog = bytearray()
        try:
            self._fd: int | None = stream.fileno()
        except (OSError, io.UnsupportedOperation):
            self._fd = None  # an in-memory stream (tests): nothing else writes to it

    def own_description(self) -> None:
        """Write through an open file description of the master's own, non-blocking, when
        stderr is a pipe (the output relay's): a worker that makes its inherited stderr
        non-blocking, or a busy reader, then costs a wait in the backlog (or, past it, a
        dropped line), never a blocked loop."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if stat.S_ISFIFO(os.fstat(self._fd).st_mode):
                flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
                self._fd = os.open(f"/proc/self/fd/{self._fd}", flags)

    def fileno(self) -> int | None:
        """The fd written to (None: an in-memory stream)."""
        return self._fd

    @property
    def backlogged(self) -> bool:
        return bool(self._backlog)

    def msg(self, message: str) -> None:
        line = message + "\n"
        try:
            if self._fd is None:
                self._stream.write(line)
                self._stream.flush()
                return
            self._stream.flush()
            self._write(line.encode("utf-8", "replace"))
        except (OSError, ValueError):
            # ValueError: the stream was closed under us.
            self.dropped += 1

    def write_lines(self, data: bytes) -> None:
        """Write whole lines at once (the workers' attributed output)."""
        if self._fd is not None:
            self._write(data)
            return
        try:
            self._stream.write(data.decode("utf-8", "replace"))
            self._stream.flush()
        except (OSError, ValueError):
            self.dropped += max(1, data.count(b"\n"))

    def flush(self) -> bool:
        """Write what the backlog holds, as far as the fd takes it now; True once empty."""
        if self._backlog and self._fd is not None:
            self._backlog[:] = self._send(bytes(self._backlog))
        return not self._backlog

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        if self._backlog:
            self._queue(data)  # behind what waits: lines stay in order
            return
        rest = self._send(data)
        if rest:
            self._queue(rest)

    def _send(self, data: bytes) -> bytes:
        """Write data; what the fd does not take now (EAGAIN), to queue. What cannot be
        written at all (EPIPE, ENOSPC, ...) is dropped and counted."""
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except BlockingIOError:
            return bytes(view)
        except OSError:
            self.dropped += max(1, bytes(view).count(b"\n"))
        return b""

    def _queue(self, data: bytes) -> None:
        if len(self._backlog) + len(data) > self.BACKLOG:
            self.dropped += max(1, data.count(b"\n"))
            return
        began = not self._backlog
        self._backlog += data
        if began and self.on_backlog is not None:
            self.on_backlog()

    debug = info = warning = error = critical = exception = msg


def configure(fmt: LogFormat, level: str, stream: TextIO | None = None) -> LineWriter:
    """Send log events to stream (stderr); return the writer, which counts dropped lines."""
    out = stream if stream is not None else sys.stderr
    writer = LineWriter(out)
    if fmt is LogFormat.AUTO:
        fmt = LogFormat.CONSOLE if out.isatty() else LogFormat.JSON
    writer.format = fmt
    processors: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt is LogFormat.JSON:
        processors.append(structlog.processors.JSONRenderer(sort_keys=False))
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=out.isatty(), pad_event=24))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=lambda *_: writer,
        cache_logger_on_first_use=False,
    )
    return writer


def emit(event: EventName, level: Level | str = Level.INFO, /, **fields: object) -> None:
    """Log one event at the named level."""
    logger = structlog.get_logger("handoff")
    match level:
        case "debug":
            logger.debug(event, **fields)
        case "warning":
            logger.warning(event, **fields)
        case "error":
            logger.error(event, **fields)
        case _:
            logger.info(event, **fields)
