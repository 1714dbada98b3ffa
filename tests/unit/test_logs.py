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


def test_a_full_non_blocking_pipe_drops_lines_instead_of_raising(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    flags = fcntl.fcntl(write_end, fcntl.F_GETFL)
    fcntl.fcntl(write_end, fcntl.F_SETFL, flags | os.O_NONBLOCK)  # as a worker might
    while True:
        try:
            os.write(write_end, b"x" * 65536)
        except BlockingIOError:
            break
    writer, _ = writer_on(write_end)

    writer.msg("lost")

    assert writer.dropped == 1
    os.read(read_end, 1 << 20)
    writer.msg("kept")
    assert writer.dropped == 1
