"""The control socket (docs/control.md): reload --wait, status, stop, scale, who may use it.

Real masters and workers; the clients are the real ``handoff`` commands run as
subprocesses, or raw connections speaking the documented protocol. A fuzzed channel
(hypothesis) must never crash or block the master, and reloads must work after it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import grp
import http.client
import json
import os
import re
import select
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.harness import APPS, Event, Load, Master, running
from tests.integration.http import get
from tests.integration.waiting import wait_until

MISBEHAVE = [sys.executable, str(APPS / "misbehave.py")]
NOBODY = 65534
STRANGER = 65533  # a uid and gid that no group file admits
MAX_LINE = 64 * 1024
MAX_CLIENTS = 64
IDLE_CUT_S = 5.0  # a client that sends no full request within this is cut
CUT_SLACK_S = 4.0  # a cut may come late while the master and 2 shared cores are busy
QUICK_S = 1.5  # a status request must be answered within this, whatever else goes on
DURATION = re.compile(r"(\d+(?:\.\d+)?)\s?(ms|s)\b")

Reply = dict[str, Any]
Clients = list["subprocess.Popen[str]"]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")


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


def durations(text: str) -> list[float]:
    """Every duration written in text ("0.31 s", "312 ms"), in seconds."""
    return [float(n) / (1000 if unit == "ms" else 1) for n, unit in DURATION.findall(text)]


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


def alive(pid: int) -> bool:
    """Running, as opposed to gone or dead-and-unreaped."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for entry in f:
            key, _, value = entry.partition(":")
            fields[key] = value.strip()
    return fields


