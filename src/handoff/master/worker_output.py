"""The workers' own output, attributed: a pipe per worker, read by the loop, bounded.

With ``--worker-output attributed`` (the default) each worker's stdout and stderr are one
pipe of its own (``SpawnRequest.output``); the loop watches the read end (``Source.OUTPUT``)
and writes each line with its generation and worker (master/output_sinks.py):
``app[g3.w0] text`` on a console, a ``worker.output`` JSON event otherwise, a journald
entry with fields of its own when the master's stderr is journald's stream. With
``direct`` the workers write to the master's stdout and stderr as they are (no pipe, no
cost, no last words).

Never blocking, never crashing: the read ends are non-blocking; one read of at most
``READ_CHUNK`` bytes per worker per loop turn; lines are cut at ``MAX_LINE`` and every
buffer is bounded (formats/worker_lines.py); writes never wait. When the master's stderr
or journald does not take lines as fast as they come, what is left waits in a bounded
backlog and the pipes are not read until it is written (``_hold``, ``_release``): the
workers then wait on their own full pipes, as they would on a slow terminal, while the
loop goes on with everything else; past the backlog lines are dropped and counted. A
worker that floods costs the master CPU, never memory.

Last words: each worker's last lines are kept (``Tail``). When a worker exits its pipe is
read to the end first (``drain``, before the exit is handled), so that a ``reload.failed``
or ``master.never_ready`` caused by it carries its last lines (``annotate``); the last
failed reload's lines are kept for ``handoff status``. The read ends, with their unfinished
line and last lines, are handed over across a re-exec in place (``records``, ``adopt``):
the workers keep their reader.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from handoff.core import actions as act
from handoff.core.model import Pid
from handoff.errors import SpawnError
from handoff.formats import worker_lines
from handoff.formats.log_events import EventName
from handoff.formats.options import RunConfig
from handoff.formats.options import WorkerOutput as OutputMode
from handoff.formats.worker_lines import LineSplitter, Tail
from handoff.master.logs import LineWriter
from handoff.master.output_sinks import Backlog, Sink, Stream, flush_waiting, open_sink
from handoff.master.resume_state import LastWords, OutputRecord
from handoff.master.sources import Source, Sources, Watch
from handoff.system.output_relay import OutputRelay

READ_CHUNK: Final = 64 * 1024  # bytes per worker per loop turn (a pipe's default size)
DRAIN_LIMIT: Final = 1 << 20  # bytes read at once from an exited worker's pipe
RECENT: Final = 16  # the last words of this many closed pipes are kept
EXIT_FLUSH_S: Final = 1.0  # at the master's exit, how long its stderr may take the backlog
# What a failed start is reported with: its worker's last lines are attached.
_ANNOTATED: Final = frozenset({EventName.RELOAD_FAILED, EventName.MASTER_NEVER_READY})
_CULPRIT: Final[tuple[str, ...]] = ("worker", "pid")  # generation.failed's, passed on


@dataclass(frozen=True, slots=True)
class OutputPipe:
    """A new worker's pipe: the read end is the master's, the write end its stdout and
    stderr (closed in the master once the worker has its copy)."""

    read: int
    write: int


class WorkerOutput:
    """The workers' pipes, read without blocking; see the module docstring."""

    def __init__(
        self,
        sources: Sources,
        sink: Sink | None,
        *,
        attributed: bool = True,
        backlogs: Sequence[Backlog] = (),
    ) -> None:
        """attributed False (``--worker-output direct``): no pipes for new workers; the
        pipes a re-exec handed over are still read. sink None: lines are only kept.
        backlogs: where lines go that can fall behind (the master's stderr, journald);
        while one has a backlog the pipes are not read."""
        self._sources = sources
        self._sink = sink
        self._attributed = attributed and sink is not None
        self._backlogs = list(backlogs)
        self._waiting: dict[int, Backlog] = {}  # by fd: backlogs waiting to be writable
        for backlog in backlogs:
            backlog.on_backlog = lambda backlog=backlog: self._hold(backlog)
        self._streams: dict[int, Stream] = {}  # by read fd
        self._by_pid: dict[Pid, Stream] = {}
        self._recent: dict[Pid, tuple[str, ...]] = {}  # closed pipes' last lines
        self.last_failure: LastWords | None = None  # the last failed reload's worker
        self._culprit: dict[str, object] = {}  # the last generation.failed's worker

    # -- spawning -------------------------------------------------------------------------

    def open_pipe(self) -> OutputPipe | None:
        """A pipe for a new worker's stdout and stderr; None with direct output."""
        if not self._attributed:
            return None
        try:
            read, write = os.pipe2(os.O_CLOEXEC)
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            raise SpawnError(
                f"cannot start a process: pipe2: {os.strerror(exc.errno or errno.EIO)} ({name})",
                hint="the master is out of file descriptors: see LimitNOFILE=",
            ) from None
        os.set_blocking(read, False)  # the worker's end stays blocking, as a terminal is
        return OutputPipe(read, write)

    def attach(self, pipe: OutputPipe | None, pid: Pid, gen: int, worker: int) -> None:
        """The worker runs: close the write end (the worker has its copy), read the other."""
        if pipe is not None:
            os.close(pipe.write)
            self._add(Stream(pipe.read, pid, gen, worker, LineSplitter(), Tail()))

    def discard(self, pipe: OutputPipe | None) -> None:
        """The worker did not start (or cannot be watched): close both ends."""
        if pipe is not None:
            for fd in (pipe.read, pipe.write):
                with contextlib.suppress(OSError):
                    os.close(fd)

    # -- the loop -------------------------------------------------------------------------

    def on_ready(self, fd: int) -> None:
        """A worker's pipe is readable: one read, at most READ_CHUNK bytes (a flooding
        worker waits for the next turn). Or a backlog's fd takes more."""
        stream = self._streams.get(fd)
        if stream is not None:
            self._read(stream, READ_CHUNK)
        elif fd in self._waiting:
            self._release(fd)

    def drain(self, pid: Pid) -> None:
        """Before a worker's exit is handled: read what it left in its pipe (bounded) and
        end its unfinished line, so that its last words are known."""
        stream = self._by_pid.get(pid)
        if stream is not None:
            self._read_rest(stream)

    def annotate(self, action: act.Action) -> act.Action:
        """A report of a failed start, with the worker that caused it and its last lines.

        ``generation.failed`` names the worker whose exit or ready timeout failed the
        generation; the ``reload.failed`` or ``master.never_ready`` that follows it in the
        same list of actions gets that worker's ``worker``, ``pid`` and ``output``."""
        if not isinstance(action, act.Report):
            return action
        fields = action.fields
        if action.event is EventName.GENERATION_FAILED:
            self._culprit = {key: fields[key] for key in _CULPRIT if key in fields}
            return action
        if action.event not in _ANNOTATED:
            return action
        culprit, self._culprit = self._culprit, {}
        pid, worker, gen = culprit.get("pid"), culprit.get("worker"), fields.get("gen")
        lines = self.last_lines(Pid(pid)) if isinstance(pid, int) else ()
        if action.event is EventName.RELOAD_FAILED:
            self.last_failure = LastWords(
                gen=gen if isinstance(gen, int) else 0,
                worker=worker if isinstance(worker, int) else 0,
                pid=pid if isinstance(pid, int) else 0,
                lines=lines,
            )
        output = {"output": list(lines)} if lines else {}
        return dataclasses.replace(action, fields={**fields, **culprit, **output})

    def last_lines(self, pid: Pid) -> tuple[str, ...]:
        stream = self._by_pid.get(pid)
        if stream is not None:
            return stream.tail.lines()
        return self._recent.get(pid, ())

    def close(self) -> None:
        """At the master's exit: what the workers left, then every pipe closed."""
        for stream in list(self._streams.values()):
            self._read_rest(stream)
            if stream.fd in self._streams:
                self._close(stream)
        deadline = time.monotonic() + EXIT_FLUSH_S
        for backlog in self._backlogs:
            flush_waiting(backlog, deadline)
            backlog.on_backlog = None  # the loop is over: nothing waits for writability

    # -- across a re-exec in place --------------------------------------------------------

    def records(self) -> tuple[OutputRecord, ...]:
        """The open pipes, to hand over (their fds stay open across the exec)."""
        return tuple(
            OutputRecord(
                fd=stream.fd,
                pid=stream.pid,
                gen=stream.gen,
                worker=stream.worker,
                partial=stream.lines.partial.decode("utf-8", "surrogateescape"),
                tail=stream.tail.lines(),
            )
            for stream in self._streams.values()
        )

    def adopt(self, records: Sequence[OutputRecord], last_failure: LastWords | None) -> None:
        """After a re-exec: read the pipes the old code read, from where it stopped."""
        self.last_failure = last_failure
        for record in records:
            try:
                os.set_inheritable(record.fd, False)
                os.set_blocking(record.fd, False)
            except OSError:
                continue
            partial = record.partial.encode("utf-8", "surrogateescape")
            stream = Stream(
                record.fd,
                Pid(record.pid),
                record.gen,
                record.worker,
                LineSplitter(partial),
                Tail(record.tail),
            )
            self._add(stream)

    # -- inside ---------------------------------------------------------------------------

    def _add(self, stream: Stream) -> None:
        if not self._watch(stream):
            # epoll_ctl refused (ENOMEM, ENOSPC): a pipe nobody reads would block its
            # worker; closed, the worker's next write fails (EPIPE) instead.
            os.close(stream.fd)
            return
        self._streams[stream.fd] = stream
        self._by_pid[stream.pid] = stream

    def _watch(self, stream: Stream) -> bool:
        if self._waiting:
            return True  # watched again once the backlogs are written
        try:
            self._sources.watch(stream.fd, Watch(Source.OUTPUT, stream.pid, fd=stream.fd))
        except OSError:
            return False
        return True

    def _hold(self, backlog: Backlog) -> None:
        """A destination has a backlog: stop reading the pipes (the workers wait on them,
        as they would on a slow terminal) until it has written it."""
        fd = backlog.fileno()
        if fd is None or fd in self._waiting:
            return
        try:
            self._sources.watch(fd, Watch(Source.OUTPUT, fd=fd), write=True)
        except OSError:
            return  # cannot wait for it: go on reading (lines past the backlog drop)
        if not self._waiting:
            for stream in self._streams.values():
                self._sources.unwatch(stream.fd)
        self._waiting[fd] = backlog

    def _release(self, fd: int) -> None:
        if not self._waiting[fd].flush():
            return
        self._sources.unwatch(fd)
        del self._waiting[fd]
        if self._waiting:
            return
        for stream in list(self._streams.values()):
            if not self._watch(stream):
                self._close(stream)

    def _read(self, stream: Stream, size: int) -> int:
        """One read; the number of bytes read (0: nothing now, or the end)."""
        try:
            data = os.read(stream.fd, size)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            data = b""
        if not data:
            self._flush(stream)
            self._close(stream)
            return 0
        self._write(stream, stream.lines.feed(data))
        return len(data)

    def _read_rest(self, stream: Stream) -> None:
        """Read what is in the pipe now (at most DRAIN_LIMIT bytes: its writers may live
        on) and end the unfinished line."""
        left = DRAIN_LIMIT
        while left > 0 and stream.fd in self._streams:
            got = self._read(stream, min(READ_CHUNK, left))
            if not got:
                break
            left -= got
        if stream.fd in self._streams:
            self._flush(stream)

    def _flush(self, stream: Stream) -> None:
        last = stream.lines.flush()
        if last is not None:
            self._write(stream, [last])

    def _write(self, stream: Stream, lines: list[bytes]) -> None:
        if not lines:
            return
        texts = [worker_lines.decode(line) for line in lines]
        stream.tail.add(texts)
        if self._sink is not None:
            self._sink.write(stream, texts)

    def _close(self, stream: Stream) -> None:
        self._sources.unwatch(stream.fd)
        with contextlib.suppress(OSError):
            os.close(stream.fd)
        del self._streams[stream.fd]
        if self._by_pid.get(stream.pid) is stream:
            del self._by_pid[stream.pid]
            self._recent[stream.pid] = stream.tail.lines()
            while len(self._recent) > RECENT:
                del self._recent[next(iter(self._recent))]


def build(
    config: RunConfig,
    sources: Sources,
    log: LineWriter | None,
    environ: Mapping[str, str],
    *,
    relay: OutputRelay | None,
    handed: Sequence[OutputRecord] = (),
    last_failure: LastWords | None = None,
) -> WorkerOutput:
    """The loop's WorkerOutput: the sink for --worker-output and the master's stderr
    (master/output_sinks.py), and the pipes a re-exec handed over."""
    sink, backlogs = (None, []) if log is None else open_sink(log, config.name, relay, environ)
    attributed = config.worker_output is OutputMode.ATTRIBUTED
    output = WorkerOutput(sources, sink, attributed=attributed, backlogs=backlogs)
    output.adopt(handed, last_failure)
    return output
