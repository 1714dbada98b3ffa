"""What each tool's supervisor costs at rest: CPU wakeups per second and memory.

Each tool is started on its own (the sync pair's command), asked one request (so that it
is surely serving), left alone for a moment, then watched for --idle-seconds with no
load: the supervisor's context switches (voluntary and not, every thread:
/proc/PID/task/*/status) divided by the time, its CPU time, and its RSS. A supervisor that
polls wakes up every tick whether anything happens or not; one that waits on events does
not. "Supervisor" is the process that owns the socket and the workers: gunicorn's master
(gunicorn-hup), circusd, start_server, uWSGI's master, handoff's master (plus, listed
apart, its warden and output relay). A plain restart has no supervisor of its own (systemd
is): not measured.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from handoff.demo.drill import child_environment
from handoff.demo.master_process import bound_port, kill_everything, start_master, stop_master

from .runs import HANDOFF_READY_TIMEOUT_S, STARTUP_TIMEOUT_S, STOP_TIMEOUT_S, RunContext
from .scenarios import SYNC, gunicorn_argv
from .standalone_side import Standalone, free_port, socket_for
from .tools import TOOLS

SETTLE_S: Final = 1.0  # after the first answer, before watching
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Usage:
    switches: int
    cpu_s: float
    rss_bytes: int


def usage(pid: int) -> Usage:
    """Context switches of every thread, CPU time and RSS of one process."""
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                switches += int(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    rss = next(
        int(line.split()[1]) * 1024
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return Usage(switches, cpu_s, rss)


async def watch(pid: int, seconds: float) -> dict[str, float]:
    before, began = usage(pid), time.monotonic()
    await asyncio.sleep(seconds)  # nothing happens meanwhile: that is what is measured
    after, took = usage(pid), time.monotonic() - began
    return {
        "wakeups_per_s": round((after.switches - before.switches) / took, 2),
        "cpu_ms_per_s": round((after.cpu_s - before.cpu_s) * 1000 / took, 3),
        "rss_mib": round(after.rss_bytes / 1048576, 1),
    }


def helpers(master: int, workers: set[int]) -> dict[str, float]:
    """The RSS of handoff's helper processes (its children that are not workers)."""
    total = 0
    for child in Path(f"/proc/{master}/task/{master}/children").read_text().split():
        if int(child) not in workers:
            total += usage(int(child)).rss_bytes
    return {"helpers_rss_mib": round(total / 1048576, 1)}


async def idle_of_tools(keys: list[str], ctx: RunContext, seconds: float) -> dict[str, object]:
    """Each tool's figures at rest, or why it was not measured."""
    figures: dict[str, object] = {}
    for tool in TOOLS:
        if tool.key not in keys:
            continue
        if tool.key == "restart":
            figures[tool.key] = {"not_measured": "no supervisor of its own (systemd)"}
            continue
        if (why := tool.missing()) is not None:
            figures[tool.key] = {"not_measured": why}
            continue
        listener, port = socket_for(tool)
        version = ctx.workdir / f"version-idle-{tool.key}"
        version.write_text("v0")
        argv = tool.argv(port, SYNC, ctx.workdir, listener.fileno() if listener else -1,
                         (free_port(), free_port()))  # fmt: skip
        server = Standalone(tool, argv, listener, ctx.workdir / f"idle-{tool.key}.log", 0)
        try:
            await server.start(child_environment({"VERSION_FILE": str(version)}))
            if listener is not None:
                listener.close()
            await server.wait_serving(port)
            await asyncio.sleep(SETTLE_S)
            figures[tool.key] = await watch(server.pid, seconds)
        finally:
            await server.close()
        ctx.say(f"{tool.key} at rest: {figures[tool.key]}")
    if "handoff" in keys:
        figures["handoff"] = await _handoff_at_rest(ctx, seconds)
        ctx.say(f"handoff at rest: {figures['handoff']}")
    return figures


async def _handoff_at_rest(ctx: RunContext, seconds: float) -> dict[str, float]:
    version = ctx.workdir / "version-idle-handoff"
    version.write_text("v0")
    argv = [sys.executable, "-m", "handoff", "run", "--log-format", "json"]
    argv += ["--bind", "127.0.0.1:0", "--workers", "1", "--ready", "notify"]
    argv += ["--ready-timeout", f"{HANDOFF_READY_TIMEOUT_S:g}", "--"]
    argv += gunicorn_argv("fd://{fd}", SYNC, preload=True)
    process, output = await start_master(argv, child_environment({"VERSION_FILE": str(version)}))
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        bound_port(await output.next_event(frozenset({"listener.bound"}), deadline, "listener"))
        await output.next_event(frozenset({"master.ready"}), deadline, "master.ready")
        await asyncio.sleep(SETTLE_S)
        figures = await watch(process.pid, seconds)
        return figures | helpers(process.pid, output.worker_pids)
    finally:
        await stop_master(process, STOP_TIMEOUT_S)
        await kill_everything(process, output)
        await output.close()
