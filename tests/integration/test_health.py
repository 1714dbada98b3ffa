"""The health endpoint (--health, docs/health.md): real masters, real workers (the demo
app), real HTTP clients, real load.

/readyz follows the master (503 while the first generation starts, 200 once it serves,
503 from the first moment of a stop), /livez answers while the loop turns, and hostile
clients (slowloris, garbage, huge heads, thousands of connections) are bounded: they
neither stop a reload under load from succeeding nor the master from answering.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from handoff.formats.http_request import MAX_HEAD
from handoff.master.health_server import MAX_CLIENTS, REQUEST_DEADLINE_S
from tests.integration.control_harness import demo_app
from tests.integration.harness import Load, Master, running
from tests.integration.waiting import wait_until

pytestmark = pytest.mark.integration


def exchange(address: str | int, data: bytes, timeout: float = 10.0) -> tuple[int, str]:
    """Send data to the endpoint (a unix path, or a port on 127.0.0.1); (status, body)."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address if isinstance(address, str) else ("127.0.0.1", address))
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode()


def fetch(address: str | int, path: str) -> tuple[int, str]:
    return exchange(address, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def app(tmp_path: Path) -> list[str]:
    (tmp_path / "version").write_text("v1")
    return demo_app(tmp_path / "version")


def control(tmp_path: Path) -> list[str]:
    return ["--control", str(tmp_path / "control.sock")]


def probe(tmp_path: Path, *args: str) -> tuple[int, str]:
    """`handoff probe` against the test's master: (exit code, its output)."""
    argv = [sys.executable, "-m", "handoff", "probe", *control(tmp_path), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    return done.returncode, (done.stdout + done.stderr).strip()


def health_port(master: Master) -> int:
    return int(master.wait_for("health.listening")["port"])


@pytest.mark.timeout(90)
def test_readyz_follows_the_first_generation_and_the_stop(tmp_path: Path) -> None:
    health = str(tmp_path / "health.sock")
    go = tmp_path / "go"  # the worker starts its server once the test creates this file
    args = ["--health", f"unix:{health}"]
    # The workers ignore WINCH: the stop lasts until --drain-timeout, long enough to look.
    args += ["--stop-signal", "WINCH", "--drain-timeout", "4", "--settle", "0"]
    waiting = f"until [ -e {go} ]; do sleep 0.05; done; exec {shlex.join(app(tmp_path))}"
    with running(["sh", "-c", waiting], args=[*control(tmp_path), *args]) as master:
        master.wait_for("health.listening")
        status, body = fetch(health, "/readyz")
        assert (status, body) == (503, "not ready: starting: no generation is ready yet\n")
        assert fetch(health, "/livez") == (200, "live\n")
        code, said = probe(tmp_path)
        assert code == 1, said
        assert "not ready: starting: no generation is ready yet" in said
        assert probe(tmp_path, "--live") == (0, "live")
        go.touch()
        master.wait_for("master.ready", 30)
        assert fetch(health, "/readyz") == (200, "ready\n")
        assert probe(tmp_path) == (0, "ready")
        assert probe(tmp_path, "--ready") == (0, "ready")
        mark = master.mark()
        master.signal(signal.SIGTERM)
        master.wait_for("master.stopping", 10, after=mark)
        assert fetch(health, "/readyz") == (
            503,
            "not ready: stopping: stop requested (SIGTERM)\n",
        )
        assert fetch(health, "/livez") == (200, "live\n")
        code, said = probe(tmp_path)
        assert code == 1, said
        assert "not ready: stopping" in said
        assert probe(tmp_path, "--live")[0] == 0
        assert master.wait_exit(30) == 0
        code, said = probe(tmp_path, "--live")  # no master: not live
        assert code == 1, said
        assert not Path(health).exists()  # the endpoint's socket file is removed at exit


@pytest.mark.timeout(60)
def test_answers_bad_requests_with_one_line(tmp_path: Path) -> None:
    with running(app(tmp_path), args=[*control(tmp_path), "--health", "127.0.0.1:0"]) as master:
        port = health_port(master)
        master.wait_for("master.ready", 30)
        assert exchange(port, b"HEAD /readyz HTTP/1.0\r\n\r\n") == (200, "")
        assert exchange(port, b"GET /readyz?verbose=1 HTTP/1.1\r\n\r\n") == (200, "ready\n")
        status, body = fetch(port, "/metricz")
        assert status == 404
        assert body == "no such path: '/metricz'; hint: the paths are /livez, /readyz, /metrics\n"
        assert exchange(port, b"POST /readyz HTTP/1.1\r\n\r\n")[0] == 405
        assert exchange(port, b"\x16\x03\x01 garbage\r\n\r\n")[0] == 400
        huge = b"GET /livez HTTP/1.1\r\nX: " + b"a" * (2 * MAX_HEAD)
        assert exchange(port, huge)[0] == 431


@contextlib.contextmanager
def raised_fd_limit(needed: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, needed)), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def slowloris(port: int, count: int) -> list[socket.socket]:
    """Connections that send half a request head and then nothing."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET /livez HTTP/1.1\r\nX-Slow: ")
        socks.append(sock)
    return socks


def flood(port: int, count: int) -> list[socket.socket]:
    """Connections opened without waiting (non-blocking connect), never written to."""
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        socks.append(sock)
    return socks


@pytest.mark.timeout(120)
def test_hostile_clients_do_not_stop_a_reload_or_the_master(tmp_path: Path) -> None:
    args = ["--health", "127.0.0.1:0", "--workers", "2"]
    with raised_fd_limit(4096), running(app(tmp_path), args=[*control(tmp_path), *args]) as master:
        port = master.wait_ready()
        health = health_port(master)
        (tmp_path / "version").write_text("v2")
        opened: list[socket.socket] = []
        try:
            with Load(port) as load:
                load.wait_for_requests(50)
                opened += slowloris(health, MAX_CLIENTS)
                started = time.monotonic()
                opened += flood(health, 2000)
                for _ in range(20):  # garbage and huge heads, answered and closed
                    assert exchange(health, os.urandom(512) + b"\r\n\r\n")[0] in (400, 503)
                    assert exchange(health, b"GET / HTTP/1.1\r\nX: " + b"a" * 20000)[0] in (
                        431,
                        503,
                    )
                outcome = master.reload(60)
                assert outcome["event"] == "reload.succeeded", outcome
                load.wait_for_requests(50)
            assert sum(load.stats.failures.values()) == 0, load.stats.recent_errors
            # The slow clients are cut at their deadline, with a 408.
            for sock in opened[:MAX_CLIENTS]:
                sock.settimeout(REQUEST_DEADLINE_S + 10)
                answer = sock.recv(4096)
                assert answer.startswith((b"HTTP/1.1 408 ", b"HTTP/1.1 503 "))
            assert time.monotonic() - started < REQUEST_DEADLINE_S + 10
        finally:
            for sock in opened:
                sock.close()
        wait_until(lambda: fetch(health, "/livez") == (200, "live\n"), 10, "/livez answers")
        assert fetch(health, "/readyz") == (200, "ready\n")
        assert master.process.poll() is None
        master.signal(signal.SIGTERM)
        assert master.wait_exit(30) == 0


def run_handoff(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "handoff", "run", "--log-format", "json", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.timeout(60)
def test_bad_health_address_is_a_usage_error_and_a_taken_port_exit_1(tmp_path: Path) -> None:
    bad = run_handoff("--health", "fd:3", "--", sys.executable, "-c", "pass")
    assert bad.returncode == 2, bad.stderr
    assert "the health endpoint takes HOST:PORT or unix:PATH" in bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        control = str(tmp_path / "c.sock")
        result = run_handoff(
            "--control",
            control,
            "--bind",
            "127.0.0.1:0",
            "--health",
            f"127.0.0.1:{port}",
            "--",
            *app(tmp_path),
        )
    assert result.returncode == 1, result.stderr
    assert f"127.0.0.1:{port}" in result.stderr
    assert "in use" in result.stderr


def samples_of(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text page, by its name and labels."""
    found = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name and not line.startswith("#"):
            found[name] = float(value)
    return found


def counters_of(text: str) -> dict[str, float]:
    """Every `_total` sample of a Prometheus text page, by its name and labels."""
    return {name: value for name, value in samples_of(text).items() if "_total" in name}


class Scraper:
    """GET /metrics every 100 ms in a thread; every counter must only go up."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.scrapes = 0
        self.failures: list[str] = []
        self.last: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):  # the scrape interval, not a synchronisation
            try:
                status, body = fetch(self.port, "/metrics")
            except OSError as exc:
                self.failures.append(f"scrape: {exc!r}")
                continue
            if status != 200:
                self.failures.append(f"scrape: {status} {body[:200]}")
                continue
            now = counters_of(body)
            went_back = {k: (v, now.get(k)) for k, v in self.last.items() if now.get(k, -1) < v}
            if went_back:
                self.failures.append(f"counters went back: {went_back}")
            self.last = now
            self.scrapes += 1

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.mark.timeout(180)
def test_metrics_scraped_every_100ms_during_10_reloads_and_a_reexec(tmp_path: Path) -> None:
    args = [*control(tmp_path), "--health", "127.0.0.1:0", "--workers", "2"]
    with running(app(tmp_path), args=args) as master:
        port = master.wait_ready()
        health = health_port(master)
        durations = []
        with Load(port) as load, Scraper(health) as scraper:
            for number in range(10):
                (tmp_path / "version").write_text(f"v{number + 2}")
                outcome = master.reload(60)
                assert outcome["event"] == "reload.succeeded", outcome
                durations.append(outcome["duration_s"])
            mark = master.mark()
            scrapes_before_reexec = scraper.scrapes
            upgraded = subprocess.run(
                [sys.executable, "-m", "handoff", "upgrade", *control(tmp_path)],
                capture_output=True,
                text=True,
                timeout=90,
                check=False,
            )
            assert upgraded.returncode == 0, upgraded.stderr
            master.wait_for("master.resumed", 30, after=mark)
            load.wait_for_requests(20)
            wait_until(
                lambda: scraper.scrapes > scrapes_before_reexec + 5, 30, "scrapes after the re-exec"
            )
        # The re-exec keeps the socket: scrapes wait in its queue, none is refused.
        assert scraper.failures == [], scraper.failures
        assert scrapes_before_reexec >= 10, scrapes_before_reexec
        assert sum(load.stats.failures.values()) == 0, load.stats.recent_errors
        status, body = fetch(health, "/metrics")
        assert status == 200
        counters = counters_of(body)
        assert counters['handoff_reloads_total{outcome="succeeded"}'] == 10
        assert counters["handoff_master_reexecs_total"] == 1
        assert "handoff_reload_duration_seconds_count 10.0" in body
        # 2 workers at the start and 2 per reload became ready; 2 old ones detached each time
        samples = samples_of(body)
        assert samples["handoff_worker_ready_duration_seconds_count"] == 22
        assert counters['handoff_workers_detached_total{path="epoll"}'] == 20
        active = [name for name in samples if 'state="active"' in name and "rss_bytes" in name]
        assert len(active) == 1, body
        assert samples[active[0]] > 1_000_000, body
        assert 'handoff_workers{state="ready"} 2.0' in body
        assert f'handoff_listener_accept_queue{{address="127.0.0.1:{port}"}}' in body
        print(f"reload durations with scrapes every 100 ms: {durations}")


@pytest.mark.timeout(120)
def test_the_metrics_bench_runs(tmp_path: Path) -> None:
    """A short run of bench/metrics_scrape.py, so that it cannot rot (figures: bench)."""
    out = tmp_path / "result.json"
    argv = [sys.executable, "-m", "bench.metrics_scrape", "--rounds", "1", "--scrapes", "5"]
    argv += ["--reloads", "1", "--workers", "1", "--json", str(out)]
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=100, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["/metrics"]["answer_bytes"] > 1000
    assert result["reloads"]["reload_median_s"] > 0
