"""Chaos benchmark: one master under continuous load while a schedule injects faults.

    python -m bench.chaos [--reloads N] [--upgrades N] [--json OUT] [--no-doc]

A real master (the demo app, 2 workers, a control socket) runs under keep-alive and
fresh-connection load. The schedule, in order: hostile control input (nested JSON, huge
numbers, invalid UTF-8, a flood of bad requests, stalled clients), a notify flood from
another user (from the master's own user when not root) during a reload, internal faults
(HANDOFF_FAILPOINT: in reloads and in drains), N reloads and N upgrades interleaved, and
last the log reader going away (EPIPE) followed by more reloads and upgrades. After each
step that is not a reload, the serving workers must be the same processes.

Prints the figures and writes them as JSON (--json, default bench/results/chaos.json)
and as the table between the chaos markers of docs/reliability.md (unless --no-doc).
Exit status 0 when nothing failed: zero failed requests, zero workers lost, every
reload and upgrade ok, the master alive under the same pid throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from handoff.demo.load import LoadConfig, LoadGenerator

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- chaos:begin -->", "<!-- chaos:end -->"
# Two internal faults, both in the first reload (three within 60 s would be a crash loop).
FAILPOINTS = "reload.requested,generation.draining"


def ask(
    control: Path, payload: dict[str, Any] | bytes, timeout: float = 90.0
) -> list[dict[str, Any]]:
    """One control request; every line answered (bytes: sent as they are)."""
    line = payload if isinstance(payload, bytes) else (json.dumps(payload) + "\n").encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(control))
        sock.sendall(line)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(text) for text in data.decode().splitlines() if text.strip()]


def status(control: Path) -> dict[str, Any]:
    return ask(control, {"v": 1, "cmd": "status"}, 30)[-1]["status"]


def serving(control: Path) -> set[int]:
    return {
        w["pid"]
        for g in status(control)["generations"]
        if g["state"] == "active"
        for w in g["workers"]
    }


def resources(pid: int) -> dict[str, int]:
    process = psutil.Process(pid)
    return {
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "rss_bytes": process.memory_info().rss,
        "threads": process.num_threads(),
    }


# -- faults -----------------------------------------------------------------------------


def hostile_lines(control: Path) -> None:
    for raw in (
        b"[" * 5000 + b"\n",
        b'{"a":' * 5000 + b"\n",
        b'{"v": 1, "cmd": "scale", "workers": 1' + b"0" * 4000 + b"}\n",
        b'{"v": 1e999999, "cmd": "status"}\n',
        b'{"v": 1, "cmd": "st\xff\xfeatus"}\n',
        b'{"v": 1, "cmd": "\\ud800"}\n',
    ):
        reply = ask(control, raw, 10)
        assert reply[-1]["type"] == "error", reply


def request_flood(control: Path) -> None:
    for index in range(500):
        with contextlib.suppress(OSError):
            ask(control, f"garbage {index}\n".encode(), 10)


def stalled_clients(control: Path) -> None:
    """60 clients connect and say nothing, while status and reload must still answer."""
    held = []
    try:
        for _ in range(60):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(control))
            held.append(sock)
        started = time.monotonic()
        status(control)
        assert time.monotonic() - started < 2.0, "status was slow with stalled clients"
    finally:
        for sock in held:
            sock.close()


def notify_address(control: Path) -> str:
    pid = next(iter(serving(control)))
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"NOTIFY_SOCKET="))


def notify_flood(control: Path) -> subprocess.Popen[bytes]:
    """Another user (nobody, when root) floods the workers' notify socket."""
    address = notify_address(control)
    code = (
        "import socket,time\n"
        f"a=b'\\0'+{address[1:].encode()!r}\n"
        "s=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM)\n"
        "s.setblocking(False)\n"
        "end=time.monotonic()+8\n"
        "while time.monotonic()<end:\n"
        "  try: s.sendto(b'READY=1\\nSTATUS=flood',a)\n"
        "  except BlockingIOError: time.sleep(0.0005)\n"
    )
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    argv = [
        *(prefix if os.geteuid() == 0 and shutil.which("setpriv") else []),
        sys.executable,
        "-c",
        code,
    ]
    return subprocess.Popen(argv, start_new_session=True)