def open_fds(pid: int) -> Counter[str]:
    """The process's open fds by kind (numbers normalised); /proc files left out."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if not target.startswith("/proc/"):
                kinds[re.sub(r"\d+", "N", target)] += 1
    return kinds


def established(pids: list[int], port: int) -> int:
    """Established TCP connections on `port` held by these processes."""
    count = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            for conn in psutil.Process(pid).net_connections("tcp"):
                if conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == port:
                    count += 1
    return count


class LineStream:
    """Lines of a pipe, each read with a deadline (no blocking readline)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""
        self.eof = False

    def readline(self, timeout: float) -> str | None:
        """The next line, or None at EOF."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer and not self.eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line within {timeout} s; so far {self.buffer!r}")
            readable, _, _ = select.select([self.fd], [], [], remaining)
            if readable:
                chunk = os.read(self.fd, 4096)
                self.eof = not chunk
                self.buffer += chunk
        if not self.buffer:
            return None
        text, _, self.buffer = self.buffer.partition(b"\n")
        return text.decode()


@pytest.fixture
def clients() -> Iterator[Clients]:
    """Client processes a test starts; any still running at teardown is killed."""
    started: Clients = []
    yield started
    for client in started:
        if client.poll() is None:
            client.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            client.communicate(timeout=10)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="handoff-ctl-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- 1. reload --wait ----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_reload_wait_reports_progress_and_timing_and_the_new_version_answers(
    tmp_path: Path,
) -> None:
    version = tmp_path / "version"
    version.write_text("v1")
    control = tmp_path / "ctl.sock"
    args = ["--workers", "2", "--control", str(control)]
    with running(demo_app(version), args=args) as master:
        port = start(master, control)
        assert stat.S_IMODE(control.stat().st_mode) == 0o600
        with Load(port) as load:
            load.wait_for_requests(100)
            version.write_text("v2")
            mark = master.mark()
            result = handoff("reload", "--wait", "--control", str(control), merged=True)
            assert result.returncode == 0, shown(result)
            succeeded = master.wait_for("reload.succeeded", 10, after=mark)
            assert succeeded["gen"] == 2

            lines = result.stdout.splitlines()

            def first(pattern: str) -> int:
                found = [i for i, text in enumerate(lines) if re.search(pattern, text)]
                assert found, f"no line matching {pattern!r} in:\n{result.stdout}"
                return found[0]

            started = first(r"generation 2 started")
            one = first(r"\b1 of 2 workers ready")
            two = first(r"\b2 of 2 workers ready")
            draining = first(r"generation 1 draining")
            assert started < one < two < draining, result.stdout
            # The timing: the reload's duration as the master measured it.
            printed = durations("\n".join(lines[draining:]))
            assert printed, f"no duration after the progress lines:\n{result.stdout}"
            expected = float(succeeded["duration_s"])
            assert any(abs(d - expected) <= 0.05 + 0.1 * expected for d in printed), (
                f"printed {printed}, the master measured {expected} s:\n{result.stdout}"
            )

            master.wait_for("generation.gone", 30, where=lambda e: e["gen"] == 1)
            for _ in range(5):
                status, body = get(port)
                assert (status, body["version"]) == (200, "v2")
            load.wait_for_requests(100)
        assert load.stats.total_failures() == 0, load.stats.to_dict()
        master.signal(signal.SIGTERM)
        assert master.wait_exit(30) == 0
    assert not control.exists(), "the control socket outlived the master"


@pytest.mark.timeout(60)
def test_reload_wait_streams_progress_while_the_reload_runs(
    tmp_path: Path, clients: Clients
) -> None:
    """A worker that takes 1.5 s to accept: "started" must be printed before it is ready."""
    control = tmp_path / "ctl.sock"
    command = [*MISBEHAVE, "waits-in", "slow-epoll"]
    with running(command, args=["--control", str(control)]) as master:
        start(master, control)
        mark = master.mark()
        client = spawn(clients, "reload", "--control", str(control))
        assert client.stdout is not None
        stream = LineStream(client.stdout.fileno())
        lines: list[str] = []
        while not any("generation 2 started" in text for text in lines):
            text = stream.readline(20)
            assert text is not None, f"the client ended without a progress line: {lines}"
            lines.append(text)
        assert not master.named("worker.ready", after=mark), (
            f"'generation 2 started' came only after the new worker was ready: {lines}"
        )
        while (text := stream.readline(30)) is not None:
            lines.append(text)
        assert client.wait(10) == 0, "\n".join(lines)
        assert any("1 of 1 workers ready" in text for text in lines), lines
        assert master.named("reload.succeeded", after=mark)


# -- 2. a failing version ------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_reload_wait_exits_1_with_the_reason_while_requests_keep_succeeding(
    tmp_path: Path,
) -> None:
    mode = tmp_path / "mode"
    command = selectable(mode, "ok", "v1")
    control = tmp_path / "ctl.sock"
    args = ["--workers", "2", "--ready-timeout", "2", "--control", str(control)]
    with running(command, args=args) as master:
        port = start(master, control)
        assert status_of(control)["last_reload"] is None
        with Load(port) as load:
            load.wait_for_requests(200)

            mode.write_text("exit-at-start")
            mark = master.mark()
            result = handoff("reload", "--control", str(control), merged=True)
            failed = master.wait_for("reload.failed", 10, after=mark)
            assert result.returncode == 1, shown(result)
            assert "exited 3 before it was ready" in result.stdout, shown(result)
            assert failed["reason"] in result.stdout, (failed, shown(result))
            last = status_of(control)["last_reload"]
            assert (last["gen"], last["ok"], last["reason"]) == (2, False, failed["reason"])
            load.wait_for_requests(200)
            assert get(port)[1]["version"] == "v1"

            mode.write_text("hang-at-start")
            mark = master.mark()
            result = handoff("reload", "--control", str(control), merged=True)
            failed = master.wait_for("reload.failed", 10, after=mark)
            assert result.returncode == 1, shown(result)
            assert "not ready after 2 s" in result.stdout, shown(result)
            assert failed["reason"] in result.stdout, (failed, shown(result))
            load.wait_for_requests(200)
            assert get(port)[1]["version"] == "v1"
            assert not master.named("generation.draining")

            mode.write_text("ok")
            Path(f"{mode}.version").write_text("v2")
            result = handoff("reload", "--control", str(control), merged=True)
            assert result.returncode == 0, shown(result)
            last = status_of(control)["last_reload"]
            assert (last["gen"], last["ok"]) == (4, True), last
            master.wait_for("generation.gone", 30, where=lambda e: e["gen"] == 1)
            assert get(port)[1]["version"] == "v2"
            load.wait_for_requests(200)
        assert load.stats.total_failures() == 0, load.stats.to_dict()
        master.signal(signal.SIGTERM)
        assert master.wait_exit(30) == 0


@pytest.mark.timeout(60)
def test_reload_waiters_are_told_when_the_master_stops_first(
    tmp_path: Path, clients: Clients
) -> None:
    mode = tmp_path / "mode"
    control = tmp_path / "ctl.sock"
    args = ["--ready-timeout", "30", "--control", str(control)]
    with running(selectable(mode, "ok", "v1"), args=args) as master:
        start(master, control)
        mode.write_text("hang-at-start")
        mark = master.mark()
        reloader = spawn(clients, "reload", "--control", str(control))
        master.wait_for("generation.started", 30, after=mark)
        master.signal(signal.SIGTERM)
        result = finish(reloader, 30)
        assert result.returncode == 1, shown(result)
        assert "cancelled: master stopping" in result.stdout, shown(result)
        assert master.wait_exit(30) == 0


# -- 3. concurrent clients -----------------------------------------------------------------


@pytest.mark.timeout(150)
@pytest.mark.parametrize("release", ["good", "bad"])
def test_concurrent_reload_clients_all_get_the_result_of_the_reload_they_joined(
    tmp_path: Path, clients: Clients, release: str
) -> None:
    """5 clients at once, 3 more while the first reload runs: one or two generations.

    Each reload takes 4 s (readiness after 4 s, or a worker that never gets ready with a
    4 s timeout), so the later clients surely arrive while the first one runs.
    """
    control = tmp_path / "ctl.sock"
    mode = tmp_path / "mode"
    if release == "good":
        command, args = ["sleep", "1000"], ["--ready", "delay:4"]
    else:
        command, args = selectable(mode, "ok", "v1"), ["--ready-timeout", "4"]
    with running(command, args=[*args, "--workers", "2", "--control", str(control)]) as master:
        start(master, control)
        if release == "bad":
            mode.write_text("hang-at-start")
        mark = master.mark()
        first = [spawn(clients, "reload", "--control", str(control)) for _ in range(5)]
        master.wait_for("generation.started", 30, after=mark)
        later = [spawn(clients, "reload", "--control", str(control)) for _ in range(3)]
        results = [finish(client, 60) for client in first + later]

        expected = 0 if release == "good" else 1
        for result in results:
            assert result.returncode == expected, shown(result)
            if release == "bad":
                assert "not ready after 4 s" in result.stdout, shown(result)
        started = master.named("generation.started", after=mark)
        assert 1 <= len(started) <= 2, started
        outcome = "reload.succeeded" if release == "good" else "reload.failed"
        assert len(master.named(outcome, after=mark)) == len(started)
        master.signal(signal.SIGTERM)
        assert master.wait_exit(30) == 0


# -- 4. status -----------------------------------------------------------------------------


@dataclass
class Sample:
    """A worker as psutil saw it just before and just after a status request."""

    proc: psutil.Process
    cpu: tuple[float, float] = (0.0, 0.0)
    rss: tuple[int, int] = (0, 0)


def sample(pids: list[int], take: Any) -> tuple[dict[int, Sample], Any]:
    """Run take() between two psutil readings of each worker."""
    samples = {pid: Sample(psutil.Process(pid)) for pid in pids}
    cpu_before = {pid: sum(s.proc.cpu_times()[:2]) for pid, s in samples.items()}
    rss_before = {pid: s.proc.memory_info().rss for pid, s in samples.items()}
    taken = take()
    for pid, s in samples.items():
        s.cpu = (cpu_before[pid], sum(s.proc.cpu_times()[:2]))
        s.rss = (rss_before[pid], s.proc.memory_info().rss)
    return samples, taken


def check_master(status: dict[str, Any], master: Master, control: Path, now: float) -> None:
    about = json.dumps(status, indent=1)
    m = status["master"]
    assert m["pid"] == master.pid
    assert m["state"] == "running"
    assert m["ready"] == "auto"
    assert m["control"] == str(control)
    created = psutil.Process(master.pid).create_time()
    assert abs(m["uptime_s"] - (now - created)) < 3, about
    bound = master.wait_for("listener.bound")
    sockets = [{k: s[k] for k in ("address", "fd", "name")} for s in m["sockets"]]
    assert sockets == [{"address": bound["address"], "fd": 3, "name": bound["name"]}], about
    # /proc: the master holds the listening socket and the control socket.
    proc = psutil.Process(master.pid)
    tcp = proc.net_connections("tcp")
    assert bound["port"] in {c.laddr.port for c in tcp if c.status == psutil.CONN_LISTEN}
    assert str(control) in {c.laddr for c in proc.net_connections("unix")}


def check_workers(
    generation: dict[str, Any], master: Master, samples: dict[int, Sample], now: float
) -> None:
    about = json.dumps(generation, indent=1)
    assert sorted(w["pid"] for w in generation["workers"]) == sorted(samples), about
    for worker in generation["workers"]:
        pid = worker["pid"]
        proc = proc_status(pid)
        assert int(proc["PPid"]) == master.pid, proc
        assert proc["State"][0] in "RSD", proc  # alive: not a zombie, not stopped
        assert worker["state"] == "ready"
        s = samples[pid]
        assert abs(worker["age_s"] - (now - s.proc.create_time())) < 3, about
        assert generation["age_s"] >= worker["age_s"] - 0.5, about
        assert worker["processes"] == 1 + len(s.proc.children(recursive=True)), about
        assert s.cpu[0] - 0.1 <= worker["cpu_s"] <= s.cpu[1] + 0.1, (s, about)
        assert 0.8 * min(s.rss) <= worker["rss_bytes"] <= 1.2 * max(s.rss), (s, about)


def check_table(text: str, master: Master, workers: list[int]) -> None:
    assert not text.lstrip().startswith("{"), text
    assert re.search(rf"\b{master.pid}\b", text), text
    for pid in workers:
        rows = [row for row in text.splitlines() if re.search(rf"\b{pid}\b", row)]
        assert rows, f"worker {pid} not in the table:\n{text}"
        assert any("ready" in row for row in rows), text
    assert "active" in text, text


@pytest.mark.timeout(90)
def test_status_matches_what_proc_shows(tmp_path: Path) -> None:
    version = tmp_path / "version"
    version.write_text("v1")
    control = tmp_path / "ctl.sock"
    command = demo_app(version)
    args = ["--workers", "2", "--name", "statusapp", "--control", str(control)]
    with running(command, args=args) as master:
        port = start(master, control)
        workers = sorted(master.worker_pids())
        assert len(workers) == 2

        # Three idle keep-alive connections, held by the workers.
        held = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(3)]
        try:
            for connection in held:
                connection.request("GET", "/")
                assert connection.getresponse().read()
            wait_until(lambda: established(workers, port) == 3, 10, "3 accepted connections")
            samples, result = sample(
                workers, lambda: handoff("status", "--json", "--control", str(control))
            )
            now = time.time()
            status = cli_status(result)
        finally:
            for connection in held:
                connection.close()

        about = json.dumps(status, indent=1)
        check_master(status, master, control, now)
        assert status["master"]["name"] == "statusapp"
        assert status["master"]["command"] == command
        assert [g["gen"] for g in status["generations"]] == [1], about
        generation = status["generations"][0]
        assert (generation["state"], generation["size"]) == ("active", 2), about
        assert sorted(w["worker"] for w in generation["workers"]) == [0, 1], about
        check_workers(generation, master, samples, now)
        assert sum(w["connections"] for w in generation["workers"]) == 3, about
        assert status["last_reload"] is None

        # The same through the protocol, and as a table.
        assert status_of(control)["master"] == {**status["master"], "uptime_s": ANY}
        table = handoff("status", "--control", str(control))
        assert table.returncode == 0, shown(table)
        check_table(table.stdout, master, workers)
        master.signal(signal.SIGTERM)
        assert master.wait_exit(30) == 0


@pytest.mark.timeout(90)
def test_status_during_a_reload_shows_the_draining_generation(tmp_path: Path) -> None:
    version = tmp_path / "version"
    version.write_text("v1")
    control = tmp_path / "ctl.sock"
    with running(demo_app(version), args=["--workers", "2", "--control", str(control)]) as m:
        port = start(m, control)
        workers = sorted(m.worker_pids())
        # A slow request holds one old worker: generation 1 drains while it runs.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(get, port, "/sleep?ms=5000", 30)
            wait_until(lambda: established(workers, port) == 1, 10, "the slow request")
            holder = next(pid for pid in workers if established([pid], port) == 1)
            mark = m.mark()
            result = handoff("reload", "--control", str(control))
            assert result.returncode == 0, shown(result)
            succeeded = m.wait_for("reload.succeeded", 10, after=mark)
            m.wait_for("generation.draining", 10, after=mark, where=lambda e: e["gen"] == 1)
            status = status_of(control)
            about = json.dumps(status, indent=1)
            by_gen = {g["gen"]: g for g in status["generations"]}
            assert sorted(by_gen) == [1, 2], about
            assert (by_gen[1]["state"], by_gen[2]["state"]) == ("draining", "active"), about
            draining = {w["pid"]: w for w in by_gen[1]["workers"]}
            assert holder in draining, about
            assert draining[holder]["state"] == "stopping", about
            assert set(draining) <= set(workers), about
            new = sorted(w["pid"] for w in by_gen[2]["workers"])
            assert new == sorted(e["pid"] for e in m.named("worker.spawned", after=mark))
            for pid in [*new, *draining]:
                assert int(proc_status(pid)["PPid"]) == m.pid
            assert status["master"]["state"] == "running"
            last = status["last_reload"]
            assert (last["gen"], last["ok"], last["reason"]) == (2, True, ""), about
            assert abs(last["duration_s"] - succeeded["duration_s"]) < 0.01, about
            assert slow.result(30)[0] == 200

        m.wait_for("generation.gone", 30, where=lambda e: e["gen"] == 1)
        status = status_of(control)
        assert [g["gen"] for g in status["generations"]] == [2], status
        assert not any(alive(pid) for pid in workers)
        m.signal(signal.SIGTERM)
        assert m.wait_exit(30) == 0


# -- 5. another uid ------------------------------------------------------------------------

RAW_CLIENT = r"""
import json, socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.settimeout(10)
try:
    sock.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"connect_errno": exc.errno}))
    sys.exit(0)
