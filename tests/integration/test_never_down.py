"""The master never takes the service down: faults from outside, under load.

Each fault is injected while load runs. Afterwards the master is alive (same pid), the
workers that were serving are still serving (same pids), no request failed, and a reload
succeeds.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from handoff.master.control_server import REQUEST_DEADLINE_S
from tests.integration.control_harness import (
    connect,
    demo_app,
    reload_result,
    request,
    serving,
    status_of,
)
from tests.integration.harness import Load, running
from tests.integration.waiting import wait_until

NESTED_LINES = (
    b"[" * 5000 + b"\n",
    b'{"a":' * 5000 + b"\n",
    b'{"v": 1, "cmd": "reload", "x": ' + b"[" * 20000 + b"\n",
)


@pytest.mark.timeout(120)
def test_deeply_nested_control_requests_are_refused_and_nothing_else_happens(
    tmp_path: Path,
) -> None:
    version = tmp_path / "version"
    version.write_text("v1")
    control = tmp_path / "ctl.sock"
    with running(demo_app(version), args=["--workers", "2", "--control", str(control)]) as master:
        master.wait_for("master.ready", 60)
        port = int(master.wait_for("listener.bound")["port"])
        master.wait_for("control.listening", 30)
        before = serving(control)
        with Load(port) as load:
            load.wait_for_requests(100)
            for raw in NESTED_LINES:
                replies = request(control, raw)
                assert replies[-1]["type"] == "error", replies
                assert replies[-1]["error"] == "the request is nested too deeply", replies
            load.wait_for_requests(100)
            assert master.process.poll() is None, "the master died"
            assert serving(control) == before, "a serving worker was replaced"
            assert reload_result(control)["ok"] is True
            load.wait_for_requests(100)
        assert load.stats.total_failures() == 0, load.stats.to_dict()
        assert not master.named("master.crashed")


ODD_LINES = (
    b'{"v": 1, "cmd": "scale", "workers": 1' + b"0" * 4300 + b"}\n",  # past int's digit limit
    b'{"v": 1e999999, "cmd": "status"}\n',  # a float that overflows to inf
    b'{"v": 1, "cmd": "st\xff\xfeatus"}\n',  # invalid UTF-8
    b'{"v": 1, "cmd": "\\ud800"}\n',  # a lone surrogate
    b"\x00" * 1000 + b"\n",
)


@pytest.mark.timeout(120)
def test_odd_floods_and_stalls_on_the_control_socket_cost_nothing(tmp_path: Path) -> None:
    version = tmp_path / "version"
    version.write_text("v1")
    control = tmp_path / "ctl.sock"
    with running(demo_app(version), args=["--workers", "2", "--control", str(control)]) as master:
        master.wait_for("master.ready", 60)
        port = int(master.wait_for("listener.bound")["port"])
        master.wait_for("control.listening", 30)
        before = serving(control)
        with Load(port) as load:
            load.wait_for_requests(100)
            for raw in ODD_LINES:
                replies = request(control, raw)
                assert [r["type"] for r in replies] == ["error"], (raw[:40], replies)
            # An unknown field with a float that underflows is ignored: a normal answer.
            odd_but_valid = b'{"v": 1, "cmd": "status", "x": -1e-999999}\n'
            assert request(control, odd_but_valid)[-1]["type"] == "result"
            stalled = [connect(control) for _ in range(50)]  # connect, then say nothing
            flooder = connect(control)
            try:
                with contextlib.suppress(OSError):  # the master cuts it off past 64 KiB
                    for _ in range(64):
                        flooder.sendall(b"x" * 4096)
                # Answered while the stalled clients still hang on (the master cuts them
                # after REQUEST_DEADLINE_S): they never stand in its way.
                started = time.monotonic()
                status_of(control)
                assert time.monotonic() - started < REQUEST_DEADLINE_S, "status waited"
                assert reload_result(control)["ok"] is True
            finally:
                for sock in [*stalled, flooder]:
                    sock.close()
            load.wait_for_requests(100)
            assert master.process.poll() is None, "the master died"
        assert load.stats.total_failures() == 0, load.stats.to_dict()
        assert serving(control).isdisjoint(before)
        assert not master.named("master.crashed")


@contextlib.contextmanager
def spawned_master(
    control: Path,
    command: list[str],
    *,
    stdout: int,
    prefix: tuple[str, ...] = (),
    bind: str = "127.0.0.1:0",
) -> Iterator[subprocess.Popen[bytes]]:
    """A master whose stdout and stderr (shared with its workers) go where the test says."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    argv = [
        *prefix, sys.executable, "-m", "handoff", "run", "--log-format", "json", "--bind", bind,
        "--workers", "2", "--control", str(control), "--", *command,
    ]  # fmt: skip
    master = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stdout, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        yield master
    finally:
        workers = []
        with contextlib.suppress(psutil.Error):
            workers = psutil.Process(master.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(master.pid, signal.SIGKILL)
        for worker in workers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(worker.pid, signal.SIGKILL)
        master.wait(10)


@contextlib.contextmanager
def master_logging_to_a_pipe(
    tmp_path: Path, control: Path, command: list[str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A master whose stderr (shared with its workers) is a pipe this test reads, then drops."""
    version = tmp_path / "version"
    version.write_text("v1")
    read_end, write_end = os.pipe()
    try:
        with spawned_master(control, command or demo_app(version), stdout=write_end) as master:
            os.close(write_end)
            write_end = -1
            yield master, read_end
    finally:
        for fd in (read_end, write_end):
            with contextlib.suppress(OSError):
                os.close(fd)


def read_events_until(fd: int, wanted: set[str], timeout: float) -> dict[str, dict[str, object]]:
    """Read JSON log lines from fd until every wanted event was seen; the first of each."""
    seen: dict[str, dict[str, object]] = {}
    buffer = b""
    deadline = time.monotonic() + timeout
    while not wanted <= seen.keys():
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"saw only {sorted(seen)} of {sorted(wanted)}"
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            continue
        chunk = os.read(fd, 65536)
        assert chunk, f"the log ended; saw {sorted(seen)}"
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    seen.setdefault(str(event.get("event")), event)
    return seen


@pytest.mark.timeout(120)
def test_a_log_reader_that_goes_away_costs_log_lines_not_the_service(tmp_path: Path) -> None:
    control = tmp_path / "ctl.sock"
    with master_logging_to_a_pipe(tmp_path, control) as (master, log):
        events = read_events_until(log, {"master.ready", "listener.bound", "control.listening"}, 60)
        port = int(str(events["listener.bound"]["port"]))
        before = serving(control)
        with Load(port) as load:
            load.wait_for_requests(100)
            os.close(log)  # `| tee` killed: the next line the master writes gets EPIPE
            # The workers write to the output relay, which drops what it cannot deliver:
            # the old ones serve on, and a reload's new workers start as usual.
            replies = request(control, {"v": 1, "cmd": "reload", "wait": True}, timeout=60)
            assert replies[-1]["type"] == "result", replies
            assert replies[-1]["ok"] is True, replies
            load.wait_for_requests(200)
            assert master.poll() is None, "the master died"
            status = status_of(control)
            assert status["master"]["log_lines_dropped"] > 0
            assert serving(control).isdisjoint(before), "the reload did not replace them"
            load.wait_for_requests(100)
        assert load.stats.total_failures() == 0, load.stats.to_dict()
        assert master.poll() is None


FLOODER = """
import fcntl, os, sys, time
while not os.path.exists(sys.argv[1]):  # the test says when: once it stops reading
    time.sleep(0.05)
flags = fcntl.fcntl(2, fcntl.F_GETFL)
fcntl.fcntl(2, fcntl.F_SETFL, flags | os.O_NONBLOCK)  # the description the master shares
end = time.monotonic() + 3
while time.monotonic() < end:
    try:
        os.write(2, b"flood " * 10000 + b"\\n")
    except BlockingIOError:
        pass
"""


@pytest.mark.timeout(120)
def test_a_worker_flooding_a_non_blocking_stderr_while_the_reader_stalls(tmp_path: Path) -> None:
    control = tmp_path / "ctl.sock"
    version = tmp_path / "version"
    version.write_text("v1")
    flooder = tmp_path / "flooder.py"
    flooder.write_text(FLOODER)
    app = " ".join(demo_app(version))
    go = tmp_path / "go"
    command = ["sh", "-c", f"{sys.executable} {flooder} {go} & exec {app}"]
    with master_logging_to_a_pipe(tmp_path, control, command) as (master, log):
        events = read_events_until(log, {"master.ready", "listener.bound", "control.listening"}, 60)
        port = int(str(events["listener.bound"]["port"]))
        before = serving(control)
        with Load(port) as load:  # from here on nobody reads the log: the reader stalls
            go.touch()
            load.wait_for_requests(300)
            # Nobody reads the log any more, so a master that blocked on it would never
            # answer (status_of gives up after 10 s).
            status = status_of(control)
            assert serving(control) == before
            assert reload_result(control)["ok"] is True
            load.wait_for_requests(200)
        assert load.stats.total_failures() == 0, load.stats.to_dict()
        assert master.poll() is None, "the master died"
        assert status_of(control)["master"]["log_lines_dropped"] > 0, status


@pytest.mark.timeout(120)
def test_stderr_on_a_full_filesystem_costs_log_lines_not_the_service(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to mount a small tmpfs")
    control = tmp_path / "ctl.sock"
    version = tmp_path / "version"
    version.write_text("v1")
    full = tmp_path / "full"
    full.mkdir()
    port = free_port()
    # A private mount namespace with a 64 KiB tmpfs, filled up; stdout and stderr go to a
    # file on it: every write gets ENOSPC.
    script = (
        f"mount -t tmpfs -o size=64k none {full} && "
        f"head -c 100000 /dev/zero > {full}/fill 2>/dev/null; "
        f'exec "$@" > {full}/log 2>&1'
    )
    prefix = ("unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh")
    with spawned_master(
        control,
        demo_app(version),
        stdout=subprocess.DEVNULL,
        prefix=prefix,
        bind=f"127.0.0.1:{port}",
    ) as master:
        wait_until(lambda: _answers(control), 60, "the master's control socket")
        wait_until(lambda: status_of(control)["master"]["state"] == "running", 60, "running")
        before = serving(control)
        with Load(port) as load:
            load.wait_for_requests(200)
            assert reload_result(control)["ok"] is True
            load.wait_for_requests(200)
            assert master.poll() is None, "the master died"
            assert serving(control).isdisjoint(before)
            assert status_of(control)["master"]["log_lines_dropped"] > 0
        assert load.stats.total_failures() == 0, load.stats.to_dict()


def _answers(control: Path) -> bool:
    try:
        status_of(control, timeout=2)
    except (OSError, AssertionError, ValueError, KeyError):
        return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
