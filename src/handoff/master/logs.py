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
from typing import Final, TextIO

import structlog

from handoff.formats.log_events import EventName, Level
from handoff.formats.options import LogFormat

LEVELS: Final = ("debug", "info", "warning", "error")


class LineWriter:
    """A structlog logger that writes each line with a single write(2).

    Workers share the master's stderr. Python's stderr is unbuffered on a pipe, so
    ``print`` (structlog's PrintLogger) writes the message and its newline separately,
    and a worker's output can land in between: a JSON line then no longer parses, in
    journald or anywhere else. One write of up to PIPE_BUF (4096) bytes is atomic on a
    pipe, so lines of that size stay whole (longer ones may interleave).

    Writing never raises: the log reader may be gone (EPIPE: ``| tee`` killed, a log
    driver restarted), the disk full (ENOSPC), or a worker may have made the shared
    stderr non-blocking (EAGAIN on a full pipe). The master must go on serving, so a line
    it cannot write is dropped and counted (``handoff status`` shows ``log_lines_dropped``).
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.dropped = 0
        try:
            self._fd: int | None = stream.fileno()
        except (OSError, io.UnsupportedOperation):
            self._fd = None  # an in-memory stream (tests): nothing else writes to it

    def own_description(self) -> None:
        """Write through an open file description of the master's own, non-blocking, when
        stderr is a pipe (the output relay's): a worker that makes its inherited stderr
        non-blocking, or a stalled reader, then costs a dropped line, never a blocked
        loop (EAGAIN is dropped and counted like EPIPE)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if stat.S_ISFIFO(os.fstat(self._fd).st_mode):
                flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
                self._fd = os.open(f"/proc/self/fd/{self._fd}", flags)

    def msg(self, message: str) -> None:
        line = message + "\n"
        try:
            if self._fd is None:
                self._stream.write(line)
                self._stream.flush()
                return
            self._stream.flush()
            data = line.encode("utf-8", "replace")
            while data:
                data = data[os.write(self._fd, data) :]
        except (OSError, ValueError):
            # ValueError: the stream was closed under us.
            self.dropped += 1

    debug = info = warning = error = critical = exception = msg


def configure(fmt: LogFormat, level: str, stream: TextIO | None = None) -> LineWriter:
    """Send log events to stream (stderr); return the writer, which counts dropped lines."""
    out = stream if stream is not None else sys.stderr
    writer = LineWriter(out)
    if fmt is LogFormat.AUTO:
        fmt = LogFormat.CONSOLE if out.isatty() else LogFormat.JSON
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