# -- the run ----------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:  # noqa: PLR0915 - one schedule, read top to bottom
    tmp = Path(tempfile.mkdtemp(prefix="handoff-chaos-"))
    version = tmp / "version"
    version.write_text("v1")
    control = tmp / "ctl.sock"
    log = (tmp / "master.log").open("wb")
    reader = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=log, start_new_session=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env["HANDOFF_FAILPOINT"] = FAILPOINTS
    argv = [
        sys.executable, "-m", "handoff", "run", "--log-format", "json", "--bind", "127.0.0.1:0",
        "--workers", "2", "--control", str(control), "--",
        sys.executable, "-m", "handoff.demo.app", "--version-file", str(version),
    ]  # fmt: skip
    master = subprocess.Popen(
        argv, stdout=reader.stdin, stderr=reader.stdin, env=env, start_new_session=True
    )
    assert reader.stdin is not None
    reader.stdin.close()
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(OSError, KeyError, IndexError, ValueError):
            if status(control)["master"]["state"] == "running":
                break
        assert master.poll() is None, "the master exited at start"
        assert time.monotonic() < deadline, "the master did not start within 60 s"
        await asyncio.sleep(0.1)
    port = int(status(control)["master"]["sockets"][0]["address"].rsplit(":", 1)[1])
    load = LoadGenerator(LoadConfig(port=port, keepalive_clients=4, fresh_clients=2, timeout_s=10))
    stop = asyncio.Event()
    load_task = asyncio.create_task(load.run(stop))
    steps: list[dict[str, Any]] = []
    lost: list[int] = []
    reload_s: list[float] = []
    try:
        await asyncio.sleep(1.0)
        before = resources(master.pid)

        async def step(name: str, action: Callable[[], object], *, replaces: bool = False) -> None:
            was = serving(control)
            started = time.monotonic()
            result = await asyncio.to_thread(action)
            seconds = round(time.monotonic() - started, 3)
            await asyncio.sleep(0.3)
            assert master.poll() is None, f"the master died at: {name}"
            if not replaces:
                lost.extend(sorted(was - serving(control)))
            steps.append({"step": name, "seconds": seconds, "result": result})

        def reload() -> object:
            reply = ask(control, {"v": 1, "cmd": "reload", "wait": True})[-1]
            assert reply.get("ok") is True, reply
            reload_s.append(float(reply["duration_s"]))
            return reply["duration_s"]

        def upgrade() -> object:
            reply = ask(control, {"v": 1, "cmd": "upgrade", "wait": True})[-1]
            assert reply.get("ok") is True, reply
            return reply["version"]

        def flooded_reload() -> object:
            flood = notify_flood(control)
            try:
                return reload()
            finally:
                flood.kill()
                flood.wait()

        await step(
            "control: nested JSON, huge numbers, invalid UTF-8", lambda: hostile_lines(control)
        )
        await step("control: 500 bad requests", lambda: request_flood(control))
        await step("control: 60 stalled clients", lambda: stalled_clients(control))
        await step("notify flood from another user, during a reload", flooded_reload, replaces=True)
        for index in range(args.reloads):
            # The first reloads meet the failpoints: the master re-executes mid-reload.
            await step(f"reload {index + 1}", reload, replaces=True)
            if index < args.upgrades:
                await step(f"upgrade {index + 1}", upgrade)
        for index in range(args.reloads, args.upgrades):
            await step(f"upgrade {index + 1}", upgrade)
        reader.kill()  # the log reader goes away: every line from now on gets EPIPE
        reader.wait()
        await step("log reader gone (EPIPE), then a reload", reload, replaces=True)
        await step("log reader gone (EPIPE), then an upgrade", upgrade)
        await asyncio.sleep(1.0)
        after = resources(master.pid)
        final = status(control)["master"]
    finally:
        stop.set()
        await asyncio.wait_for(load_task, 30)
        with contextlib.suppress(OSError, KeyError):
            ask(control, {"v": 1, "cmd": "stop"}, 10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            master.wait(60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(master.pid, signal.SIGKILL)
        reader.kill()
        log.close()
    events = [
        json.loads(line)
        for line in (tmp / "master.log").read_text().splitlines()
        if line.startswith("{")
    ]
    crashes = sum(1 for e in events if e.get("event") == "master.crashed")
    stats = load.stats
    upgrades = args.upgrades + 1
    return {
        "command": " ".join(["python -m bench.chaos", *sys.argv[1:]]),
        "requests_ok": stats.ok,
        "failures": {str(k): v for k, v in stats.failures.items() if v},
        "failed_requests": stats.total_failures(),
        "reexecs": final["reexecs"],
        "upgrades": upgrades,
        "crashes_recovered": crashes,
        "workers_lost": lost,
        "reloads": args.reloads + 2,
        "reload_s_median": sorted(reload_s)[len(reload_s) // 2] if reload_s else None,
        "log_lines_dropped": final["log_lines_dropped"],
        "notify_datagrams_dropped": final["notify_datagrams_dropped"],
        "master_before": before,
        "master_after": after,
        "master_exit_code": master.returncode,
        "steps": steps,
    }


def table(result: dict[str, Any]) -> str:
    before, after = result["master_before"], result["master_after"]
    rows = [
        ("requests served", result["requests_ok"]),
        ("failed requests", f"{result['failed_requests']} {result['failures'] or ''}".strip()),
        ("workers lost", len(result["workers_lost"])),
        (
            "re-execs (upgrades + crashes recovered)",
            f"{result['reexecs']} ({result['upgrades']} + {result['crashes_recovered']})",
        ),
        ("reloads, all ok", f"{result['reloads']} (median {result['reload_s_median']} s)"),
        ("log lines dropped (EPIPE)", result["log_lines_dropped"]),
        ("notify datagrams dropped (other user)", result["notify_datagrams_dropped"]),
        ("master fds before / after", f"{before['fds']} / {after['fds']}"),
        (
            "master RSS before / after (MiB)",
            f"{before['rss_bytes'] / 2**20:.1f} / {after['rss_bytes'] / 2**20:.1f}",
        ),
        ("master threads before / after", f"{before['threads']} / {after['threads']}"),
    ]
    lines = [f"`{result['command']}`", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    DOC.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--upgrades", type=int, default=10)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "chaos.json")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_doc:
        write_doc(table(result))
    ok = result["failed_requests"] == 0 and not result["workers_lost"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
