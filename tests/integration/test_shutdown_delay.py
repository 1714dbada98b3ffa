"""--shutdown-delay with a real master, real demo workers and real load.

A stop with a delay first makes the master `leaving` (not ready): the workers go on
serving every request for the delay, then the normal drain; a second stop skips the rest
of the delay; a reload during the delay is refused.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from tests.integration.control_harness import (
    Clients,
    finish,
    handoff,
    shown,
    spawn,
    start,
    status_of,
)
from tests.integration.harness import Event, Load, Master, running
from tests.integration.http import get
from tests.integration.waiting import wait_until

pytestmark = pytest.mark.integration
pytest_plugins = ("tests.integration.control_fixtures",)


def demo(tmp_path: Path) -> list[str]:
    version = tmp_path / "version"
    version.write_text("v1")
    return [sys.executable, "-m", "handoff.demo.app", "--version-file", str(version)]


def accepted(master: Master) -> int:
    """Connections the workers have accepted (established), as the kernel shows them."""
    return sum(
        1
        for pid in master.worker_pids()
        for conn in psutil.Process(pid).net_connections("tcp")
        if conn.status == psutil.CONN_ESTABLISHED
    )


def at(event: Event) -> float:
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


@pytest.mark.timeout(90)
def test_sigterm_with_a_delay_serves_on_for_the_delay_then_drains(tmp_path: Path) -> None:
    args = ["--workers", "2", "--shutdown-delay", "2", "--drain-timeout", "10"]
    with running(demo(tmp_path), args=args) as master:
        port = master.wait_ready()
        with Load(port, keepalive=2, fresh=2) as load:
            load.wait_for_requests(50)
            mark = master.mark()
            master.signal(signal.SIGTERM)
            leaving = master.wait_for("master.leaving", 10, after=mark)
            assert leaving["delay_s"] == 2.0
            assert leaving["reason"] == "stop requested (SIGTERM)"
            served_before = load.stats.ok
            # Fresh and keep-alive connections keep being served during the delay.
            load.wait_for_requests(100, timeout=1.5)
            status, body = get(port, "/", 5)
            assert status == 200
            assert body["generation"] == 1
            assert not master.named("master.stopping", mark), "the drain began early"
        assert load.stats.ok - served_before >= 100
        assert sum(load.stats.failures.values()) == 0, load.stats.recent_errors
        stopping = master.wait_for("master.stopping", 10, after=mark)
        assert at(stopping) - at(leaving) >= 1.9
        assert master.wait_exit(30) == 0
        exited = master.wait_for("master.exited")
        assert exited["exit_code"] == 0
        assert exited["reason"] == "stop requested (SIGTERM)"
        assert {e["exit_code"] for e in master.named("worker.exited")} == {0}


@pytest.mark.timeout(60)
def test_a_second_sigterm_skips_the_rest_of_the_delay(tmp_path: Path) -> None:
    args = ["--workers", "1", "--shutdown-delay", "300"]
    with running(demo(tmp_path), args=args) as master:
        master.wait_ready()
        mark = master.mark()
        master.signal(signal.SIGTERM)
        master.wait_for("master.leaving", 10, after=mark)
        second = time.monotonic()
        master.signal(signal.SIGTERM)
        master.wait_for("master.stopping", 10, after=mark)
        assert master.wait_exit(20) == 0
        assert time.monotonic() - second < 20


@pytest.mark.timeout(60)
def test_a_reload_during_the_delay_is_refused_and_the_workers_serve_on(tmp_path: Path) -> None:
    args = ["--workers", "1", "--shutdown-delay", "300"]
    with running(demo(tmp_path), args=args) as master:
        port = master.wait_ready()
        mark = master.mark()
        master.signal(signal.SIGTERM)
        master.wait_for("master.leaving", 10, after=mark)
        master.signal(signal.SIGHUP)
        refused = master.wait_for("reload.refused", 10, after=mark)
        assert refused["reason"] == "leaving: the master stops after --shutdown-delay"
        assert not master.named("generation.started", mark)
        assert get(port, "/", 5)[0] == 200
        master.signal(signal.SIGINT)  # a second stop, whatever the signal, skips the delay
        assert master.wait_exit(20) == 0


def send_request(sock: socket.socket) -> None:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")


def answer_status(sock: socket.socket) -> int:
    """The status code of the one answer on sock (read to the end)."""
    sock.settimeout(30)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return int(data.split(b" ", 2)[1])


def refused(port: int) -> bool:
    """Is a new connection refused? (A dropped SYN is sent again about 1 s later.)"""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=8).close()
    except ConnectionRefusedError:
        return True
    raise AssertionError("a new connection was accepted during the stop")


@pytest.mark.timeout(90)
def test_a_stop_serves_what_is_queued_and_refuses_what_comes_after(tmp_path: Path) -> None:
    """The worker is frozen (SIGSTOP) so that three connections wait in the accept queue
    when the stop begins; it is thawed during the settle, takes them while it is still on
    the socket, and answers them: nothing queued is dropped (`dropped` 0). A connection
    that comes after the door shut is refused, at once once the listener is closed."""
    args = ["--workers", "1", "--drain-timeout", "20", "--settle", "2"]
    with running(demo(tmp_path), args=args) as master:
        port = master.wait_ready()
        (worker,) = master.worker_pids()
        slow = concurrent.futures.ThreadPoolExecutor(1)
        in_flight = slow.submit(get, port, "/sleep?ms=3000", 30)
        wait_until(lambda: accepted(master) >= 1, 10, "the worker to accept the slow request")
        os.kill(worker, signal.SIGSTOP)
        queued = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        try:
            for sock in queued:
                send_request(sock)
            mark = master.mark()
            master.signal(signal.SIGTERM)
            closing = master.wait_for("listener.closing", 10, after=mark)
            assert closing["queued"] == 3, closing
        finally:
            os.kill(worker, signal.SIGCONT)
        assert [answer_status(sock) for sock in queued] == [200, 200, 200]
        assert refused(port)  # during the settle: the SYN is dropped, then refused
        closed = master.wait_for("listener.closed", 10, after=mark)
        assert closed["dropped"] == 0, closed
        assert refused(port)
        assert in_flight.result(30)[0] == 200
        slow.shutdown()
        assert master.wait_exit(30) == 0
        assert master.wait_for("master.exited")["dropped"] == 0
        for sock in queued:
            sock.close()


@pytest.mark.timeout(90)
def test_handoff_stop_leaves_status_says_so_and_a_second_stop_skips_the_delay(
    tmp_path: Path, clients: Clients
) -> None:
    control = tmp_path / "ctl.sock"
    args = ["--workers", "1", "--control", str(control), "--shutdown-delay", "300"]
    with running(demo(tmp_path), args=args) as master:
        port = start(master, control)
        mark = master.mark()
        first = spawn(clients, "stop", "--control", str(control), "--timeout", "60")
        master.wait_for("master.leaving", 30, after=mark)
        assert status_of(control)["master"]["state"] == "leaving"
        refused = handoff("reload", "--control", str(control))
        assert refused.returncode == 1, shown(refused)
        assert get(port, "/", 5)[0] == 200
        second = handoff("stop", "--control", str(control), "--timeout", "30")
        assert second.returncode == 0, shown(second)
        assert finish(first, 30).returncode == 0
        assert master.wait_exit(30) == 0
        leaving = master.named("master.leaving")[0]
        stopping = master.named("master.stopping")[0]
        assert leaving["reason"] == stopping["reason"] == "stop requested (control)"


@pytest.mark.timeout(60)
def test_a_stop_removes_a_unix_socket_file_once_nobody_accepts(tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    args = ["--workers", "1", "--drain-timeout", "20", "--settle", "1"]
    with running(demo(tmp_path), args=args, binds=(f"unix:{path}",)) as master:
        master.wait_for("master.ready", 60)
        slow = socket.socket(socket.AF_UNIX)
        slow.connect(str(path))
        slow.sendall(b"GET /sleep?ms=1500 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        # Taken by the worker at once, or during the settle: it stays on the socket till then.
        mark = master.mark()
        master.signal(signal.SIGTERM)
        closed = master.wait_for("listener.closed", 10, after=mark)
        assert closed["dropped"] == 0
        assert not path.exists()  # a new client is told at once: no such socket
        assert answer_status(slow) == 200  # what the worker holds is still served
        slow.close()
        assert master.wait_exit(30) == 0
