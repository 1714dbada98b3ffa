"""Detach is reversible: a worker taken off the listening socket is put back, and accepts.

The groundwork of the blue-green rollback (issue 12): ``detach`` records each epoll
registration it removes with the mask and data fdinfo shows, and ``reattach`` adds it
back with ``EPOLL_CTL_ADD``, same key, mask and data. Checked on real servers holding a
socket the test owns: the demo app (asyncio: data is the fd number) and the Go server
(netpoll: edge-triggered, a pointer as data, so a wrong data would crash or hang it).
While detached, a new connection waits in the queue, unanswered; once put back, the
worker answers it, then new ones.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from handoff.core.model import Pid
from handoff.system.detach import detach, reattach
from handoff.system.listen_queue import accept_queue
from tests.integration.harness import APPS
from tests.integration.launch import socket_at_fd3
from tests.integration.test_servers_other import _runtime_or_skip, go_bin  # noqa: F401
from tests.integration.waiting import wait_until

pytestmark = pytest.mark.integration
if os.geteuid() != 0:
    pytestmark = [pytestmark, pytest.mark.skip(reason="pidfd_getfd needs root (ptrace)")]

REQUEST = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


def demo(_: pytest.FixtureRequest) -> list[str]:
    return [sys.executable, "-m", "handoff.demo.app"]


def go(request: pytest.FixtureRequest) -> list[str]:
    _runtime_or_skip("go")
    return [str(request.getfixturevalue("go_bin") / "go_server"), "-fd", "3"]


def node(_: pytest.FixtureRequest) -> list[str]:
    _runtime_or_skip("node")
    return ["node", str(APPS / "servers" / "node_server.js"), "--fd", "3"]


def uvicorn_uvloop(_: pytest.FixtureRequest) -> list[str]:
    uvicorn = str(Path(sys.executable).parent / "uvicorn")
    args = ["--fd", "3", "--loop", "uvloop", "--http", "httptools", "--log-level", "warning"]
    return [uvicorn, *args, "--app-dir", str(APPS), "versioned_app:asgi"]


def gunicorn_gthread(_: pytest.FixtureRequest) -> list[str]:
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    args = ["--bind", "fd://3", "-k", "gthread", "--threads", "2", "--workers", "1"]
    return [gunicorn, *args, "--no-control-socket", "--chdir", str(APPS), "versioned_app:wsgi"]


# The event loops detach supports: asyncio, Go's netpoll, libuv, uvloop, selectors (gthread).
SERVERS: dict[str, Callable[[pytest.FixtureRequest], list[str]]] = {
    "demo-asyncio": demo,
    "go": go,
    "node": node,
    "uvicorn-uvloop": uvicorn_uvloop,
    "gunicorn-gthread": gunicorn_gthread,
}


def worker_on(
    listener: socket.socket, command: list[str], version: Path
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """command started with listener at fd 3 (and LISTEN_PID its own pid)."""
    env = {**os.environ, "DRAIN": "plain", "VERSION_FILE": str(version)}
    if "handoff.demo.app" in command:  # the demo app takes its socket the systemd way only
        env["LISTEN_FDS"] = "1"
    return socket_at_fd3(listener.fileno(), command, env)


def answer(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def served(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 2) as sock:
        sock.sendall(REQUEST)
        return answer(sock, 5).startswith(b"HTTP/1.1 200")
    return False


@pytest.mark.timeout(120)
@pytest.mark.parametrize("server", list(SERVERS))
def test_a_detached_worker_put_back_accepts_again(
    request: pytest.FixtureRequest, tmp_path: Path, server: str
) -> None:
    command = SERVERS[server](request)
    version = tmp_path / "version"
    version.write_text("v1")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        inodes = {os.fstat(listener.fileno()).st_ino: listener.fileno()}
        with worker_on(listener, command, version) as worker:
            wait_until(lambda: worker.poll() is not None or served(port), 60, f"{server} to answer")
            assert worker.poll() is None, f"the {server} server exited {worker.returncode}"

            detached = detach(Pid(worker.pid), inodes)
            assert detached.path == "epoll", detached
            removed = detached.removed
            assert removed, detached
            assert all(r.target.events for r in removed), removed

            with socket.create_connection(("127.0.0.1", port), 5) as waiting:
                waiting.sendall(REQUEST)
                queued = lambda: (accept_queue(listener) or (0, 0))[0] == 1  # noqa: E731
                wait_until(queued, 10, "the request in the queue")
                with pytest.raises(TimeoutError):
                    answer(waiting, 0.5)  # nobody accepts it: the worker is off the socket

                began = time.perf_counter()
                assert reattach(removed, inodes) == len(removed)
                took_ms = (time.perf_counter() - began) * 1000
                print(f"{server}: {len(removed)} registration(s) put back in {took_ms:.2f} ms")

                assert answer(waiting, 10).startswith(b"HTTP/1.1 200"), "queued one unserved"
            assert served(port)
            assert worker.poll() is None, "the worker died of its registration put back"
            assert reattach(removed, inodes) == len(removed)  # EEXIST: already in place
            assert served(port)
