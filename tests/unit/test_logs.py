"""The master's log writer: whole lines in one write, and never an exception.

Real pipes: a reader that went away (EPIPE), and a pipe that a worker made non-blocking
and filled (EAGAIN). In both the line is dropped and counted, and the master goes on.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
from collections.abc import Iterator

import pytest

from handoff.master.logs import LineWriter


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    yield read_end, write_end
    for fd in (read_end, write_end):
        with contextlib.suppress(OSError):  # a test may have closed it
            os.close(fd)


def writer_on(fd: int) -> tuple[LineWriter, io.TextIOWrapper]:
    stream = open(fd, "w", closefd=False)  # noqa: SIM115 - the test closes the fd itself
    return LineWriter(stream), stream


def test_a_line_is_written_whole(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    writer, _ = writer_on(write_end)

    writer.msg('{"event": "master.ready"}')

    assert os.read(read_end, 4096) == b'{"event": "master.ready"}\n'
    assert writer.dropped == 0


def test_a_reader_that_went_away_costs_a_dropped_line_not_the_master(
    pipe: tuple[int, int],
) -> None:
    read_end, write_end = pipe
    writer, _ = writer_on(write_end)
    os.close(read_end)

    writer.msg("one")
    writer.msg("two")

    assert writer.dropped == 2


def test_a_full_non_blocking_pipe_queues_lines_in_order_and_never_raises(
    pipe: tuple[int, int],
) -> None:
    read_end, write_end = pipe
    flags = fcntl.fcntl(write_end, fcntl.F_GETFL)
    fcntl.fcntl(write_end, fcntl.F_SETFL, flags | os.O_NONBLOCK)  # as a worker might
    filled = 0
    while True:
        try:
            filled += os.write(write_end, b"x" * 65536)
        except BlockingIOError:
            break
    writer, _ = writer_on(write_end)
    backlogs: list[bool] = []
    writer.on_backlog = lambda: backlogs.append(True)

    writer.msg("waits")
    writer.msg("behind it")

    assert (writer.dropped, writer.backlogged, backlogs) == (0, True, [True])
    assert not writer.flush()  # still full
    while filled:
        filled -= len(os.read(read_end, filled))
    assert writer.flush()
    writer.msg("then this")
    assert os.read(read_end, 1 << 20) == b"waits\nbehind it\nthen this\n"
    assert writer.dropped == 0


def test_past_its_backlog_a_stalled_pipe_costs_dropped_lines(pipe: tuple[int, int]) -> None:
    _, write_end = pipe  # nobody reads
    fcntl.fcntl(write_end, fcntl.F_SETFL, os.O_NONBLOCK)
    writer, _ = writer_on(write_end)
    line = b"y" * 1023 + b"\n"
    written = 2 * LineWriter.BACKLOG // len(line)
    for _ in range(written):
        writer.write_lines(line)
    kept = (fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ) + LineWriter.BACKLOG) // len(line)
    assert writer.dropped == written - kept  # the pipe and the backlog are full
