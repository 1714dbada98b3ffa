"""Shared by the control socket tests (test_control_*.py): clients and the raw protocol.

The clients are the real ``handoff`` commands run as subprocesses (`handoff`, `spawn`),
or raw connections speaking the protocol of docs/control.md (`request`, `status_of`),
whose every line is checked against it (`check_reply`). `start` waits until a master
from harness.py serves and listens for control. The `clients` fixture is in
control_fixtures.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from tests.integration.harness import APPS, Event, Master

MISBEHAVE = [sys.executable, str(APPS / "misbehave.py")]

Reply = dict[str, Any]
Clients = list["subprocess.Popen[str]"]


# -- commands ------------------------------------------------------------------------------


def demo_app(version_file: Path) -> list[str]:
    return [sys.executable, "-m", "handoff.demo.app", "--version-file", str(version_file)]


def selectable(mode_file: Path, mode: str, version: str = "") -> list[str]:
    """misbehave.py's select mode: the file chooses how the next worker behaves."""
    mode_file.write_text(mode)
    if version:
        Path(f"{mode_file}.version").write_text(version)
    return [*MISBEHAVE, "select", str(mode_file)]


def client_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test's environment without anything that would steer the socket's location."""
    dropped = ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LISTEN_", "NOTIFY_")) and k not in dropped
    }
    env.update(extra or {})
    return env


def handoff_argv(*args: str, user: int | None = None, group: int | None = None) -> list[str]:
    prefix: list[str] = []
    if user is not None:
        gid = user if group is None else group
        prefix = ["setpriv", f"--reuid={user}", f"--regid={gid}", "--clear-groups"]
    return [*prefix, sys.executable, "-m", "handoff", *args]


def handoff(
    *args: str,
    user: int | None = None,
    group: int | None = None,
    env: dict[str, str] | None = None,
    merged: bool = False,
    timeout: float = 90.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``handoff ARGS`` to the end. merged: stderr goes into stdout, in order."""
    return subprocess.run(
        handoff_argv(*args, user=user, group=group),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merged else subprocess.PIPE,
        text=True,
        env=client_env(env),
        timeout=timeout,
        check=False,
    )


def spawn(clients: Clients, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``handoff ARGS`` (stderr merged into stdout); the fixture kills it if left."""
    client = subprocess.Popen(
        handoff_argv(*args),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=client_env(env),
    )
    clients.append(client)
    return client


def finish(
    client: subprocess.Popen[str], timeout: float = 90.0
) -> subprocess.CompletedProcess[str]:
    out, _ = client.communicate(timeout=timeout)
    return subprocess.CompletedProcess(client.args, client.returncode, out, "")


def shown(result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"{' '.join(map(str, result.args))}\nexit {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("handoff: error:")]


def cli_status(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The status object printed by ``handoff status --json``.

    docs/control.md defines the status object; whether the command prints it bare or in
    its result line is not specified, so both are taken.
    """
    assert result.returncode == 0, shown(result)
    document = json.loads(result.stdout)
    assert isinstance(document, dict), result.stdout
    status = document.get("status", document)
    assert {"master", "generations", "last_reload"} <= set(status), document
    return status


# -- the protocol, spoken directly ---------------------------------------------------------


def connect(path: Path, timeout: float = 10.0) -> socket.socket:
    """A connection to the control socket; I/O on it times out after `timeout`.

    A unix socket whose backlog is full fails a non-blocking connect with EAGAIN
    instead of waiting (as TCP would): retried until the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except BlockingIOError:
            sock.close()
            if time.monotonic() > deadline:
                raise AssertionError(f"{path}: backlog full for {timeout} s") from None
            time.sleep(0.005)
            continue
        except BaseException:
            sock.close()
            raise
        return sock


def check_reply(reply: object) -> Reply:
    """Every line the master sends: a JSON object with "v": 1 and a known "type"."""
    assert isinstance(reply, dict), reply
    assert reply.get("v") == 1, reply
    assert reply.get("type") in ("result", "progress", "error"), reply
    if reply["type"] == "error":
        assert isinstance(reply.get("error"), str), reply
        assert reply["error"], reply
    if reply["type"] == "result":
        assert isinstance(reply.get("ok"), bool), reply
    return reply


def at_eof(sock: socket.socket) -> bool:
    """True if the master closed the connection (nothing more to read)."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def receive(sock: socket.socket) -> tuple[list[Reply], bool]:
    """The master's lines up to the last one (a result or an error), and whether it closed.

    "closed" is checked only after an error (the protocol closes then) or at an EOF.
    """
    buffer = b""
    replies: list[Reply] = []
    while True:
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            reply = check_reply(json.loads(line))
            replies.append(reply)
            if reply["type"] == "error":
                return replies, buffer == b"" and at_eof(sock)
            if reply["type"] == "result":
                return replies, False
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            assert not buffer, f"a partial line before the master closed: {buffer[:200]!r}"
            return replies, True
        buffer += chunk


def send(sock: socket.socket, data: bytes) -> None:
    """Send what the master takes; it may answer and close before it has read it all."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def line(request: dict[str, Any]) -> bytes:
    return json.dumps(request).encode() + b"\n"


def request(path: Path, payload: dict[str, Any] | bytes, timeout: float = 30.0) -> list[Reply]:
    """One exchange: the lines received, ending with a result or an error."""
    with connect(path, timeout) as sock:
        send(sock, payload if isinstance(payload, bytes) else line(payload))
        replies, closed = receive(sock)
    assert replies, "the master closed the connection without a line"
    assert replies[-1]["type"] in ("result", "error"), replies
    if replies[-1]["type"] == "error":
        assert closed, f"the connection stayed open after an error: {replies}"
    return replies


def status_of(path: Path, timeout: float = 10.0) -> dict[str, Any]:
    replies = request(path, {"v": 1, "cmd": "status"}, timeout)
    assert len(replies) == 1, replies
    result = replies[0]
    assert result["type"] == "result", result
    assert result["ok"] is True, result
    return result["status"]  # type: ignore[no-any-return]


def wait_control(master: Master, path: Path | None = None, timeout: float = 30.0) -> Event:
    """The control.listening event (whose fields include the socket's path)."""
    event = master.wait_for("control.listening", timeout)
    if path is not None:
        assert str(path) in [str(value) for value in event.values()], event
    return event


def start(master: Master, control: Path | None = None) -> int:
    """Wait until the master serves (first generation ready) and listens for control."""
    master.wait_for("master.ready", 60)
    wait_control(master, control)
    bound = master.wait_for("listener.bound")
    return int(bound["port"]) if bound.get("port") is not None else 0


# -- the master and its workers, as the OS sees them ---------------------------------------


def alive(pid: int) -> bool:
    """Running, as opposed to gone or dead-and-unreaped."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def established(pids: list[int], port: int) -> int:
    """Established TCP connections on `port` held by these processes."""
    count = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            for conn in psutil.Process(pid).net_connections("tcp"):
                if conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == port:
                    count += 1
    return count


def serving(control: Path) -> set[int]:
    """The pids of the active generation's workers, as `status` shows them."""
    return {
        worker["pid"]
        for gen in status_of(control)["generations"]
        if gen["state"] == "active"
        for worker in gen["workers"]
    }


def reload_result(control: Path, timeout: float = 90.0) -> dict[str, Any]:
    """`reload --wait` over the socket: its result line (ok or not)."""
    replies = request(control, {"v": 1, "cmd": "reload", "wait": True}, timeout=timeout)
    assert replies[-1]["type"] == "result", replies
    return replies[-1]
