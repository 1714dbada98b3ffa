"""The built-in demo app as a worker: socket from LISTEN_FDS, sd_notify, drain on SIGTERM.

The app runs without a master: the test binds the socket, hands it over at fd 3 the way
handoff does (handoff.drill.spawn_with_listener), and owns the notify socket. Also the
drill and `handoff demo` end to end, which need the real `handoff run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from handoff.demo.drill import DrillConfig, child_environment, run_drill, spawn_with_listener
from handoff.demo.run import run_demo

DEADLINE_S: Final = 20.0
APP: Final = (sys.executable, "-m", "handoff.demo.app")


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class RunningApp:
    process: asyncio.subprocess.Process
    port: int
    notify: socket.socket

    async def next_notification(self) -> bytes:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.sock_recv(self.notify, 4096), DEADLINE_S)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), DEADLINE_S)


@contextlib.asynccontextmanager
async def running_app(tmp_path: Path, version: str | None = None) -> AsyncIterator[RunningApp]:
    """The app on a fresh loopback socket, READY=1 already received."""
    command: tuple[str, ...] = APP
    if version is not None:
        (tmp_path / "version").write_text(f"  {version}\n")
        command = (*APP, "--version-file", str(tmp_path / "version"))
    address = f"handoff-test-{os.getpid()}-{time.monotonic_ns()}"
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
    ):
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        notify.bind("\0" + address)
        notify.setblocking(False)
        env = child_environment(
            {"NOTIFY_SOCKET": "@" + address, "HANDOFF_GENERATION": "7", "HANDOFF_WORKER": "1"}
        )
        process = await spawn_with_listener(command, listener, env)
        try:
            app = RunningApp(process, listener.getsockname()[1], notify)
            assert (await app.next_notification()).split(b"\n")[0] == b"READY=1"
            yield app
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await asyncio.wait_for(process.wait(), DEADLINE_S)


async def request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str = "/"
) -> Response:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE_S)
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers["content-length"]))
    return Response(int(lines[0].split()[1]), headers, body)


async def at_eof(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), DEADLINE_S) == b""


def test_it_answers_with_its_generation_worker_pid_and_version(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_app(tmp_path, version="release-42") as app:
            reader, writer = await app.connect()

            first = await request(reader, writer)
            missing = await request(reader, writer, "/nope")
            again = await request(reader, writer)  # the same keep-alive connection
            writer.close()

            assert first.status == 200
            assert first.headers["x-handoff-generation"] == "7"
            assert first.headers["x-handoff-version"] == "release-42"
            assert first.headers["content-type"] == "application/json"
            assert json.loads(first.body) == {
                "generation": 7,
                "worker": 1,
                "pid": app.process.pid,
                "version": "release-42",
            }
            assert missing.status == 404
            assert again.status == 200

    asyncio.run(scenario())


def test_sigterm_drains_requests_in_flight_and_keepalive_connections(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_app(tmp_path) as app:
            idle = await app.connect()
            busy = await app.connect()
            # A request on each first, so both connections are surely accepted.
            assert (await request(*idle)).headers["connection"] == "keep-alive"
            assert (await request(*busy)).status == 200
            slow = asyncio.create_task(request(*busy, "/sleep?ms=500"))

            app.process.send_signal(signal.SIGTERM)
            assert await app.next_notification() == b"STOPPING=1"
            last = await request(*idle)  # the idle connection is not cut: it is answered
            slept = await asyncio.wait_for(slow, DEADLINE_S)

            assert (last.status, last.headers["connection"]) == (200, "close")
            assert await at_eof(idle[0])
            assert (slept.status, slept.headers["connection"]) == (200, "close")
            assert await at_eof(busy[0])
            assert await asyncio.wait_for(app.process.wait(), DEADLINE_S) == 0
            for _, writer in (idle, busy):
                writer.close()

    asyncio.run(scenario())


def test_a_connection_left_idle_is_closed_after_the_grace(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_app(tmp_path) as app:
            reader, writer = await app.connect()
            assert (await request(reader, writer)).status == 200
            started = time.monotonic()

            app.process.send_signal(signal.SIGTERM)

            assert await at_eof(reader)
            assert await asyncio.wait_for(app.process.wait(), DEADLINE_S) == 0
            assert time.monotonic() - started >= 1.5  # the 2 s grace, with slack
            writer.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "LISTEN_FDS is not set"),
        ({"LISTEN_FDS": "1", "LISTEN_PID": "1"}, "LISTEN_PID=1 is not my pid"),
    ],
)
def test_without_its_sockets_it_exits_2_and_says_why(env: dict[str, str], message: str) -> None:
    result = subprocess.run(
        APP,
        check=False,
        env=child_environment(env),
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )

    assert result.returncode == 2
    assert message in result.stderr


def test_a_drill_with_a_failed_reload_loses_no_request(tmp_path: Path) -> None:
    version = tmp_path / "version"
    version.write_text("v1")
    config = DrillConfig(
        command=(*APP, "--version-file", str(version)),
        workers=2,
        reloads=2,
        settle_s=0.5,
        keepalive_clients=4,
        fresh_clients=2,
        # The second reload's workers cannot read their version file and exit 2.
        before_reload=lambda number: version.unlink() if number == 2 else None,
    )

    result = asyncio.run(asyncio.wait_for(run_drill(config), 120))

    assert result.load.total_failures() == 0, result.load.to_dict()
    assert [record.ok for record in result.reloads] == [True, False]
    assert result.reloads[0].gen == 2
    assert result.reloads[0].served_after_s is not None
    assert result.reloads[1].reason
    assert set(result.generations_seen) >= {"1", "2"}
    assert result.master_exit_code == 0
    assert not result.ok()


def test_the_demo_passes_and_says_so() -> None:
    out = io.StringIO()

    status = run_demo(reloads=2, workers=2, seconds_between=0.5, out=out)

    assert status == 0, out.getvalue()
    assert "PASS" in out.getvalue()
    assert "failed           0" in out.getvalue()
