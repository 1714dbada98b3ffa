"""Where the workers' attributed lines go: the master's stderr or journald, never blocking.

``StreamSink`` renders a read's lines for the master's own stderr (its ``LineWriter``):
a ``worker.output`` JSON event each, or ``NAME[gGEN.wWORKER] text`` on a console, in one
write. ``JournalSink`` sends each line to journald as an entry of its own (its native
protocol: system/journal.py), with handoff's fields. Neither ever waits: what the
destination does not take now waits in a bounded backlog (``Backlog``), and
master/worker_output.py stops reading the workers' pipes until it is written; what does
not fit, or cannot be written at all, is dropped and counted (``log_lines_dropped``).
``open_sink`` chooses: journald when the master's stderr is still the journal stream
systemd gave it (``JOURNAL_STREAM``), else the stream.
"""

from __future__ import annotations

import datetime
import select
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from handoff.core.model import Pid
from handoff.formats import worker_lines
from handoff.formats.log_events import EventName
from handoff.formats.options import LogFormat
from handoff.formats.worker_lines import LineSplitter, Tail
from handoff.master.logs import LineWriter
from handoff.system.journal import JournalSocket, Sent, is_journal_stream
from handoff.system.output_relay import OutputRelay


@dataclass(slots=True)
class Stream:
    """One worker's pipe: who writes to it, its unfinished line and its last lines."""

    fd: int
    pid: Pid
    gen: int
    worker: int
    lines: LineSplitter
    tail: Tail
    # What a sink renders for this worker on every line, made once.
    console: str = ""
    json: tuple[str, str] | None = None
    journal: bytes = b""


class Sink(Protocol):
    """Where attributed lines go."""

    def write(self, stream: Stream, texts: list[str]) -> None: ...


class Backlog(Protocol):
    """A destination that keeps what it cannot write now (the master's stderr, journald's
    socket): it calls on_backlog when a backlog begins; flush writes it when it can."""

    on_backlog: Callable[[], None] | None

    def fileno(self) -> int | None: ...

    def flush(self) -> bool: ...


class StreamSink:
    """The master's own stderr (its LineWriter): console or JSON lines, a batch per read."""

    def __init__(self, log: LineWriter, name: str) -> None:
        self._log = log
        self._name = name
        self._json = log.format is not LogFormat.CONSOLE

    def write(self, stream: Stream, texts: list[str]) -> None:
        if self._json:
            if stream.json is None:
                stream.json = worker_lines.json_parts(
                    EventName.WORKER_OUTPUT, stream.gen, stream.worker, stream.pid
                )
            before, after = stream.json
            after += _timestamp() + '"}\n'
            encode = worker_lines.json_text
            rendered = "".join([before + encode(text) + after for text in texts])
        else:
            if not stream.console:
                stream.console = worker_lines.console_prefix(self._name, stream.gen, stream.worker)
            prefix = stream.console
            rendered = "".join([prefix + text + "\n" for text in texts])
        # One write for the whole read: what the pipe does not take now waits, whole and
        # in order, in the writer's backlog (master/logs.py).
        self._log.write_lines(rendered.encode("utf-8", "replace"))

    def drop(self, lines: int) -> None:
        """Lines another sink had to drop: counted with the master's own."""
        self._log.dropped += lines


class JournalSink:
    """journald's native protocol, one entry per line. What journald's queue does not take
    now waits in order (at most BACKLOG bytes) until its socket is writable
    (``on_backlog``, ``flush``); a line journald cannot take at all goes to the stream."""

    BACKLOG: Final = 1 << 20

    def __init__(self, journal: JournalSocket, fallback: StreamSink, name: str) -> None:
        self._journal = journal
        self._fallback = fallback
        self._name = name
        self._pending: deque[tuple[bytes, Stream, str]] = deque()
        self._pending_bytes = 0
        self.on_backlog: Callable[[], None] | None = None

    def fileno(self) -> int:
        return self._journal.fileno()

    def write(self, stream: Stream, texts: list[str]) -> None:
        if not stream.journal:
            stream.journal = worker_lines.journal_fields(
                {
                    "PRIORITY": "6",
                    "SYSLOG_IDENTIFIER": self._name,
                    "SYSLOG_PID": str(stream.pid),
                    "HANDOFF_GENERATION": str(stream.gen),
                    "HANDOFF_WORKER": str(stream.worker),
                }
            )
        fields = stream.journal
        for index, text in enumerate(texts):
            entry = worker_lines.journal_field("MESSAGE", text) + fields
            sent = Sent.FULL if self._pending else self._journal.send(entry)
            if sent is Sent.FULL:
                self._queue(entry, stream, text)
            elif sent is Sent.FAILED:
                self._fallback.write(stream, texts[index:])  # in order, on the stream
                return

    def flush(self) -> bool:
        """Send what waits, as far as journald takes it now; True once nothing waits."""
        while self._pending:
            entry, stream, text = self._pending[0]
            sent = self._journal.send(entry)
            if sent is Sent.FULL:
                return False
            self._pending.popleft()
            self._pending_bytes -= len(entry)
            if sent is Sent.FAILED:
                self._fallback.write(stream, [text])
        return True

    def _queue(self, entry: bytes, stream: Stream, text: str) -> None:
        if self._pending_bytes + len(entry) > self.BACKLOG:
            self._fallback.drop(1)
            return
        began = not self._pending
        self._pending.append((entry, stream, text))
        self._pending_bytes += len(entry)
        if began and self.on_backlog is not None:
            self.on_backlog()


def flush_waiting(backlog: Backlog, deadline: float) -> None:
    """At the master's exit: write the backlog, waiting until deadline for room."""
    fd = backlog.fileno()
    if fd is None:
        return
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while not backlog.flush() and (left := deadline - time.monotonic()) > 0:
        poller.poll(left * 1000)


def _timestamp() -> str:
    """As structlog's TimeStamper(fmt="iso", utc=True) writes it."""
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def open_sink(
    log: LineWriter, name: str, relay: OutputRelay | None, environ: Mapping[str, str]
) -> tuple[Sink, list[Backlog]]:
    """The sink for the workers' lines, and the backlogs the pipes must wait for."""
    stream = StreamSink(log, name)
    # The master's stderr as systemd gave it: the relay's copy of it, if there is one.
    stderr = relay.originals[1] if relay is not None and relay.originals[1] >= 0 else 2
    if is_journal_stream(environ, stderr):
        journal = JournalSocket.open()
        if journal is not None:
            sink = JournalSink(journal, stream, name)
            return sink, [log, sink]
    return stream, [log]