try:
    sock.sendall(sys.argv[2].encode() + b"\n")
except OSError:
    pass
data = b""
while True:
    try:
        chunk = sock.recv(65536)
    except ConnectionResetError:
        break
    if not chunk:
        break
    data += chunk
print(json.dumps({"lines": [json.loads(l) for l in data.splitlines()]}))
"""


def raw_as(uid: int, gid: int, path: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """Speak the protocol as another user: {"connect_errno": N} or {"lines": [...]}."""
    result = subprocess.run(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={gid}",
            "--clear-groups",
            sys.executable,
            "-c",
            RAW_CLIENT,
            str(path),
            json.dumps(payload),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=client_env(),
    )
    assert result.returncode == 0, shown(result)
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def assert_refused_cleanly(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 1, shown(result)
    assert "Traceback" not in result.stderr, shown(result)
    errors = error_lines(result.stderr)
    assert len(errors) == 1, shown(result)
    assert "permission denied" in errors[0].lower(), shown(result)


@needs_root
@pytest.mark.timeout(90)
def test_another_uid_is_stopped_by_the_socket_mode_with_a_clear_error(public_dir: Path) -> None:
    control = public_dir / "ctl.sock"
    with running(["sleep", "1000"], args=["--ready", "delay:0", "--control", str(control)]) as m:
        start(m, control)
        info = control.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o600, os.getuid())
        # connect() itself fails for nobody (EACCES).
        assert raw_as(NOBODY, NOBODY, control, {"v": 1, "cmd": "status"}) == {"connect_errno": 13}
        for command in (["status"], ["reload"], ["stop"], ["scale", "3"]):
            assert_refused_cleanly(handoff(*command, "--control", str(control), user=NOBODY))
        assert m.process.poll() is None
        assert not m.named("master.stopping")
        m.signal(signal.SIGTERM)
        assert m.wait_exit(30) == 0


@needs_root
@pytest.mark.timeout(90)
def test_another_uid_is_refused_by_the_master_itself(public_dir: Path) -> None:
    """The socket file opened to everyone: SO_PEERCRED is what refuses nobody."""
    control = public_dir / "ctl.sock"
    with running(["sleep", "1000"], args=["--ready", "delay:0", "--control", str(control)]) as m:
        start(m, control)
        control.chmod(0o666)
        for cmd in ("status", "stop", "reload"):
            answer = raw_as(NOBODY, NOBODY, control, {"v": 1, "cmd": cmd})
            assert "lines" in answer, answer
            assert len(answer["lines"]) == 1, answer
            refusal = check_reply(answer["lines"][0])
            assert (refusal["type"], refusal["error"]) == ("error", "permission denied"), answer
        assert_refused_cleanly(handoff("status", "--control", str(control), user=NOBODY))
        assert_refused_cleanly(handoff("stop", "--control", str(control), user=NOBODY))

        # Nothing happened: no stop, no reload; root is still served.
        assert not m.named("master.stopping")
        assert not m.named("reload.requested")
        assert m.process.poll() is None
        assert status_of(control)["master"]["pid"] == m.pid
        m.signal(signal.SIGTERM)
        assert m.wait_exit(30) == 0


@needs_root
@pytest.mark.timeout(90)
def test_control_group_admits_its_members_and_no_one_else(public_dir: Path) -> None:
    control = public_dir / "ctl.sock"
    group = grp.getgrgid(NOBODY).gr_name
    args = ["--ready", "delay:0", "--control", str(control), "--control-group", group]
    with running(["sleep", "1000"], args=args) as master:
        start(master, control)
        info = control.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, NOBODY)

        status = cli_status(handoff("status", "--json", "--control", str(control), user=NOBODY))
        assert status["master"]["pid"] == master.pid
        answer = raw_as(NOBODY, NOBODY, control, {"v": 1, "cmd": "status"})
        assert answer["lines"][-1]["type"] == "result", answer

        # Another uid outside the group: the mode stops it, and so does the master.
        answer = raw_as(STRANGER, STRANGER, control, {"v": 1, "cmd": "status"})
        assert answer == {"connect_errno": 13}, answer
        control.chmod(0o666)
        answer = raw_as(STRANGER, STRANGER, control, {"v": 1, "cmd": "status"})
        assert [(r["type"], r["error"]) for r in answer["lines"]] == [
            ("error", "permission denied")
        ], answer
        assert_refused_cleanly(handoff("status", "--control", str(control), user=STRANGER))
        master.signal(signal.SIGTERM)
        assert master.wait_exit(30) == 0


# -- 6. a fuzzed channel -------------------------------------------------------------------


@dataclass
class Stalled:
    sock: socket.socket
    opened: float
    received: bytes = b""
    cut: float | None = None  # seconds after opening when the master closed it


class StallPool:
    """Clients that never finish their request, kept open while the fuzzing goes on.

    Each must be cut by the master about 5 s after it connected, with an error line. A
    watcher thread reads them all and notes when each is closed, so the 5 s waits
    overlap instead of adding up. At most `limit` are held at once (the master serves
    64 clients); opening one more waits for a cut.
    """

    def __init__(self, path: Path, limit: int = 16, slack: float = CUT_SLACK_S) -> None:
        self.path = path
        self.limit = limit
        self.slack = slack
        self.live: list[Stalled] = []
        self.done: list[Stalled] = []
        self._new: list[Stalled] = []
        self._changed = threading.Condition()
        self._stop = False
        self._selector = selectors.DefaultSelector()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop:
            with self._changed:
                for stalled in self._new:
                    self._selector.register(stalled.sock, selectors.EVENT_READ, stalled)
                self._new.clear()
            for key, _ in self._selector.select(0.05):
                stalled = key.data
                try:
                    chunk = stalled.sock.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    stalled.received += chunk
                    continue
                self._selector.unregister(stalled.sock)
                stalled.sock.close()
                with self._changed:
                    stalled.cut = time.monotonic() - stalled.opened
                    self.live.remove(stalled)
                    self.done.append(stalled)
                    self._changed.notify_all()

    def _wait(self, condition: Any, what: str) -> None:
        with self._changed:
            while not condition():
                oldest = min(s.opened for s in self.live)
                remaining = oldest + IDLE_CUT_S + CUT_SLACK_S - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"{what}: a silent client was not cut within {IDLE_CUT_S + CUT_SLACK_S} s"
                    )
                self._changed.wait(remaining)

    def open(self, data: bytes) -> None:
        self._wait(lambda: len(self.live) < self.limit, "a full pool")
        sock = connect(self.path)
        send(sock, data)
        sock.setblocking(False)
        with self._changed:
            stalled = Stalled(sock, time.monotonic())
            self.live.append(stalled)
            self._new.append(stalled)

    def drain(self) -> None:
        self._wait(lambda: not self.live, "draining")

    def check(self) -> list[float]:
        """Each was cut about 5 s after it connected, with one error line; the cut times."""
        for stalled in self.done:
            replies = [check_reply(json.loads(text)) for text in stalled.received.splitlines()]
            assert [r["type"] for r in replies] == ["error"], replies
        cuts = sorted(round(s.cut, 2) for s in self.done if s.cut is not None)
        assert len(cuts) == len(self.done)
        early = [cut for cut in cuts if cut < IDLE_CUT_S - 0.2]
        late = [cut for cut in cuts if cut > IDLE_CUT_S + self.slack]
        assert not early, f"clients cut before their 5 s: {early} (all cuts: {cuts})"
        assert not late, f"clients cut late: {late} (all cuts: {cuts})"
        return cuts

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        for stalled in self.live:
            stalled.sock.close()
        self.live.clear()


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=16),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
NOT_COMMANDS = (
    st.sampled_from(["relaod", "", "STATUS", "status ", "stop\x00", "scale-up", "reload;stop"])
    | st.text(max_size=12).filter(lambda s: s not in ("status", "reload", "stop", "scale"))
    | st.integers()
    | st.none()
    | st.lists(st.sampled_from(["status", "stop"]), max_size=2)
)
BAD_WORKERS = st.sampled_from([0, -1, 1025, 10**12, "2", 2.5, None, [], {}, "many"])
BAD_REQUESTS = st.one_of(
    JSON_VALUES.filter(lambda v: not (isinstance(v, dict) and "cmd" in v)),
    st.builds(
        lambda extra, cmd: {**extra, "v": 1, "cmd": cmd},
        st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3),
        NOT_COMMANDS,
    ),
)
BAD_SCALES = st.one_of(
    st.builds(lambda n: {"v": 1, "cmd": "scale", "workers": n}, BAD_WORKERS),
    st.just({"v": 1, "cmd": "scale"}),
)
NO_NEWLINE = st.binary(max_size=512).map(lambda b: b.replace(b"\n", b""))
ACTIONS = st.one_of(
    st.tuples(st.just("garbage"), st.binary(max_size=4096)),
    st.tuples(st.just("bad-request"), BAD_REQUESTS),
    st.tuples(st.just("bad-scale"), BAD_SCALES),
    st.tuples(st.just("long"), st.integers(MAX_LINE + 1, 4 * MAX_LINE), st.booleans()),
    st.tuples(st.just("partial"), NO_NEWLINE),
    st.tuples(st.just("vanish"), st.sampled_from(["status", "reload"])),
    st.tuples(st.just("stall"), NO_NEWLINE),
    st.tuples(st.just("many"), st.integers(MAX_CLIENTS + 1, MAX_CLIENTS + 40)),
)


def exchange_expecting_error(path: Path, data: bytes, *, allow_failed_result: bool) -> None:
    with connect(path, 10) as sock:
        send(sock, data)
        replies, closed = receive(sock)
    assert replies, f"no answer to {data[:200]!r}"
    last = replies[-1]
    if allow_failed_result and last["type"] == "result":
        assert last["ok"] is False, (data[:200], replies)
        return
    assert last["type"] == "error", (data[:200], replies)
    assert closed, (data[:200], replies)


def act(path: Path, action: tuple[Any, ...]) -> None:
    """One client misbehaving; what the master must answer it, if anything."""
    kind = action[0]
    if kind == "garbage":
        data = action[1]
        exchange_expecting_error(path, data + b"\n", allow_failed_result=False)
    elif kind == "bad-request":
        exchange_expecting_error(path, line(action[1]), allow_failed_result=False)
    elif kind == "bad-scale":
        exchange_expecting_error(path, line(action[1]), allow_failed_result=True)
    elif kind == "long":
        # Over 64 KiB, with or without its newline: cut at the limit, not after 5 s.
        size, newline = action[1], action[2]
        data = b'{"v": 1, "cmd": "status", "pad": "' + b"x" * size + b'"}'
        began = time.monotonic()
        with connect(path, 3) as sock:
            send(sock, data + (b"\n" if newline else b""))
            replies, closed = receive(sock)
        assert [r["type"] for r in replies] == ["error"], replies
        assert closed
        assert time.monotonic() - began < 3
    elif kind == "partial":
        with connect(path) as sock:
            send(sock, action[1])
    elif kind == "vanish":
        with connect(path) as sock:
            send(sock, line({"v": 1, "cmd": action[1], "wait": True}))
    else:
        raise AssertionError(kind)


def many(path: Path, count: int, stalled: int) -> None:
    """`count` clients connected at once, then each asks for the status."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(connect(path, 10))
        for sock in socks:
            send(sock, line({"v": 1, "cmd": "status"}))
        outcomes = []
        for sock in socks:
            replies, _ = receive(sock)
            assert replies, "a client got no line at all"
            last = replies[-1]
            if last["type"] == "error":
                outcomes.append(f"error: {last['error']}")
            else:
                outcomes.append("result" if last["ok"] else f"failed: {last}")
    finally:
        for sock in socks:
            sock.close()
    tally = Counter(outcomes)
    results = tally["result"]
    errors = sum(n for outcome, n in tally.items() if outcome.startswith("error: "))
    assert results + errors == count, tally
    assert results <= MAX_CLIENTS, tally
    assert errors >= count - MAX_CLIENTS, tally
    # Each sent its request within milliseconds of connecting: none may be cut for that.
    assert not [o for o in tally if "no request within" in o], tally
    # Besides the held clients, at most a few closed ones may not be reaped yet.
    assert results >= MAX_CLIENTS - stalled - 8, tally


