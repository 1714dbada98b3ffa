"""What a rollback costs: the switch time of ``handoff rollback`` per event loop, under load.

    python -m bench.rollback_switch [--cycles N] [--workers W] [--servers NAME,...]
                                    [--json OUT]

For each server of the event-loop matrix (uvicorn asyncio/h11, uvicorn uvloop/httptools,
gunicorn gthread, Node.js, Go), a real ``handoff run --keep-previous`` master under fresh
and keep-alive load (the project's load generator), and N cycles of: a new version on
disk, a reload waited for over the control socket, then ``rollback``. Per rollback:

- ``switch_ms``: the master's own time to act on the request (the parked workers put back,
  the serving ones taken off, the log lines written): the control result's field;
- the client's round trip for the rollback request (connect, request, answer);
- each worker's reattach (``worker.reattached`` ``took_ms``).

Printed and written (--json): medians and maxima per server, and the load's refused
connections and failed fresh-connection requests (expected 0). A server whose runtime is
missing (node, go) is reported as such, not dropped. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from handoff.cli.control_client import exchange
from handoff.demo.load import FailureClass, LoadConfig, LoadGenerator
from handoff.demo.master_process import (
    bound_port,
    kill_everything,
    start_master,
    stop_master,
)

REPO = Path(__file__).resolve().parents[1]
APPS = REPO / "tests" / "integration" / "apps"
BIN = Path(sys.executable).parent


def _uvicorn(loop: str, http: str) -> Callable[[Path], list[str]]:
    return lambda _: [
        str(BIN / "uvicorn"),
        *("--fd", "{fd}", "--loop", loop, "--http", http, "--log-level", "warning"),
        *("--app-dir", str(APPS), "versioned_app:asgi"),
    ]


SERVERS: dict[str, tuple[str, Callable[[Path], list[str]]]] = {
    "uvicorn-h11-asyncio": ("python", _uvicorn("asyncio", "h11")),
    "uvicorn-httptools-uvloop": ("python", _uvicorn("uvloop", "httptools")),
    "gunicorn-gthread-selectors": (
        "python",
        lambda _: [
            str(BIN / "gunicorn"),
            *("--bind", "fd://{fd}", "-k", "gthread", "--threads", "4", "--workers", "1"),
            *("--no-control-socket", "--chdir", str(APPS), "versioned_app:wsgi"),
        ],
    ),
    "node-libuv": (
        "node",
        lambda _: ["node", str(APPS / "servers" / "node_server.js"), "--fd", "{fd}"],
    ),
    "go-netpoll": ("go", lambda built: [str(built / "go_server"), "-fd", "{fd}"]),
}


def build_go(out: Path) -> None:
    cache = {"GOCACHE": "/tmp/handoff-go-cache", "GOPATH": "/tmp/handoff-gopath"}  # noqa: S108 - the tests' build cache
    env = {**os.environ, **cache}
    env.update(GOFLAGS="", GOPROXY="off")
    source = APPS / "servers" / "go_server.go"
    subprocess.run(
        ["go", "build", "-o", str(out / "go_server"), str(source)],
        check=True,
        env=env,
        cwd=out,
        timeout=300,
    )


async def _control(path: str, request: dict[str, object]) -> tuple[dict[str, object], float]:
    """The result line of one control request, and the client's round trip in ms."""
    began = time.perf_counter()
    lines = await asyncio.to_thread(lambda: list(exchange(path, {"v": 1, **request}, 120.0)))
    took_ms = (time.perf_counter() - began) * 1000
    result = lines[-1] if lines else {}
    if result.get("type") != "result" or not result.get("ok"):
        raise SystemExit(f"{request['cmd']}: {lines}")
    return result, took_ms


async def run_server(
    name: str, command: list[str], cycles: int, workers: int, work: Path
) -> dict[str, object]:
    version = work / "version"
    version.write_text("v0")
    control = str(work / f"{name}.sock")
    argv = [sys.executable, "-m", "handoff", "run", "--log-format", "json", "--bind", "127.0.0.1:0"]
    argv += [
        "--workers",
        str(workers),
        "--keep-previous",
        "600",
        "--control",
        control,
        "--",
        *command,
    ]
    env = {**os.environ, "VERSION_FILE": str(version), "DRAIN": "graceful"}
    process, output = await start_master(argv, env)
    switches: list[float] = []
    round_trips: list[float] = []
    reattach: list[float] = []
    try:
        deadline = time.monotonic() + 120
        port = bound_port(
            await output.next_event(frozenset({"listener.bound"}), deadline, "listener.bound")
        )
        await output.next_event(frozenset({"master.ready"}), deadline, "master.ready")
        generator = LoadGenerator(LoadConfig(port=port, keepalive_clients=2, fresh_clients=2))
        stop = asyncio.Event()
        load = asyncio.create_task(generator.run(stop))
        for cycle in range(1, cycles + 1):
            version.write_text(f"v{cycle}")
            await _control(control, {"cmd": "reload"})
            await asyncio.sleep(0.2)  # load on the new generation before rolling back
            result, round_trip = await _control(control, {"cmd": "rollback"})
            if result.get("path") != "reattach":
                raise SystemExit(f"{name}: rollback took the {result.get('path')} path: {result}")
            switches.append(float(str(result["switch_ms"])))
            round_trips.append(round_trip)
            for _ in range(workers):
                event = await output.next_event(
                    frozenset({"worker.reattached"}), time.monotonic() + 10, "worker.reattached"
                )
                reattach.append(float(event["took_ms"]))
        stop.set()
        await load
        stats = generator.stats
        await stop_master(process, 60)
    finally:
        await kill_everything(process, output)
        await output.close()
    return {
        "server": name,
        "cycles": cycles,
        "workers": workers,
        "switch_ms_median": round(statistics.median(switches), 3),
        "switch_ms_max": round(max(switches), 3),
        "round_trip_ms_median": round(statistics.median(round_trips), 3),
        "reattach_ms_per_worker_median": round(statistics.median(reattach), 3),
        "reattach_ms_per_worker_max": round(max(reattach), 3),
        "requests_ok": stats.ok,
        "refused": stats.failures.get(FailureClass.REFUSED, 0),
        "failed_fresh": sum(stats.failures_fresh.values()),
        "failed_keepalive": sum(stats.failures_keepalive.values()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.servers.split(","):
            runtime, command = SERVERS[name]
            if shutil.which(runtime) is None and runtime != "python":
                results.append({"server": name, "skipped": f"{runtime} is not installed"})
                print(f"{name}: skipped ({runtime} is not installed)")
                continue
            if runtime == "go":
                build_go(work)
            result = asyncio.run(run_server(name, command(work), args.cycles, args.workers, work))
            results.append(result)
            print(json.dumps(result))
    if args.json is not None:
        args.json.write_text(json.dumps({"command": sys.argv, "results": results}, indent=2) + "\n")
    clean = all(r.get("refused", 0) == 0 and r.get("failed_fresh", 0) == 0 for r in results)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
