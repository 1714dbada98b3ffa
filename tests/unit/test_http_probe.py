"""One try of the http: probe (system/http_probe.py) against a server in this process.

The server is a thread of the test process, so "the worker's tree" is this process
when the answer must count, and kthreadd's (pid 2, kernel threads only) when it must
not: the probe finds the server side of its connection by the 4-tuple either way.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from handoff.core.model import Pid
from handoff.formats.http_check import DEFAULT_STATUSES, Report
from handoff.system.http_probe import Target, probe_target, try_once

ME = Pid(os.getpid())
KTHREADD = Pid(2)


@contextlib.contextmanager
def server(family: int, address: object, answer: bytes) -> Iterator[socket.socket]:
    """A listener whose thread answers every whole request with answer."""
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # the listener was closed
            with conn, contextlib.suppress(OSError):
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break  # a request cut short: the next connection
                    data += chunk
                else:
                    conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the thread's accept
        listener.close()
        thread.join(10)


def target_of(listener: socket.socket) -> Target:
    found = probe_target(listener)
    assert found is not None
    return found


def test_an_answer_from_the_workers_own_tree_counts() -> None:
    with server(socket.AF_INET, ("127.0.0.1", 0), b"HTTP/1.1 200 OK\r\n\r\n") as listener:
        report = try_once(ME, target_of(listener), "/healthz", DEFAULT_STATUSES, 5.0)
    assert report == Report(
        ok=True, detail=f"HTTP 200 OK from pid {ME} (GET /healthz)", answer="HTTP 200 OK"
    )


def test_a_status_out_of_range_is_the_answer_but_not_ready() -> None:
    answer = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
    with server(socket.AF_INET, ("0.0.0.0", 0), answer) as listener:
        target = target_of(listener)
        assert target.host == "127.0.0.1"
        report = try_once(ME, target, "/healthz", DEFAULT_STATUSES, 5.0)
    assert not report.ok
    assert report.answer == "HTTP 503 Service Unavailable"
    assert report.detail.endswith("(GET /healthz; want 200-299)")


def test_an_answer_from_outside_the_workers_tree_is_not_counted() -> None:
    with server(socket.AF_INET, ("127.0.0.1", 0), b"HTTP/1.1 200 OK\r\n\r\n") as listener:
        report = try_once(KTHREADD, target_of(listener), "/", DEFAULT_STATUSES, 5.0)
    assert report == Report(
        ok=False,
        detail="accepted 100 times by processes outside the worker's tree (an older "
        "generation), not by the worker within 5 s",
    )


def test_unix_and_not_http() -> None:
    path = f"/tmp/handoff-probe-test-{os.getpid()}.sock"  # short: sun_path has 108 bytes
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    try:
        with server(socket.AF_UNIX, path, b"SSH-2.0-nope\r\n") as listener:
            target = target_of(listener)
            assert (target.unix, target.host_header()) == (path, "localhost")
            report = try_once(ME, target, "/", DEFAULT_STATUSES, 5.0)
    finally:
        os.unlink(path)
    assert report == Report(
        ok=False, detail=f"pid {ME} answered GET / with 'SSH-2.0-nope\\r\\n', not HTTP"
    )


def test_nobody_accepting_is_a_timeout() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        report = try_once(ME, target_of(listener), "/", DEFAULT_STATUSES, 0.3)
    assert report == Report(ok=False, detail="not accepted within 0.3 s")


def test_nothing_listening() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    report = try_once(ME, Target(host="127.0.0.1", port=port), "/", DEFAULT_STATUSES, 1.0)
    assert report == Report(
        ok=False, detail=f"cannot connect to 127.0.0.1:{port}: Connection refused"
    )


@pytest.mark.parametrize(("family", "bind", "host"), [(socket.AF_INET6, ("::", 0), "::1")])
def test_ipv6_wildcard_is_probed_on_loopback(family: int, bind: tuple[str, int], host: str) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with socket.socket(family) as listener:
        listener.bind(bind)
        target = target_of(listener)
    assert target.host == host
    assert target.host_header() == f"[::1]:{target.port}"