def run_batch(master: Master, path: Path, pool: StallPool, actions: list[tuple[Any, ...]]) -> None:
    concurrent_actions = [a for a in actions if a[0] not in ("stall", "many")]
    for action in actions:
        if action[0] == "stall":
            pool.open(action[1])
    with concurrent.futures.ThreadPoolExecutor(8) as executor:
        for future in [executor.submit(act, path, a) for a in concurrent_actions]:
            future.result(30)
    crowds = [action[1] for action in actions if action[0] == "many"]
    if crowds:  # one crowd per batch: each costs the master ~64 status reports (~0.5 s)
        many(path, max(crowds), len(pool.live))

    assert master.process.poll() is None, master.diagnose("the master died")
    began = time.monotonic()
    status = status_of(path, timeout=QUICK_S + 1)
    took = time.monotonic() - began
    assert took < QUICK_S, f"status took {took:.2f} s"
    assert status["master"]["pid"] == master.pid
    replies = request(path, {"v": 1, "cmd": "reload", "wait": True}, timeout=30)
    assert replies[-1]["type"] == "result", replies
    assert replies[-1]["ok"] is True, replies


@pytest.mark.timeout(60)
def test_every_control_client_gets_its_own_5_s(tmp_path: Path) -> None:
    """A silent client is cut 5 s after it connected, also on an fd a gone client used.

    Five clients connect and leave 2 s later; five more connect then (the master's lowest
    free fds are the ones just closed). Each must still have its full 5 s.
    """
    control = tmp_path / "ctl.sock"
    args = ["--ready", "delay:0", "--control", str(control)]
    with running(["sleep", "1000"], args=args) as master:
        start(master, control)
        pool = StallPool(control, slack=1.5)
        try:
            pool.open(b"")  # connected first: the earliest deadline
            leaving = [connect(control) for _ in range(5)]
            time.sleep(2)  # pacing, not synchronisation: 2 s between the two groups
            for sock in leaving:
                sock.close()
            status_of(control)  # one more exchange: the master has seen them go
            for _ in range(5):
                pool.open(b"")
            pool.drain()
        finally:
            pool.close()
        assert len(pool.check()) == 6
        master.signal(signal.SIGTERM)
        assert master.wait_exit(30) == 0


