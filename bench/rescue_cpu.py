"""What keep-alive rescue costs the master: CPU per reload, and its loop's responsiveness.

    python -m bench.rescue_cpu [--reloads R] [--connections 16,256] [--json OUT]

For each number N of keep-alive connections, two real ``handoff run`` masters one after
the other, without and with ``--rescue-keepalive``, each with 2 workers of uvicorn
(``--fd {fd} --loop asyncio --http h11``, tests/integration/apps/versioned_app.py: its
shutdown closes idle keep-alive connections, the race rescue exists for) under the
project's load generator: N keep-alive clients and 2 fresh-connection clients, without
pause. Each master is reloaded 2 x R times (SIGHUP, a new version on disk each time),
alternately:

- quiet reloads: nothing else talks to the master. Measured from just before the SIGHUP
  until the old generation is gone and (with rescue) every old worker's
  ``rescue.finished`` is out: the master's CPU time (psutil ``cpu_times`` user + system,
  in clock ticks of 10 ms), and the ``rescue_cpu_us`` counter's delta (``handoff status``;
  the master's own thread time inside rescue). The extra cost of rescue per reload is the
  difference of the medians with and without it;
- pinged reloads: a separate process sends ``status`` requests over the control socket
  back to back (handoff.cli.control_client.exchange), from 0.5 s before the SIGHUP until
  the reload has settled. Each round trip is classed as at rest (before the SIGHUP),
  during the reload (SIGHUP to settled) and in the stop window (from the first old
  worker's stop signal to 0.5 s after the last one: while rescue looks at the old
  workers' connections every 2 ms). Status requests cost the master CPU, hence the
  split: the quiet reloads' CPU is not theirs.

Every reload: the settle timer's lateness per old worker, from the master's debug events
(``worker.signalled`` - ``worker.detached`` - ``--settle``; it includes the copy of the
worker's connections, which comes just before its signal); the connections copied, handed
on and released (by reason) from ``rescue.finished``; the load's failed keep-alive and
fresh requests. Machines are noisy: the table gives medians (and maxima) and ratios of
medians, the JSON (--json) every reload's numbers.

Needs root (pidfd_getfd on the workers). Exit status 0 when every reload succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final

import psutil

import handoff
from handoff.cli.control_client import exchange
from handoff.demo.drill import child_environment
from handoff.demo.load import LoadConfig, LoadGenerator, LoadStats
from handoff.demo.master_process import (
    DrillError,
    Event,
    MasterOutput,
    bound_port,
    kill_everything,
    start_master,
    stop_master,
)
from handoff.errors import HandoffError
from handoff.formats.log_events import EventName

REPO: Final = Path(__file__).resolve().parents[1]
APPS: Final = REPO / "tests" / "integration" / "apps"
BIN: Final = Path(sys.executable).parent
WORKERS: Final = 2
FRESH_CLIENTS: Final = 2
SETTLE_S: Final = 0.25  # handoff's --settle, given explicitly: lateness is measured against it
RESCUE_WINDOW_S: Final = 0.5  # master/rescue.py WINDOW_S: rescue looks this long after a signal
GAP_S: Final = 0.5  # load on the new generation before the next reload (the pinger's "rest")
WARMUP_REQUESTS: Final = 500
STARTUP_TIMEOUT_S: Final = 60.0
RELOAD_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 60.0
PINGER_STOP_S: Final = 15.0
PING_MAX_S: Final = 300.0  # the pinger stops by itself past this, whatever happens here
ALL_EVENTS: Final = frozenset(str(name) for name in EventName)

SERVER: Final = [
    str(BIN / "uvicorn"),
    *("--fd", "{fd}", "--loop", "asyncio", "--http", "h11"),
    *("--timeout-graceful-shutdown", "20", "--log-level", "warning"),
    "versioned_app:asgi",
]


# -- the pinger: a separate process, so that our load generator's CPU and GIL do not ----
# -- show in its round trips ------------------------------------------------------------


def ping(control: str) -> int:
    """Send status requests back to back until stdin closes; one line per round trip:
    wall-clock start, milliseconds, 1 for a result (0 for an error)."""
    stop_at = time.monotonic() + PING_MAX_S
    while time.monotonic() < stop_at:
        readable, _, _ = select.select([sys.stdin], [], [], 0)
        if readable:
            return 0  # EOF (or anything): the bench is done with us
        wall = time.time()
        began = time.perf_counter()
        try:
            lines = list(exchange(control, {"cmd": "status"}, 10.0))
            ok = bool(lines) and lines[-1].get("type") == "result" and lines[-1].get("ok") is True
        except HandoffError:
            ok = False
        took_ms = (time.perf_counter() - began) * 1000
        sys.stdout.write(f"{wall:.6f} {took_ms:.3f} {int(ok)}\n")
        sys.stdout.flush()
    return 0


@dataclass(frozen=True, slots=True)
class Ping:
    at: float  # time.time() at its start
    ms: float
    ok: bool

    def overlaps(self, start: float, end: float) -> bool:
        return self.at < end and self.at + self.ms / 1000 > start


class Pinger:
    """The pinger process, started and stopped by the bench around one reload."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pings: list[Ping] = []
        self._first = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, control: str) -> Pinger:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, str(Path(__file__).resolve()), "--ping-control", control),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        pinger = cls(process)
        try:
            await asyncio.wait_for(pinger._first.wait(), 30)
        except BaseException:
            await pinger.stop()
            raise
        return pinger

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            wall, took_ms, ok = line.split()
            self.pings.append(Ping(float(wall), float(took_ms), ok == b"1"))
            self._first.set()

    async def stop(self) -> list[Ping]:
        """Close its stdin, reap it (killed past PINGER_STOP_S); its round trips."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), PINGER_STOP_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            await self.process.wait()
        finally:
            if self.process.returncode is None:  # cancelled while waiting
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._reader, 5)
        if not self._reader.done():
            self._reader.cancel()
        return self.pings


# -- the master's events ----------------------------------------------------------------


class Events:
    """Every event the master logs, kept in order, with a wait for the one needed next."""

    def __init__(self, output: MasterOutput) -> None:
        self.output = output
        self.seen: list[Event] = []
        self._error: DrillError | None = None
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        try:
            while True:
                far = time.monotonic() + 1e6
                self.seen.append(await self.output.next_event(ALL_EVENTS, far, "an event"))
                self._changed.set()
        except DrillError as exc:
            self._error = exc
            self._changed.set()

    async def wait(
        self, wanted: Callable[[Event], bool], start: int, timeout_s: float, what: str
    ) -> Event:
        """The first event from index start on for which wanted is true."""
        deadline = time.monotonic() + timeout_s
        index = start
        while True:
            for event in self.seen[index:]:
                if wanted(event):
                    return event
            index = len(self.seen)
            if self._error is not None:
                raise self._error
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.output.error(f"no {what} within {timeout_s:g} s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def since(self, start: int, name: str) -> list[Event]:
        return [event for event in self.seen[start:] if event["event"] == name]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def wall(event: Event) -> float:
    """The event's own timestamp (the master's clock when it logged it), as time.time()."""
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


# -- one master -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Counters:
    rescue_cpu_us: int
    copied: int
    handed: int


def status_counters(control: str) -> Counters:
    """The rescue counters as ``handoff status --json`` shows them."""
    lines = list(exchange(control, {"cmd": "status"}, 30.0))
    result = lines[-1] if lines else {}
    report = result.get("status")
    if result.get("type") != "result" or not isinstance(report, dict):
        raise DrillError(f"status: {lines}", [])
    master = report.get("master") or {}
    rescue = report.get("rescue") or {}
    if "rescue_cpu_us" in master:  # the raw counters, where status shows them
        cpu_us = int(master["rescue_cpu_us"])
        copied = int(master.get("rescue_copied", 0))
        handed = int(master.get("rescue_handed", 0))
    elif "cpu_s" in rescue:  # the "rescue" section: CPU in seconds, to the millisecond
        cpu_us = round(float(rescue["cpu_s"]) * 1_000_000)
        copied, handed = int(rescue.get("copied", 0)), int(rescue.get("handed", 0))
    else:
        raise DrillError("handoff status shows no rescue counters (rescue_cpu_us)", [])
    return Counters(cpu_us, copied, handed)


def master_cpu_s(master: psutil.Process) -> float:
    times = master.cpu_times()
    return float(times.user + times.system)


def failed(stats: LoadStats) -> tuple[Counter[str], Counter[str]]:
    keepalive = Counter({str(k): v for k, v in stats.failures_keepalive.items()})
    return keepalive, Counter({str(k): v for k, v in stats.failures_fresh.items()})


@dataclass(slots=True)
class Master:
    """One running master under load, and what the reloads need to know about it."""

    connections: int
    rescue: bool
    control: str
    version: Path
    process: asyncio.subprocess.Process
    cpu: psutil.Process
    events: Events
    load: LoadGenerator
    gen: int = 1
    reloads: list[dict[str, object]] = field(default_factory=list)


def summary(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "median_ms": None, "max_ms": None}
    return {
        "count": len(values),
        "median_ms": round(statistics.median(values), 3),
        "max_ms": round(max(values), 3),
    }


async def one_reload(master: Master, number: int, *, pinged: bool) -> dict[str, object]:
    """One SIGHUP, measured until the old generation is gone and its rescue finished."""
    master.version.write_text(f"v{number}")
    old_gen = master.gen
    pinger = await Pinger.start(master.control) if pinged else None
    pings: list[Ping] = []
    try:
        rest_began, rest_cpu = time.monotonic(), master_cpu_s(master.cpu)
        await asyncio.sleep(GAP_S)
        rest_ms_per_s = (
            (master_cpu_s(master.cpu) - rest_cpu) * 1000 / (time.monotonic() - rest_began)
        )
        before = await asyncio.to_thread(status_counters, master.control)
        keepalive_before, fresh_before = failed(master.load.stats)
        cpu_before = master_cpu_s(master.cpu)
        mark = len(master.events.seen)
        asked = time.time()
        master.process.send_signal(signal.SIGHUP)
        outcomes = {EventName.RELOAD_SUCCEEDED, EventName.RELOAD_FAILED}
        outcome = await master.events.wait(
            lambda e: e["event"] in outcomes, mark, RELOAD_TIMEOUT_S, "reload outcome"
        )
        if outcome["event"] != EventName.RELOAD_SUCCEEDED:
            raise master.events.output.error(f"reload {number} failed: {outcome}")
        master.gen = int(str(outcome["gen"]))
        await master.events.wait(
            lambda e: e["event"] == EventName.GENERATION_GONE and e.get("gen") == old_gen,
            mark,
            RELOAD_TIMEOUT_S,
            f"generation.gone of generation {old_gen}",
        )
        detached = {
            int(str(e["pid"])): e
            for e in master.events.since(mark, EventName.WORKER_DETACHED)
            if e.get("gen") == old_gen
        }
        finished: list[Event] = []
        for pid in sorted(detached) if master.rescue else ():
            finished.append(
                await master.events.wait(
                    lambda e, p=pid: e["event"] == EventName.RESCUE_FINISHED and e.get("pid") == p,
                    mark,
                    RELOAD_TIMEOUT_S,
                    f"rescue.finished of worker {pid}",
                )
            )
        settled = time.time()
        cpu_after = master_cpu_s(master.cpu)
    finally:
        if pinger is not None:
            pings = await pinger.stop()
    after = await asyncio.to_thread(status_counters, master.control)
    keepalive_after, fresh_after = failed(master.load.stats)
    signalled = {
        int(str(e["pid"])): e
        for e in master.events.since(mark, EventName.WORKER_SIGNALLED)
        if e.get("pid") in detached
    }
    lateness = [
        round((wall(signalled[pid]) - wall(detached[pid]) - SETTLE_S) * 1000, 3)
        for pid in sorted(detached)
        if pid in signalled
    ]
    released: Counter[str] = Counter()
    for event in finished:
        released.update({str(k): int(v) for k, v in dict(event.get("released") or {}).items()})
    record: dict[str, object] = {
        "number": number,
        "pinged": pinged,
        "gen": master.gen,
        "duration_s": outcome.get("duration_s"),
        "settled_after_s": round(settled - asked, 3),
        # Under load, between reloads: the master has next to nothing to do (the workers
        # accept on their own); on a pinged reload, the status requests' CPU.
        "master_rest_cpu_ms_per_s": round(rest_ms_per_s, 1),
        "master_cpu_ms": round((cpu_after - cpu_before) * 1000, 1),
        "rescue_cpu_ms": round((after.rescue_cpu_us - before.rescue_cpu_us) / 1000, 3),
        "copied": sum(int(str(e.get("copied", 0))) for e in finished),
        "handed": sum(int(str(e.get("handed", 0))) for e in finished),
        "released": dict(sorted(released.items())),
        "counters_copied": after.copied - before.copied,
        "counters_handed": after.handed - before.handed,
        "failed_keepalive": dict(keepalive_after - keepalive_before),
        "failed_fresh": dict(fresh_after - fresh_before),
        "settle_lateness_ms": lateness,
    }
    if pinged:
        if signalled:
            first = min(wall(e) for e in signalled.values())
            window = (first, max(wall(e) for e in signalled.values()) + RESCUE_WINDOW_S)
        else:
            window = (settled, settled)
        record["status_ms"] = {
            "rest": [p.ms for p in pings if p.at + p.ms / 1000 <= asked],
            "reload": [p.ms for p in pings if p.overlaps(asked, settled)],
            "stop_window": [p.ms for p in pings if p.overlaps(*window)],
        }
        record["status_errors"] = sum(not p.ok for p in pings)
    return record


async def run_master(connections: int, rescue: bool, reloads: int, work: Path) -> dict[str, object]:
    """Start a master with 2 workers, load it with N keep-alive clients, reload it 2 x R
    times (quiet and pinged in turn), stop it; everything it started is reaped."""
    name = f"n{connections}-{'rescue' if rescue else 'plain'}"
    version = work / f"{name}.version"
    version.write_text("v0")
    control = str(work / f"{name}.sock")
    argv = [sys.executable, "-m", "handoff", "run", "--log-format", "json"]
    argv += ["--log-level", "debug", "--bind", "127.0.0.1:0", "--workers", str(WORKERS)]
    argv += ["--ready", "auto", "--settle", str(SETTLE_S), "--control", control]
    argv += ["--rescue-keepalive"] if rescue else []
    argv += ["--", *SERVER]
    env = child_environment({"VERSION_FILE": str(version), "PYTHONPATH": str(APPS)})
    print(f"{name}: {shlex.join(argv)}", file=sys.stderr)
    process, output = await start_master(argv, env)
    events = Events(output)
    stop = asyncio.Event()
    load_task: asyncio.Task[LoadStats] | None = None
    try:
        deadline_s = STARTUP_TIMEOUT_S
        bound = await events.wait(
            lambda e: e["event"] == EventName.LISTENER_BOUND, 0, deadline_s, "listener.bound"
        )
        await events.wait(
            lambda e: e["event"] == EventName.GENERATION_ACTIVE, 0, deadline_s, "generation 1"
        )
        unavailable = events.since(0, EventName.RESCUE_UNAVAILABLE)
        if unavailable:
            raise output.error(f"rescue is unavailable here: {unavailable[0].get('reason')}")
        generator = LoadGenerator(
            LoadConfig(
                port=bound_port(bound), keepalive_clients=connections, fresh_clients=FRESH_CLIENTS
            )
        )
        load_task = asyncio.create_task(generator.run(stop))
        await asyncio.wait_for(
            generator.wait_until(lambda s: s.ok >= max(WARMUP_REQUESTS, 2 * connections)),
            STARTUP_TIMEOUT_S,
        )
        master = Master(
            connections=connections,
            rescue=rescue,
            control=control,
            version=version,
            process=process,
            cpu=psutil.Process(process.pid),
            events=events,
            load=generator,
        )
        for number in range(1, 2 * reloads + 1):
            record = await one_reload(master, number, pinged=number % 2 == 0)
            master.reloads.append(record)
            print(f"{name}: reload {number}: {brief(record)}", file=sys.stderr)
        stop.set()
        stats = await asyncio.wait_for(load_task, 30)
        exit_code = await stop_master(process, STOP_TIMEOUT_S)
    finally:
        stop.set()
        if load_task is not None and not load_task.done():
            load_task.cancel()
            await asyncio.gather(load_task, return_exceptions=True)
        await events.close()
        await kill_everything(process, output)
    return {
        "connections": connections,
        "rescue": rescue,
        "master_argv": argv,
        "master_exit_code": exit_code,
        "reloads": master.reloads,
        "summary": summarize(master.reloads),
        "load": {k: v for k, v in stats.to_dict().items() if k != "first_seen_s"},
    }


def brief(record: dict[str, object]) -> str:
    shown = ("master_cpu_ms", "rescue_cpu_ms", "copied", "handed", "failed_keepalive")
    return ", ".join(f"{key} {record[key]}" for key in shown)


# -- the numbers ------------------------------------------------------------------------


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summarize(records: list[dict[str, object]]) -> dict[str, object]:
    """Medians over a master's reloads: CPU from the quiet ones, status from the pinged."""

    def numbers(key: str, *, pinged: bool | None = None) -> list[float]:
        return [float(str(r[key])) for r in records if pinged is None or r["pinged"] is pinged]

    def pooled(kind: str) -> list[float]:
        return [ms for r in records if r["pinged"] for ms in r["status_ms"][kind]]

    def lateness(pinged: bool) -> list[float]:
        return [ms for r in records if r["pinged"] is pinged for ms in r["settle_lateness_ms"]]

    released: Counter[str] = Counter()
    keepalive: Counter[str] = Counter()
    fresh: Counter[str] = Counter()
    for record in records:
        released.update(record["released"])
        keepalive.update(record["failed_keepalive"])
        fresh.update(record["failed_fresh"])
    quiet_late, pinged_late = lateness(False), lateness(True)
    return {
        "reloads": len(records),
        "master_cpu_ms_median": median(numbers("master_cpu_ms", pinged=False)),
        "master_cpu_ms_median_pinged": median(numbers("master_cpu_ms", pinged=True)),
        "master_rest_cpu_ms_per_s_median": median(
            numbers("master_rest_cpu_ms_per_s", pinged=False)
        ),
        "master_rest_cpu_ms_per_s_max": max(
            numbers("master_rest_cpu_ms_per_s", pinged=False), default=None
        ),
        # The counter is not disturbed by status requests: every reload counts.
        "rescue_cpu_ms_median": median(numbers("rescue_cpu_ms")),
        "rescue_cpu_ms_max": max(numbers("rescue_cpu_ms"), default=None),
        "copied_median": median(numbers("copied")),
        "handed_median": median(numbers("handed")),
        "copied_total": round(sum(numbers("copied"))),
        "handed_total": round(sum(numbers("handed"))),
        # The same as the counters in handoff status say it: equal unless something counts
        # a connection twice.
        "counters_copied_total": round(sum(numbers("counters_copied"))),
        "counters_handed_total": round(sum(numbers("counters_handed"))),
        "released_total": dict(sorted(released.items())),
        "failed_keepalive_total": sum(keepalive.values()),
        "failed_keepalive_by_class": dict(sorted(keepalive.items())),
        "failed_fresh_total": sum(fresh.values()),
        "failed_keepalive_median_per_reload": median(
            [float(sum(r["failed_keepalive"].values())) for r in records]
        ),
        "status_ms_rest": summary(pooled("rest")),
        "status_ms_reload": summary(pooled("reload")),
        "status_ms_stop_window": summary(pooled("stop_window")),
        "status_errors": sum(int(str(r.get("status_errors", 0))) for r in records),
        "settle_lateness_ms_quiet": summary(quiet_late),
        "settle_lateness_ms_pinged": summary(pinged_late),
        "settled_after_s_median": median(numbers("settled_after_s")),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def difference(a: float | None, b: float | None) -> float | None:
    return round(a - b, 3) if a is not None and b is not None else None


def compare(plain: dict[str, object], rescued: dict[str, object]) -> dict[str, object]:
    """What rescue adds, for one N: differences and ratios of the two masters' medians."""
    off, on = plain["summary"], rescued["summary"]
    assert isinstance(off, dict)
    assert isinstance(on, dict)

    def stat(side: dict[str, object], key: str, name: str) -> float | None:
        value = side[key]
        assert isinstance(value, dict)
        return value[name]

    cpu_off, cpu_on = off["master_cpu_ms_median"], on["master_cpu_ms_median"]
    extra = difference(cpu_on, cpu_off)
    copied = on["copied_median"]
    rescue_cpu = on["rescue_cpu_ms_median"]
    return {
        "connections": plain["connections"],
        "master_cpu_ms_extra_per_reload": extra,
        "master_cpu_ratio": ratio(cpu_on, cpu_off),
        "rescue_cpu_ms_per_reload": rescue_cpu,
        "rescue_cpu_us_per_copied_connection": (
            round(rescue_cpu * 1000 / copied, 1) if rescue_cpu is not None and copied else None
        ),
        "status_median_ratio_stop_window_vs_rest": {
            "without": ratio(
                stat(off, "status_ms_stop_window", "median_ms"),
                stat(off, "status_ms_rest", "median_ms"),
            ),
            "with": ratio(
                stat(on, "status_ms_stop_window", "median_ms"),
                stat(on, "status_ms_rest", "median_ms"),
            ),
        },
        "status_stop_window_median_ratio_with_vs_without": ratio(
            stat(on, "status_ms_stop_window", "median_ms"),
            stat(off, "status_ms_stop_window", "median_ms"),
        ),
        "settle_lateness_median_ms_extra": difference(
            stat(on, "settle_lateness_ms_quiet", "median_ms"),
            stat(off, "settle_lateness_ms_quiet", "median_ms"),
        ),
        "failed_keepalive": {
            "without": off["failed_keepalive_total"],
            "with": on["failed_keepalive_total"],
        },
    }


def source_state() -> dict[str, object]:
    """Which handoff ran: the commit, and the files changed since (a bench of work in
    progress says so)."""
    git = ["git", "-C", str(REPO)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        changed = subprocess.run(
            [*git, "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {"handoff_imported_from": str(Path(handoff.__file__).parent)}
    return {
        "commit": head,
        "src_changed": [line[3:] for line in changed],
        "handoff_imported_from": str(Path(handoff.__file__).parent),
    }


def cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}" if value else "0"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
    return str(value)


def med_max(side: dict[str, object], key: str) -> str:
    value = side[key]
    assert isinstance(value, dict)
    return f"{cell(value['median_ms'])} / {cell(value['max_ms'])}"


def table(runs: list[dict[str, object]], comparisons: list[dict[str, object]]) -> list[str]:
    lines = [
        "| N | rescue | master CPU ms/reload | master CPU between reloads ms/s "
        "| rescue_cpu ms/reload | copied | handed | released (all reloads) "
        "| failed keep-alive (all) | status ms at rest med/max | status ms reload med/max "
        "| status ms stop window med/max | settle lateness ms med/max |",
        "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        s = run["summary"]
        assert isinstance(s, dict)
        lines.append(
            f"| {run['connections']} | {'on' if run['rescue'] else 'off'} "
            f"| {cell(s['master_cpu_ms_median'])} "
            f"| {cell(s['master_rest_cpu_ms_per_s_median'])} | {cell(s['rescue_cpu_ms_median'])} "
            f"| {cell(s['copied_median'])} | {cell(s['handed_median'])} "
            f"| {cell(s['released_total'])} | {s['failed_keepalive_total']} "
            f"| {med_max(s, 'status_ms_rest')} | {med_max(s, 'status_ms_reload')} "
            f"| {med_max(s, 'status_ms_stop_window')} "
            f"| {med_max(s, 'settle_lateness_ms_quiet')} |"
        )
    lines += [
        "",
        "| N | extra master CPU ms/reload (on - off) | master CPU on/off | rescue_cpu ms/reload "
        "| rescue µs per copied connection | status stop window / at rest, off "
        "| status stop window / at rest, on | status stop window on/off "
        "| extra settle lateness ms | failed keep-alive off → on |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in comparisons:
        within = c["status_median_ratio_stop_window_vs_rest"]
        failures = c["failed_keepalive"]
        assert isinstance(within, dict)
        assert isinstance(failures, dict)
        lines.append(
            f"| {c['connections']} | {cell(c['master_cpu_ms_extra_per_reload'])} "
            f"| {cell(c['master_cpu_ratio'])} | {cell(c['rescue_cpu_ms_per_reload'])} "
            f"| {cell(c['rescue_cpu_us_per_copied_connection'])} "
            f"| {cell(within['without'])} | {cell(within['with'])} "
            f"| {cell(c['status_stop_window_median_ratio_with_vs_without'])} "
            f"| {cell(c['settle_lateness_median_ms_extra'])} "
            f"| {failures['without']} → {failures['with']} |"
        )
    return lines


def warnings(runs: list[dict[str, object]]) -> list[str]:
    """What the numbers above cannot be taken at face value for."""
    found = []
    for run in runs:
        s = run["summary"]
        assert isinstance(s, dict)
        name = f"N={run['connections']} rescue {'on' if run['rescue'] else 'off'}"
        for what in ("copied", "handed"):
            counted, reported = s[f"counters_{what}_total"], s[f"{what}_total"]
            if run["rescue"] and counted != reported:
                found.append(
                    f"{name}: the rescue_{what} counter grew by {counted} over the reloads, "
                    f"rescue.finished reported {reported}"
                )
        rest = s["master_rest_cpu_ms_per_s_max"]
        if isinstance(rest, float) and rest > 100:
            found.append(
                f"{name}: the master used up to {rest:g} ms of CPU per second between reloads "
                f"(median {s['master_rest_cpu_ms_per_s_median']:g}), where it has next to "
                "nothing to do"
            )
        if s["status_errors"]:
            found.append(f"{name}: {s['status_errors']} status requests failed")
    return found


NOTES: Final = """\
Medians per reload; "copied" and "handed" per reload (medians), "released" and
"failed keep-alive" summed over all of a master's reloads. Master CPU (psutil, 10 ms
ticks) over the quiet reloads only (no status requests), from the SIGHUP until the old
generation is gone and its rescue finished; rescue_cpu is the master's `rescue_cpu_us`
counter (handoff status) over every reload. Status round trips: all pings of the pinged
reloads, pooled; the stop window runs from the first old worker's stop signal to 0.5 s
after the last one. Settle lateness: worker.signalled - worker.detached - settle, quiet
reloads."""


async def bench(args: argparse.Namespace, connections: list[int]) -> int:
    runs: list[dict[str, object]] = []
    comparisons: list[dict[str, object]] = []
    began = time.monotonic()
    command_line = shlex.join(sys.orig_argv)
    print(f"command: {command_line}", flush=True)
    try:
        work = Path(os.environ.get("TMPDIR", "/tmp")) / f"handoff-rescue-cpu-{os.getpid()}"  # noqa: S108
        work.mkdir(mode=0o700)
        try:
            for n in connections:
                plain = await run_master(n, False, args.reloads, work)
                rescued = await run_master(n, True, args.reloads, work)
                runs += [plain, rescued]
                comparisons.append(compare(plain, rescued))
        finally:
            for path in work.iterdir():
                path.unlink()
            work.rmdir()
    except DrillError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        for line in exc.output_tail[-20:]:
            print(f"  | {line}", file=sys.stderr)
        return 1
    print()
    print(
        f"Keep-alive rescue's cost, {args.reloads} quiet + {args.reloads} pinged reloads per "
        f"master, {WORKERS} uvicorn h11 workers, N keep-alive + {FRESH_CLIENTS} fresh clients"
    )
    print()
    print("\n".join(table(runs, comparisons)))
    print()
    print(NOTES)
    found = warnings(runs)
    for line in found:
        print(f"WARNING: {line}")
    print(f"\n{time.monotonic() - began:.0f} s")
    ok = all(run["master_exit_code"] == 0 for run in runs)
    if args.json is not None:
        document = {
            "command_line": command_line,
            "reloads": args.reloads,
            "connections": connections,
            "workers": WORKERS,
            "fresh_clients": FRESH_CLIENTS,
            "settle_s": SETTLE_S,
            "server": SERVER,
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
            "ok": ok,
            "warnings": found,
            "source": source_state(),
            "comparisons": comparisons,
            "runs": runs,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0 if ok else 1


async def main_async(args: argparse.Namespace, connections: list[int]) -> int:
    # SIGTERM as ^C: the finally blocks stop and reap what was started.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await bench(args, connections)
    except asyncio.CancelledError:
        print("bench: stopped", file=sys.stderr)
        return 130


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reloads", type=int, default=10, help="quiet (and as many pinged)")
    parser.add_argument("--connections", default="16,256", help="keep-alive clients, a list")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT")
    parser.add_argument("--ping-control", help=argparse.SUPPRESS)  # the pinger process
    args = parser.parse_args()
    if args.ping_control:
        return ping(args.ping_control)
    connections = [int(n) for n in args.connections.split(",") if n.strip()]
    if args.reloads < 1 or not connections or min(connections) < 1:
        parser.error("--reloads and every --connections number must be at least 1")
    return asyncio.run(main_async(args, connections))


if __name__ == "__main__":
    sys.exit(main())
