"""The workers' attributed output: lines cut and bounded, last words kept, rendered per
sink, read from real pipes without ever blocking, handed over across a re-exec.

Real pipes and a real selector; journald is a datagram socket the test binds itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from handoff.core import actions as act
from handoff.core.model import Pid
from handoff.formats import worker_lines
from handoff.formats.log_events import EventName, Level
from handoff.formats.options import LogFormat
from handoff.formats.worker_lines import (
    MAX_LINE,
    TAIL_CHARS,
    TAIL_LINE_CHARS,
    TAIL_LINES,
    LineSplitter,
    Tail,
)
from handoff.master.logs import LineWriter
from handoff.master.output_sinks import JournalSink, StreamSink
from handoff.master.resume_state import LastWords, ResumeState
from handoff.master.sources import Source, Sources
from handoff.master.worker_output import READ_CHUNK, WorkerOutput
from handoff.system.journal import JournalSocket, is_journal_stream

# -- lines --------------------------------------------------------------------------------


def test_lines_come_out_whole_whatever_the_chunks() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"one\ntw") == [b"one"]
    assert splitter.feed(b"o\r\nthree") == [b"two"]  # CRLF: the CR goes
    assert splitter.partial == b"three"
    assert splitter.feed(b"") == []
    assert splitter.flush() == b"three"
    assert splitter.flush() is None


def test_a_line_longer_than_the_limit_is_split_into_pieces_that_add_up() -> None:
    line = bytes(range(32, 127)) * 1000  # 95,000 bytes, no newline inside
    pieces = LineSplitter().feed(line + b"\nnext\n")
    assert pieces[-1] == b"next"
    assert all(len(piece) <= MAX_LINE for piece in pieces)
    assert b"".join(pieces[:-1]) == line
    assert len(pieces) - 1 == -(-len(line) // MAX_LINE)


def test_output_without_any_newline_never_keeps_more_than_a_line() -> None:
    splitter = LineSplitter()
    out = 0
    for _ in range(200):  # 12.8 MB in 64 KiB chunks, no newline ever
        pieces = splitter.feed(b"\xff" * READ_CHUNK)
        assert all(len(piece) <= MAX_LINE for piece in pieces)
        assert len(splitter.partial) <= MAX_LINE
        out += sum(map(len, pieces))
    assert out + len(splitter.partial) == 200 * READ_CHUNK


def test_a_character_is_not_cut_in_half_at_the_limit() -> None:
    text = ("é" * MAX_LINE).encode()  # two bytes each: the limit falls inside one
    pieces = LineSplitter().feed(text + b"\n")
    assert [piece.decode() for piece in pieces]  # each piece is valid UTF-8 on its own
    assert b"".join(pieces) == text


def test_bytes_that_are_not_utf8_become_replacement_characters() -> None:
    assert worker_lines.decode(b"ok \xff\xfe end") == "ok \ufffd\ufffd end"


def test_the_last_words_are_bounded_in_lines_and_characters() -> None:
    tail = Tail()
    tail.add([f"line {n}" for n in range(100)])
    assert tail.lines() == tuple(f"line {n}" for n in range(100 - TAIL_LINES, 100))
    tail.add(["x" * 100_000])
    assert tail.lines()[-1] == "x" * TAIL_LINE_CHARS + "…"
    tail.add(["y" * 900] * 10)
    assert sum(map(len, tail.lines())) <= TAIL_CHARS
    assert tail.lines()[-1] == "y" * 900


# -- renderers ----------------------------------------------------------------------------


def test_a_json_line_is_an_event_with_gen_worker_pid_and_text() -> None:
    before, after = worker_lines.json_parts(EventName.WORKER_OUTPUT, 3, 1, 4242)
    line = before + worker_lines.json_text('say "hi"\x1b[0m \ufffd') + after + 'T"}'
    event = json.loads(line)
    assert event == {
        "gen": 3,
        "worker": 1,
        "pid": 4242,
        "text": 'say "hi"\x1b[0m \ufffd',
        "event": "worker.output",
        "level": "info",
        "timestamp": "T",
    }


def test_the_console_prefix_names_the_generation_and_the_worker() -> None:
    assert worker_lines.console_prefix("app", 3, 0) == "app[g3.w0] "


def test_journal_fields_use_the_binary_form_only_for_a_value_with_a_newline() -> None:
    assert worker_lines.journal_field("MESSAGE", "hello") == b"MESSAGE=hello\n"
    assert worker_lines.journal_field("X", "a\nb") == b"X\n" + struct.pack("<Q", 3) + b"a\nb\n"


# -- the writer ---------------------------------------------------------------------------


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    yield read_end, write_end
    for fd in (read_end, write_end):
        with contextlib.suppress(OSError):
            os.close(fd)


# -- reading real pipes -------------------------------------------------------------------


class Collected:
    """A sink that keeps what it is given."""

    def __init__(self) -> None:
        self.lines: list[tuple[int, int, int, str]] = []

    def write(self, stream: object, texts: list[str]) -> None:
        gen, worker, pid = stream.gen, stream.worker, stream.pid  # type: ignore[attr-defined]
        self.lines += [(gen, worker, pid, text) for text in texts]


@pytest.fixture
def sources() -> Iterator[Sources]:
    selector = Sources()
    yield selector
    selector.close()


def started(output: WorkerOutput, pid: int = 100, gen: int = 1, worker: int = 0) -> int:
    """A worker's pipe, as spawn makes it; returns the write end (the worker's)."""
    pipe = output.open_pipe()
    assert pipe is not None
    worker_end = os.dup(pipe.write)
    output.attach(pipe, Pid(pid), gen, worker)
    return worker_end


def test_each_read_takes_at_most_a_chunk_and_never_blocks(sources: Sources) -> None:
    sink = Collected()
    output = WorkerOutput(sources, sink)
    worker_end = started(output)
    fcntl.fcntl(worker_end, fcntl.F_SETPIPE_SZ, 1 << 20)
    os.write(worker_end, (b"z" * 99 + b"\n") * 10_000)  # 1 MB
    wakeups = sources.wait(0)
    assert [w.watch.source for w in wakeups] == [Source.OUTPUT]
    output.on_ready(wakeups[0].watch.fd)
    assert len(sink.lines) == READ_CHUNK // 100
    output.on_ready(wakeups[0].watch.fd)
    assert len(sink.lines) == 2 * READ_CHUNK // 100  # the line cut by the first read, whole
    output.close()
    os.close(worker_end)


def test_an_exited_workers_pipe_is_read_to_the_end_and_its_last_line_ended(
    sources: Sources,
) -> None:
    sink = Collected()
    output = WorkerOutput(sources, sink)
    worker_end = started(output, pid=7, gen=2, worker=1)
    os.write(worker_end, b"Traceback (most recent call last):\n" * 3 + b"Error: boom")
    os.close(worker_end)
    output.drain(Pid(7))  # what WorkerTable.on_exit does before the exit is handled
    assert sink.lines[-1] == (2, 1, 7, "Error: boom")
    assert output.last_lines(Pid(7))[-1] == "Error: boom"  # kept once the pipe is closed
    assert sources.wait(0) == []  # closed and no longer watched


def test_a_failed_reload_carries_the_failing_workers_last_lines(sources: Sources) -> None:
    output = WorkerOutput(sources, Collected())
    worker_end = started(output, pid=55, gen=4, worker=0)
    os.write(worker_end, b"starting\nRuntimeError: broken release\n")
    os.close(worker_end)
    output.drain(Pid(55))
    failed = act.report(EventName.GENERATION_FAILED, Level.ERROR, gen=4, worker=0, pid=55)
    assert output.annotate(failed) == failed
    reload = act.report(EventName.RELOAD_FAILED, Level.ERROR, gen=4, reason="exited 1")
    annotated = output.annotate(reload)
    assert isinstance(annotated, act.Report)
    assert annotated.fields == {
        "gen": 4,
        "reason": "exited 1",
        "worker": 0,
        "pid": 55,
        "output": ["starting", "RuntimeError: broken release"],
    }
    assert output.last_failure == LastWords(
        gen=4, worker=0, pid=55, lines=("starting", "RuntimeError: broken release")
    )
    # A failure no worker caused (a spawn failed) names none and carries no output.
    spawn = act.report(EventName.GENERATION_FAILED, Level.ERROR, gen=5, reason="not found")
    output.annotate(spawn)
    reload = act.report(EventName.RELOAD_FAILED, Level.ERROR, gen=5, reason="not found")
    assert output.annotate(reload) == reload


def test_direct_output_makes_no_pipe(sources: Sources) -> None:
    assert WorkerOutput(sources, Collected(), attributed=False).open_pipe() is None


def test_the_pipes_are_handed_over_with_their_unfinished_line_and_last_words(
    sources: Sources,
) -> None:
    old = WorkerOutput(sources, Collected())
    worker_end = started(old, pid=9, gen=3, worker=2)
    os.write(worker_end, b"before\nhalf a line \xff")
    wakeups = sources.wait(0)
    old.on_ready(wakeups[0].watch.fd)
    records = old.records()
    state = ResumeState.from_json(
        ResumeState(
            reason="upgrade",
            version="x",
            listeners=(),
            notify_fd=0,
            notify_address="",
            warden_pid=1,
            warden_lifeline=0,
            outputs=records,
            last_failure=LastWords(gen=2, worker=0, pid=8, lines=("boom",)),
        ).to_json()
    )
    assert state.outputs == records
    assert records[0].fd in state.fds()
    sources.unwatch(records[0].fd)  # the new code's selector is a new one
    sink = Collected()
    new = WorkerOutput(sources, sink)
    new.adopt(state.outputs, state.last_failure)
    os.write(worker_end, b"and the rest\n")
    new.on_ready(sources.wait(0)[0].watch.fd)
    assert sink.lines == [(3, 2, 9, "half a line \ufffdand the rest")]
    assert new.last_lines(Pid(9)) == ("before", "half a line \ufffdand the rest")
    assert new.last_failure == state.last_failure
    new.close()
    os.close(worker_end)


def test_a_state_from_before_attributed_output_still_reads() -> None:
    data = json.loads(
        ResumeState(
            reason="crash",
            version="x",
            listeners=(),
            notify_fd=0,
            notify_address="",
            warden_pid=1,
            warden_lifeline=0,
        ).to_json()
    )
    del data["outputs"], data["last_failure"]
    state = ResumeState.from_json(json.dumps(data).encode())
    assert (state.outputs, state.last_failure) == ((), None)


def test_while_the_masters_stderr_is_full_the_pipes_wait_and_no_line_is_lost(
    sources: Sources, pipe: tuple[int, int]
) -> None:
    relay_end, stderr = pipe  # the master's stderr: a pipe the output relay reads
    fcntl.fcntl(stderr, fcntl.F_SETFL, os.O_NONBLOCK)  # as the master's own description
    log = LineWriter(open(stderr, "w", closefd=False))  # noqa: SIM115
    log.format = LogFormat.CONSOLE
    output = WorkerOutput(sources, StreamSink(log, "app"), backlogs=[log])
    worker_end = started(output)
    fcntl.fcntl(worker_end, fcntl.F_SETFL, os.O_NONBLOCK)
    sent, received, held = 0, b"", 0
    for _ in range(100_000):
        with contextlib.suppress(BlockingIOError):
            while sent < 4000:  # more than the two pipes hold
                os.write(worker_end, b"line %d\n" % sent)
                sent += 1
        wakeups = sources.wait(0)
        for wakeup in wakeups:
            output.on_ready(wakeup.watch.fd)
        if wakeups:
            continue
        if not log.backlogged:
            assert sent == 4000
            break
        # Held: stderr is full, so the worker's pipe is not even watched. The relay reads.
        held += 1
        received += os.read(relay_end, 1 << 20)
    assert held, "stderr never filled up"
    output.drain(Pid(100))
    os.set_blocking(relay_end, False)
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(relay_end, 1 << 20):
            received += chunk
    expected = [f"app[g1.w0] line {n}" for n in range(4000)]
    assert received.decode().splitlines() == expected
    assert log.dropped == 0
    output.close()
    os.close(worker_end)


# -- sinks --------------------------------------------------------------------------------


def test_the_stream_sink_writes_json_events_or_prefixed_console_lines(
    sources: Sources,
) -> None:
    for fmt in (LogFormat.JSON, LogFormat.CONSOLE):
        buffer = io.StringIO()
        log = LineWriter(buffer)
        log.format = fmt
        output = WorkerOutput(sources, StreamSink(log, "app"))
        worker_end = started(output, pid=31, gen=6, worker=1)
        os.write(worker_end, b"hello\n")
        os.close(worker_end)
        output.drain(Pid(31))
        (line,) = buffer.getvalue().splitlines()
        if fmt is LogFormat.CONSOLE:
            assert line == "app[g6.w1] hello"
        else:
            event = json.loads(line)
            assert {k: event[k] for k in ("event", "gen", "worker", "pid", "text")} == {
                "event": "worker.output",
                "gen": 6,
                "worker": 1,
                "pid": 31,
                "text": "hello",
            }
            assert event["timestamp"].endswith("Z")


@pytest.fixture
def journald(tmp_path: Path) -> Iterator[socket.socket]:
    """A stand-in for journald: a datagram socket with a tiny queue."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "journal.socket"))
    sock.setblocking(False)
    yield sock
    sock.close()