@pytest.mark.timeout(150)
def test_a_fuzzed_control_channel_never_crashes_or_blocks_the_master(tmp_path: Path) -> None:
    control = tmp_path / "ctl.sock"
    args = ["--ready", "delay:0", "--control", str(control)]
    with running(["sleep", "1000"], args=args) as master:
        start(master, control)
        baseline_fds = open_fds(master.pid)
        baseline_rss = psutil.Process(master.pid).memory_info().rss
        began = time.monotonic()
        pool = StallPool(control)
        try:
            # Fixed first: silent clients in parallel, a crowd over the limit, long lines.
            fixed: list[tuple[Any, ...]] = [
                *[("stall", b"")] * 4,
                ("stall", b'{"v": 1, "cmd": "sta'),
                ("many", MAX_CLIENTS + 36),
                ("long", 4 * MAX_LINE, True),
                ("long", MAX_LINE + 1, False),
                ("garbage", os.urandom(1024)),
                ("vanish", "reload"),
            ]
            run_batch(master, control, pool, fixed)

            @settings(
                max_examples=50,
                deadline=None,
                database=None,
                suppress_health_check=[
                    HealthCheck.too_slow,
                    HealthCheck.data_too_large,
                    HealthCheck.filter_too_much,
                ],
            )
            @given(actions=st.lists(ACTIONS, min_size=1, max_size=6))
            def fuzz(actions: list[tuple[Any, ...]]) -> None:
                run_batch(master, control, pool, actions)

            fuzz()
            pool.drain()
        finally:
            pool.close()
        cuts = pool.check()
        assert len(cuts) >= 5
        assert master.process.poll() is None
        assert not master.named("master.crashed")
        # Nothing left behind: the master's fds are back to what they were.
        wait_until(lambda: open_fds(master.pid) == baseline_fds, 10, "the master's fds")
        grown = psutil.Process(master.pid).memory_info().rss - baseline_rss
        assert grown < 64 * 2**20, f"the master grew by {grown} bytes"
        print(f"fuzzing took {time.monotonic() - began:.1f} s; cuts {cuts}")
        master.signal(signal.SIGTERM)
        assert master.wait_exit(30) == 0


