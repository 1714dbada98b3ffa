"""A real nginx and a real HAProxy in front of handoff, and HTTP load through them.

Both run in the foreground from the Debian packages' binaries, with a configuration
written into the test's own directory (pid file, logs, temporary files, admin socket
there too), never as system services; they listen on loopback only and are stopped by
their pid in teardown. `BalancerLoad` sends GET and POST requests over keep-alive
connections to the balancer from threads and counts every answer by status, so a 502
from the balancer is seen as what it is.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.waiting import wait_until

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
needs_nginx = pytest.mark.skipif(
    not os.access(NGINX, os.X_OK), reason="nginx is not installed (.ci/run installs it)"
)
needs_haproxy = pytest.mark.skipif(
    not os.access(HAPROXY, os.X_OK), reason="haproxy is not installed (.ci/run installs it)"
)
POST_BODY = b'{"order": 42, "note": "' + b"x" * 200 + b'"}'


def free_port(host: str) -> int:
    """A port free on `host` now (the balancer binds it right after)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def accepts(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


class Foreground:
    """A balancer process in the foreground, its output in a file, stopped by pid."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    def check_alive(self) -> bool:
        """True, or AssertionError with the output if the process has exited."""
        if self.process.poll() is not None:
            raise AssertionError(
                f"{self.log.name}: exited {self.process.returncode}:\n{self.output()}"
            )
        return True

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


# -- nginx ----------------------------------------------------------------------------------

NGINX_CONF = """\
worker_processes 1;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream app {{
        server {upstream};
        keepalive 16;
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
{extra}
        }}
    }}
}}
"""
# The remedy for servers that close idle keep-alive connections at SIGTERM (docs/fleet.md):
# a POST sent on a pooled connection the old worker has just closed is retried on a new one.
NGINX_RETRY_POST = "            proxy_next_upstream error timeout non_idempotent;"


@contextlib.contextmanager
def nginx(directory: Path, upstream: str, *, extra: str = "") -> Iterator[tuple[str, int]]:
    """nginx proxying 127.0.0.1:PORT to `upstream` (HOST:PORT); yields (host, port)."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port("127.0.0.1")
    conf = directory / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(dir=directory, upstream=upstream, listen=f"127.0.0.1:{port}", extra=extra)
    )
    argv = [NGINX, "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(conf)]
    argv += ["-g", "daemon off;"]
    proc = Foreground(argv, directory / "nginx.out")
    try:
        wait_until(lambda: proc.check_alive() and accepts("127.0.0.1", port), 10, "nginx listening")
        yield "127.0.0.1", port
    finally:
        proc.stop()


# -- HAProxy --------------------------------------------------------------------------------

HAPROXY_CONF = """\
global
    stats socket {dir}/admin.sock mode 600 level admin
    pidfile {dir}/haproxy.pid
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout check 2s
{retries}
frontend web
    bind {listen}
    default_backend app
backend app
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 500ms fall 2 rise 2
{servers}
"""
# A request whose connection is refused, or closed before any answer, goes to the other
# instance (docs/fleet.md); without these lines HAProxy retries nothing.
HAPROXY_RETRIES = """\
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response response-timeout"""


class Haproxy:
    """HAProxy balancing over handoff instances, health-checked on their /readyz."""

    def __init__(
        self, directory: Path, servers: dict[str, tuple[str, int, int]], *, retries: bool = True
    ) -> None:
        """servers: name -> (host, app port, health port)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = free_port("127.0.0.1")
        lines = [
            f"    server {name} {host}:{app} check addr {host} port {health}"
            for name, (host, app, health) in servers.items()
        ]
        conf = directory / "haproxy.cfg"
        conf.write_text(
            HAPROXY_CONF.format(
                dir=directory,
                listen=f"127.0.0.1:{self.port}",
                servers="\n".join(lines),
                retries=HAPROXY_RETRIES if retries else "    retries 0",
            )
        )
        self.proc = Foreground([HAPROXY, "-f", str(conf), "-db"], directory / "haproxy.out")

    def admin(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.directory / "admin.sock"))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def states(self) -> dict[str, str]:
        """Server name -> its status as HAProxy sees it (UP, DOWN, ...)."""
        self.proc.check_alive()
        out = self.admin("show stat")
        header = out.splitlines()[0].lstrip("# ").split(",")
        result = {}
        for line in out.splitlines()[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "app" and row.get("svname") not in ("BACKEND", None):
                result[row["svname"]] = row["status"].split(" ")[0]
        return result

    def wait_state(self, name: str, state: str, timeout: float = 15.0) -> None:
        wait_until(lambda: self.states().get(name) == state, timeout, f"HAProxy: {name} {state}")

    def stop(self) -> None:
        self.proc.stop()


@contextlib.contextmanager
def haproxy(
    directory: Path, servers: dict[str, tuple[str, int, int]], *, retries: bool = True
) -> Iterator[Haproxy]:
    balancer = Haproxy(directory, servers, retries=retries)
    try:
        socket_path = directory / "admin.sock"
        wait_until(
            lambda: (
                balancer.proc.check_alive() and (socket_path.exists() and accepts_unix(socket_path))
            ),
            10,
            "HAProxy's admin socket",
        )
        yield balancer
    finally:
        balancer.stop()


def accepts_unix(path: Path) -> bool:
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        return True
    return False


# -- load -----------------------------------------------------------------------------------


class BalancerLoad:
    """Threads sending GET and POST requests to a balancer over keep-alive connections.

    Every answer is counted by status; an exception (reset, timeout) counts as an error
    with its class name. A client whose connection fails opens a new one.
    """

    def __init__(self, host: str, port: int, *, clients: int = 4, timeout: float = 10.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.statuses: collections.Counter[tuple[str, int]] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.ok = 0
        self.slowest = 0.0  # seconds, the longest an answered request took
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]

    def _client(self, number: int) -> None:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        sent = 0
        while not self._stop.is_set():
            method = "POST" if (sent + number) % 2 else "GET"
            sent += 1
            began = time.monotonic()
            try:
                if method == "POST":
                    connection.request(
                        "POST", "/", body=POST_BODY, headers={"Content-Type": "application/json"}
                    )
                else:
                    connection.request("GET", "/")
                response = connection.getresponse()
                response.read()
                self._count(method, response.status, time.monotonic() - began)
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                with self._lock:
                    self.errors[f"{method} {type(exc).__name__}"] += 1
                time.sleep(0.005)  # a dead balancer must not become a busy loop
        connection.close()

    def _count(self, method: str, status: int, took: float) -> None:
        with self._lock:
            self.statuses[(method, status)] += 1
            self.slowest = max(self.slowest, took)
            if status < 500:
                self.ok += 1
            self._lock.notify_all()

    def server_errors(self) -> int:
        """Answers with a 5xx status (from the balancer: the app's own never are)."""
        with self._lock:
            return sum(n for (_, status), n in self.statuses.items() if status >= 500)

    def failed(self) -> int:
        """Requests without an answer from the app: 5xx from the balancer, or no answer."""
        with self._lock:
            return self.server_errors() + sum(self.errors.values())

    def summary(self) -> str:
        with self._lock:
            statuses = ", ".join(f"{m} {s}: {n}" for (m, s), n in sorted(self.statuses.items()))
            errors = dict(self.errors)
            return f"{statuses}; errors: {errors}; slowest answer {self.slowest:.3f} s"

    def wait_for_requests(self, count: int, timeout: float = 30.0) -> None:
        """Block until `count` more requests were answered by the app."""
        deadline = time.monotonic() + timeout
        with self._lock:
            target = self.ok + count
            while self.ok < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {count} answers within {timeout} s: {self.summary()}")
                self._lock.wait(remaining)

    def __enter__(self) -> BalancerLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)
        assert not any(t.is_alive() for t in self._threads), "load threads did not stop"