def entries(sock: socket.socket) -> list[dict[str, str]]:
    found = []
    with contextlib.suppress(BlockingIOError):
        while True:
            data = sock.recv(1 << 20)
            found.append(dict(line.split("=", 1) for line in data.decode().splitlines()))
    return found


def test_under_journald_each_line_is_an_entry_with_handoffs_fields(
    sources: Sources, journald: socket.socket
) -> None:
    journal = JournalSocket.open(journald.getsockname())
    assert journal is not None
    buffer = io.StringIO()
    fallback = StreamSink(LineWriter(buffer), "app")
    sink = JournalSink(journal, fallback, "app")
    output = WorkerOutput(sources, sink, backlogs=[sink])
    worker_end = started(output, pid=77, gen=2, worker=0)
    os.write(worker_end, b"one\ntwo\n")
    output.drain(Pid(77))
    assert entries(journald) == [
        {
            "MESSAGE": text,
            "PRIORITY": "6",
            "SYSLOG_IDENTIFIER": "app",
            "SYSLOG_PID": "77",
            "HANDOFF_GENERATION": "2",
            "HANDOFF_WORKER": "0",
        }
        for text in ("one", "two")
    ]
    assert buffer.getvalue() == ""
    os.close(worker_end)
    journal.close()


def test_a_full_journald_queue_holds_the_pipes_and_loses_nothing(
    sources: Sources, journald: socket.socket
) -> None:
    journal = JournalSocket.open(journald.getsockname())
    assert journal is not None
    buffer = io.StringIO()
    sink = JournalSink(journal, StreamSink(LineWriter(buffer), "app"), "app")
    output = WorkerOutput(sources, sink, backlogs=[sink])
    worker_end = started(output, pid=78)
    os.write(worker_end, b"".join(b"line %d\n" % n for n in range(2000)))
    got: list[str] = []
    held = 0
    while len(got) < 2000:
        wakeups = sources.wait(0)
        if not wakeups:  # journald's queue is full, the pipe not even watched
            held += 1
            got += [entry["MESSAGE"] for entry in entries(journald)]
        for wakeup in wakeups:
            output.on_ready(wakeup.watch.fd)
    assert held, "the queue never filled"
    assert got == [f"line {n}" for n in range(2000)]  # every line, in order, as entries
    assert buffer.getvalue() == ""
    output.close()
    os.close(worker_end)
    journal.close()