# -- 7. stop and scale ---------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_stop_is_graceful_and_returns_once_the_master_has_exited(
    tmp_path: Path, clients: Clients
) -> None:
    version = tmp_path / "version"
    version.write_text("v1")
    control = tmp_path / "ctl.sock"
    with running(demo_app(version), args=["--workers", "2", "--control", str(control)]) as m:
        port = start(m, control)
        workers = m.worker_pids()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(get, port, "/sleep?ms=4000", 30)
            wait_until(lambda: established(workers, port) == 1, 10, "the slow request")
            mark = m.mark()
            stopper = spawn(clients, "stop", "--control", str(control))
            m.wait_for("master.stopping", 30, after=mark)
            # While it stops (the slow request holds a worker): status says so, and a
            # reload is refused.
            assert status_of(control)["master"]["state"] == "stopping"
            refused = handoff("reload", "--control", str(control))
            assert refused.returncode == 1, shown(refused)
            assert len(error_lines(refused.stderr)) == 1, shown(refused)
            stopped = finish(stopper, 60)
            master_alive = alive(m.pid)
            assert slow.result(30)[0] == 200
        assert stopped.returncode == 0, shown(stopped)
        assert not master_alive, "handoff stop returned while the master still ran"
        assert m.wait_exit(30) == 0
        assert m.named("master.exited")[-1]["exit_code"] == 0
        assert not m.named("worker.killed")
    assert not control.exists()


