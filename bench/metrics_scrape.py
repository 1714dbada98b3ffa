"""What a /metrics scrape costs the master: milliseconds per answer, master CPU per scrape.

    python -m bench.metrics_scrape [--scrapes N] [--workers W] [--rounds R] [--reloads K]
                                   [--json OUT]

A real `handoff run --health 127.0.0.1:0` master with W demo-app workers (idle: no load)
is asked GET /metrics N times in a row, one fresh connection each (as Prometheus does),
then GET /livez N times as a baseline (the endpoint's own cost without the rendering).
Measured: each answer's latency at the client (connect to last byte), and the master's
CPU time (utime + stime from /proc/PID/stat) over the N scrapes, divided by N. Then K
pairs of reloads, alternately without scrapes and with a scraper asking /metrics every
100 ms: each reload's own duration (`reload.succeeded` `duration_s`), so that what the
scrapes cost the reloads shows as a ratio of medians. The figures are medians over the
rounds. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def master_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    if not answer.startswith(b"HTTP/1.1 200 "):
        raise SystemExit(f"GET {path}: {answer[:200]!r}")
    return answer


CONTROL = f"/tmp/handoff-bench-{os.getpid()}.sock"  # noqa: S108


def start(workers: int) -> tuple[subprocess.Popen[bytes], int]:
    argv = [sys.executable, "-m", "handoff", "run", "--log-format", "json"]
    argv += ["--bind", "127.0.0.1:0", "--health", "127.0.0.1:0", "--workers", str(workers)]
    argv += ["--control", CONTROL]
    argv += ["--", sys.executable, "-m", "handoff.demo.app"]
    master = subprocess.Popen(argv, stderr=subprocess.PIPE, start_new_session=True)
    assert master.stderr is not None
    port = ready = None
    for raw in master.stderr:
        if not raw.startswith(b"{"):
            continue
        event = json.loads(raw)
        if event["event"] == "health.listening":
            port = int(event["port"])
        if event["event"] == "master.ready":
            ready = True
        if port is not None and ready:
            return master, port
    raise SystemExit("the master exited before it was ready")


def measure(pid: int, port: int, path: str, scrapes: int) -> dict[str, float]:
    latencies = []
    cpu_before = master_cpu_s(pid)
    size = 0
    for _ in range(scrapes):
        began = time.perf_counter()
        size = len(get(port, path))
        latencies.append((time.perf_counter() - began) * 1000)
    cpu = master_cpu_s(pid) - cpu_before
    latencies.sort()
    return {
        "median_ms": statistics.median(latencies),
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1],
        "master_cpu_ms_per_request": cpu * 1000 / scrapes,
        "answer_bytes": size,
    }


def next_event(stream: IO[bytes], name: str) -> dict[str, object]:
    for raw in stream:
        if raw.startswith(b"{") and (event := json.loads(raw))["event"] == name:
            return dict(event)
    raise SystemExit(f"the master exited before {name}")


def reload_duration(master: subprocess.Popen[bytes]) -> float:
    """One reload through the control socket; its duration as the master measured it."""
    assert master.stderr is not None
    argv = [sys.executable, "-m", "handoff", "reload", "--control", CONTROL]
    subprocess.run(argv, check=True, capture_output=True, timeout=120)
    return float(str(next_event(master.stderr, "reload.succeeded")["duration_s"]))


def reloads(master: subprocess.Popen[bytes], port: int, count: int) -> dict[str, float]:
    """Median reload durations without scrapes and with one every 100 ms, interleaved."""
    plain: list[float] = []
    scraped: list[float] = []
    for _ in range(count):
        plain.append(reload_duration(master))
        stop = threading.Event()

        def scrape(done: threading.Event = stop) -> None:
            while not done.wait(0.1):
                get(port, "/metrics")

        scraper = threading.Thread(target=scrape)
        scraper.start()
        try:
            scraped.append(reload_duration(master))
        finally:
            stop.set()
            scraper.join(30)
    without, with_scrapes = statistics.median(plain), statistics.median(scraped)
    return {
        "reload_median_s": without,
        "reload_median_s_scraped_every_100ms": with_scrapes,
        "ratio": with_scrapes / without,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scrapes", type=int, default=500)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rounds: dict[str, list[dict[str, float]]] = {"/metrics": [], "/livez": [], "reloads": []}
    for _ in range(args.rounds):
        master, port = start(args.workers)
        try:
            for path in ("/metrics", "/livez"):
                rounds[path].append(measure(master.pid, port, path, args.scrapes))
            rounds["reloads"].append(reloads(master, port, args.reloads))
        finally:
            master.send_signal(signal.SIGTERM)
            master.wait(60)
    result = {
        path: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for path, runs in rounds.items()
    }
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **result}))


if __name__ == "__main__":
    main()