def test_lines_journald_cannot_take_at_all_go_to_the_stream(
    sources: Sources, journald: socket.socket
) -> None:
    journal = JournalSocket.open(journald.getsockname())
    assert journal is not None
    os.unlink(journald.getsockname())
    journald.close()  # journald gone: ECONNREFUSED, and reconnecting finds no socket
    buffer = io.StringIO()
    sink = JournalSink(journal, StreamSink(LineWriter(buffer), "app"), "app")
    output = WorkerOutput(sources, sink, backlogs=[sink])
    worker_end = started(output, pid=79)
    os.write(worker_end, b"still\nhere\n")
    os.close(worker_end)
    output.drain(Pid(79))
    assert [json.loads(line)["text"] for line in buffer.getvalue().splitlines()] == [
        "still",
        "here",
    ]
    journal.close()


def test_journald_is_used_only_when_stderr_is_still_its_stream(tmp_path: Path) -> None:
    with open(tmp_path / "file", "w") as file:
        info = os.fstat(file.fileno())
        stream = f"{info.st_dev}:{info.st_ino}"
        assert is_journal_stream({"JOURNAL_STREAM": stream}, file.fileno())
        assert not is_journal_stream({"JOURNAL_STREAM": "1:2"}, file.fileno())
        assert not is_journal_stream({"JOURNAL_STREAM": "junk"}, file.fileno())
        assert not is_journal_stream({}, file.fileno())
    assert JournalSocket.open(str(tmp_path / "no-journald-here")) is None