@pytest.mark.timeout(120)
def test_scale_grows_and_shrinks_the_serving_generation_and_later_ones(tmp_path: Path) -> None:
    version = tmp_path / "version"
    version.write_text("v1")
    control = tmp_path / "ctl.sock"
    with running(demo_app(version), args=["--control", str(control)]) as master:
        port = start(master, control)
        with Load(port) as load:
            load.wait_for_requests(100)
            mark = master.mark()
            result = handoff("scale", "3", "--control", str(control))
            assert result.returncode == 0, shown(result)
            for slot in (1, 2):
                master.wait_for(
                    "worker.ready", 30, after=mark, where=lambda e, s=slot: e["worker"] == s
                )
            status = cli_status(handoff("status", "--json", "--control", str(control)))
            (generation,) = status["generations"]
            assert (generation["gen"], generation["state"], generation["size"]) == (
                1,
                "active",
                3,
            )
            pids = sorted(w["pid"] for w in generation["workers"])
            assert len(pids) == 3
            assert all(alive(pid) for pid in pids)
            assert all(w["state"] == "ready" for w in generation["workers"])
            load.wait_for_requests(100)

            mark = master.mark()
            result = handoff("scale", "1", "--control", str(control))
            assert result.returncode == 0, shown(result)
            exits = [
                master.wait_for(
                    "worker.exited", 30, after=mark, where=lambda e, s=slot: e["worker"] == s
                )
                for slot in (1, 2)
            ]
            assert all(e["expected"] and e["gen"] == 1 for e in exits), exits
            status = status_of(control)
            (generation,) = status["generations"]
            assert (generation["state"], generation["size"]) == ("active", 1), status
            assert [w["worker"] for w in generation["workers"]] == [0], status
            assert not master.named("worker.spawned", after=mark)
            assert not master.named("worker.respawn_scheduled", after=mark)
            assert not master.named("generation.draining", after=mark)
            # Asking for the size it has: the documented result line.
            assert request(control, {"v": 1, "cmd": "scale", "workers": 1}) == [
                {"v": 1, "type": "result", "ok": True, "workers": 1, "was": 1}
            ]
            load.wait_for_requests(100)

            # Later generations take the new size.
            mark = master.mark()
            result = handoff("reload", "--control", str(control))
            assert result.returncode == 0, shown(result)
            assert [e["workers"] for e in master.named("generation.started", after=mark)] == [1]
            load.wait_for_requests(100)
        assert load.stats.total_failures() == 0, load.stats.to_dict()

        for bad in ("0", "1025"):
            result = handoff("scale", bad, "--control", str(control))
            assert result.returncode != 0, shown(result)
            assert len(error_lines(result.stderr)) == 1, shown(result)
        master.signal(signal.SIGTERM)
        assert master.wait_exit(30) == 0


def mentions(event: Event, text: str) -> bool:
    return any(text in str(value) for value in event.values())


@pytest.mark.timeout(60)
def test_ttin_and_ttou_add_and_remove_a_worker_never_below_one(tmp_path: Path) -> None:
    control = tmp_path / "ctl.sock"
    args = ["--ready", "delay:0", "--workers", "2", "--control", str(control)]
    with running(["sleep", "1000"], args=args) as master:
        start(master, control)
        mark = master.mark()
        master.signal(signal.SIGTTOU)
        exited = master.wait_for("worker.exited", 10, after=mark)
        assert (exited["worker"], exited["expected"]) == (1, True), exited
        (generation,) = status_of(control)["generations"]
        assert generation["size"] == 1

        # At one worker, TTOU changes nothing (its handling is logged, naming the signal).
        mark = master.mark()
        master.signal(signal.SIGTTOU)
        handled = master.wait_for_any(lambda e: mentions(e, "TTOU"), 10, after=mark)
        assert not master.named("worker.exited", after=mark), handled
        (generation,) = status_of(control)["generations"]
        assert (generation["size"], len(generation["workers"])) == (1, 1)

        mark = master.mark()
        master.signal(signal.SIGTTIN)
        ready = master.wait_for("worker.ready", 10, after=mark)
        assert ready["worker"] == 1
        (generation,) = status_of(control)["generations"]
        assert (generation["size"], len(generation["workers"])) == (2, 2)
        master.signal(signal.SIGTERM)
        assert master.wait_exit(30) == 0


# -- 8. finding the master -----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_name_finds_the_master_under_xdg_runtime_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    env = {"XDG_RUNTIME_DIR": str(xdg)}
    expected = xdg / "handoff" / "locate-me.handoff.sock"
    args = ["--ready", "delay:0", "--name", "locate-me"]
    with running(["sleep", "1000"], args=args) as master:
        start(master, expected)
        assert stat.S_IMODE(expected.stat().st_mode) == 0o600
        status = cli_status(handoff("status", "--json", "--name", "locate-me", env=env))
        assert status["master"]["pid"] == master.pid
        assert status["master"]["control"] == str(expected)
        result = handoff("reload", "--name", "locate-me", env=env)
        assert result.returncode == 0, shown(result)

        other = xdg / "handoff" / "other.handoff.sock"
        result = handoff("status", "--name", "other", env=env)
        assert result.returncode == 1, shown(result)
        assert result.stderr.startswith(f"handoff: error: no handoff master at {other}")

        result = handoff("stop", "--name", "locate-me", env=env)
        assert result.returncode == 0, shown(result)
        assert master.wait_exit(30) == 0
    assert not expected.exists()


@pytest.mark.timeout(60)
def test_pidfile_and_the_default_name_find_the_master(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    env = {"XDG_RUNTIME_DIR": str(xdg)}
    pidfile = tmp_path / "master.pid"
    expected = xdg / "handoff" / "sleep.handoff.sock"  # NAME defaults to COMMAND's basename
    args = ["--ready", "delay:0", "--pidfile", str(pidfile)]
    with running(["sleep", "1000"], args=args) as master:
        start(master, expected)
        by_pidfile = cli_status(handoff("status", "--json", "--pidfile", str(pidfile)))
        assert by_pidfile["master"]["pid"] == master.pid
        assert by_pidfile["master"]["control"] == str(expected)
        by_name = cli_status(handoff("status", "--json", "--name", "sleep", env=env))
        assert by_name["master"]["pid"] == master.pid
        master.signal(signal.SIGTERM)
        assert master.wait_exit(30) == 0


@pytest.mark.timeout(60)
def test_runtime_directory_comes_before_xdg_runtime_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o755)
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    env = {"RUNTIME_DIRECTORY": str(runtime), "XDG_RUNTIME_DIR": str(xdg)}
    expected = runtime / "handoff.sock"
    with running(["sleep", "1000"], args=["--ready", "delay:0", "--name", "app"]) as master:
        start(master, expected)
        assert not (xdg / "handoff" / "app.handoff.sock").exists()
        status = cli_status(handoff("status", "--json", "--name", "app", env=env))
        assert status["master"]["pid"] == master.pid
        master.signal(signal.SIGTERM)
        assert master.wait_exit(30) == 0
    assert not expected.exists()


@pytest.mark.timeout(60)
def test_without_a_runtime_dir_the_socket_is_in_tmp_handoff_uid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    name = f"test-{uuid.uuid4().hex[:12]}"
    directory = Path(f"/tmp/handoff-{os.getuid()}")
    expected = directory / f"{name}.handoff.sock"
    with running(["sleep", "1000"], args=["--ready", "delay:0", "--name", name]) as master:
        start(master, expected)
        info = directory.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o700, os.getuid())
        status = cli_status(handoff("status", "--json", "--name", name))
        assert status["master"]["pid"] == master.pid
        master.signal(signal.SIGTERM)
        assert master.wait_exit(30) == 0
    assert not expected.exists()


@pytest.mark.timeout(60)
def test_a_stale_control_socket_file_is_replaced(tmp_path: Path) -> None:
    control = tmp_path / "ctl.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(control))  # left behind, as by a SIGKILLed master
    with running(["sleep", "1000"], args=["--ready", "delay:0", "--control", str(control)]) as m:
        start(m, control)
        assert status_of(control)["master"]["pid"] == m.pid
        m.signal(signal.SIGTERM)
        assert m.wait_exit(30) == 0


def assert_no_master(result: subprocess.CompletedProcess[str], path: Path) -> None:
    assert result.returncode == 1, shown(result)
    assert "Traceback" not in result.stderr, shown(result)
    lines = result.stderr.splitlines()
    assert lines, shown(result)
    assert lines[0].startswith(f"handoff: error: no handoff master at {path}"), shown(result)
    assert "is it running?" in result.stderr, shown(result)
    assert "--control" in result.stderr, shown(result)
    assert "--name" in result.stderr, shown(result)


@pytest.mark.parametrize("command", [["status"], ["reload"], ["stop"], ["scale", "2"]])
def test_no_master_is_a_clear_error(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "nothing.sock"
    assert_no_master(handoff(*command, "--control", str(path)), path)


def test_no_master_by_name_or_behind_a_stale_socket_is_a_clear_error(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    result = handoff("status", "--name", "absent", env={"XDG_RUNTIME_DIR": str(xdg)})
    assert_no_master(result, xdg / "handoff" / "absent.handoff.sock")

    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))  # a socket file nobody listens on: ECONNREFUSED
    assert_no_master(handoff("status", "--control", str(stale)), stale)


# -- the protocol lines themselves ---------------------------------------------------------


@pytest.mark.timeout(60)
def test_protocol_lines_are_as_documented(tmp_path: Path) -> None:
    control = tmp_path / "ctl.sock"
    args = ["--ready", "delay:0.5", "--workers", "2", "--control", str(control)]
    with running(["sleep", "1000"], args=args) as master:
        start(master, control)
        (error,) = request(control, {"v": 1, "cmd": "relaod"})
        assert error["error"] == "unknown command 'relaod'", error
        assert error["hint"] == "commands: status, reload, stop, scale", error

        replies = request(control, {"v": 1, "cmd": "reload", "wait": True})
        *progress, result = replies
        assert all(p["type"] == "progress" for p in progress), replies
        documented = ("generation.started", "worker.ready", "generation.draining")
        progress = [p for p in progress if p["event"] in documented]
        assert [(p["type"], p["event"], p["gen"]) for p in progress] == [
            ("progress", "generation.started", 2),
            ("progress", "worker.ready", 2),
            ("progress", "worker.ready", 2),
            ("progress", "generation.draining", 1),
        ], replies
        messages = [p["message"] for p in progress]
        assert messages[0].startswith("generation 2 started"), messages
        assert messages[1].startswith("generation 2: 1 of 2 workers ready"), messages
        assert messages[2].startswith("generation 2: 2 of 2 workers ready"), messages
        assert messages[3].startswith("generation 1 draining"), messages
        assert (result["type"], result["ok"], result["gen"]) == ("result", True, 2), result
        assert result["duration_s"] >= 0.5, result

        mark = master.mark()
        (started,) = request(control, {"v": 1, "cmd": "reload", "wait": False})
        (queued,) = request(control, {"v": 1, "cmd": "reload", "wait": False})
        assert (started["ok"], started["accepted"]) == (True, "started"), started
        assert (queued["ok"], queued["accepted"]) == (True, "queued"), queued
        master.wait_for("reload.succeeded", 10, after=mark, where=lambda e: e["gen"] == 4)

        (stopping,) = request(control, {"v": 1, "cmd": "stop"})
        assert stopping == {"v": 1, "type": "result", "ok": True, "pid": master.pid}
        assert master.wait_exit(30) == 0
