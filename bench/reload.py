"""Reload benchmark: a server under handoff with live reloads, against the same server bare.

    python bench/reload.py [--reloads N] [--workers N] [--seconds-between S]
                           [--rounds N] [--json OUT] [--no-bare] [-- COMMAND ARG...]

COMMAND defaults to the built-in demo app; it may use handoff's {fd} placeholder
(`gunicorn --bind fd://{fd} app:app`). The handoff run is a drill: a real master under
keep-alive and fresh-connection load, reloaded N times. The bare run starts the same
number of copies of COMMAND on one socket bound here and handed over exactly as handoff
hands it (fd 3, LISTEN_FDS, LISTEN_PID), with no master and no reloads, and loads them
for as long as the drill's load ran. The ratios say what handoff costs, reloads included
(each reload starts a generation of new processes on the same CPUs). The load generator
shares the machine's CPUs with the servers, so single runs vary by 10-20 %; --rounds N
alternates N handoff and bare runs and reports medians.

Exit status 0 when the handoff run had zero failures and every reload succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from handoff.demo.drill import (
    DrillConfig,
    DrillResult,
    child_environment,
    run_drill,
    spawn_with_listener,
)
from handoff.demo.load import LoadConfig, LoadGenerator, LoadStats
from handoff.demo.master_process import DrillError
from handoff.errors import HandoffError

KILL_WAIT_S = 10.0


async def terminate(processes: list[asyncio.subprocess.Process], timeout_s: float) -> None:
    """SIGTERM each process group, SIGKILL what is left after timeout_s, reap them all."""
    if not processes:
        return
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    waits = [asyncio.create_task(process.wait()) for process in processes]
    await asyncio.wait(waits, timeout=timeout_s)
    for process in processes:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    await asyncio.wait(waits, timeout=KILL_WAIT_S)


async def wait_until_serving(port: int, timeout_s: float) -> None:
    """Return once the server answers one request.

    Connections queue on the listening socket until a server accepts them, so a single
    request with a long timeout waits exactly until the server serves, without polling.
    """
    probe = LoadGenerator(
        LoadConfig(port=port, keepalive_clients=1, fresh_clients=0, timeout_s=timeout_s)
    )
    stop = asyncio.Event()
    task = asyncio.create_task(probe.run(stop))
    try:
        await asyncio.wait_for(
            probe.wait_until(lambda stats: stats.ok + stats.total_failures() > 0), timeout_s
        )
    except TimeoutError:
        raise DrillError(f"the bare server did not answer within {timeout_s:g} s", []) from None
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout_s)
    if probe.stats.ok == 0:
        raise DrillError(f"the bare server failed: {list(probe.stats.recent_errors)}", [])


async def run_bare_load(
    command: tuple[str, ...],
    *,
    seconds: float,
    workers: int,
    keepalive_clients: int,
    fresh_clients: int,
    startup_timeout_s: float = 60.0,
    quiet: bool = False,
) -> LoadStats:
    """Run workers copies of command on one socket bound here; load them for seconds."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    processes: list[asyncio.subprocess.Process] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener.listen(socket.SOMAXCONN)
        port = int(listener.getsockname()[1])
        env = child_environment(None)
        for worker in range(workers):
            worker_env = {**env, "HANDOFF_WORKER": str(worker)}
            process = await spawn_with_listener(command, listener, worker_env, quiet=quiet)
            processes.append(process)
        await wait_until_serving(port, startup_timeout_s)
        generator = LoadGenerator(
            LoadConfig(port=port, keepalive_clients=keepalive_clients, fresh_clients=fresh_clients)
        )
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        return await generator.run(stop)
    finally:
        await terminate(processes, KILL_WAIT_S)
        listener.close()


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def number(value: float | None, digits: int = 0) -> str:
    return f"{value:,.{digits}f}" if value is not None else "-"


METRICS: list[tuple[str, Callable[[LoadStats], float | None], int]] = [
    ("requests/s", LoadStats.requests_per_s, 0),
    ("median latency ms", LoadStats.median_latency_ms, 3),
    ("p99 latency ms", lambda stats: stats.latency_percentile_ms(99), 3),
    ("requests", lambda stats: float(stats.ok), 0),
    ("failures", lambda stats: float(stats.total_failures()), 0),
]


def median(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def table(rounds: list[tuple[DrillResult, LoadStats | None]]) -> list[str]:
    """Medians over the rounds; a round is one drill and the bare run that followed it."""
    lines = [f"{'':<20}{'handoff':>14}{'bare':>14}{'handoff/bare':>14}"]
    for name, metric, digits in METRICS:
        ours = median([metric(result.load) for result, _ in rounds])
        theirs = median([metric(bare) for _, bare in rounds if bare is not None])
        lines.append(
            f"{name:<20}{number(ours, digits):>14}{number(theirs, digits):>14}"
            f"{number(ratio(ours, theirs), 2):>14}"
        )
    if len(rounds) > 1:
        lines.append(f"(medians of {len(rounds)} rounds)")
    lines += ["", f"{'reload':>8}{'gen':>6}{'result':>8}{'master s':>10}{'served after s':>16}"]
    for index, (result, _) in enumerate(rounds, 1):
        if result.load.failures:
            failures = {str(k): v for k, v in result.load.failures.items()}
            lines.append(f"round {index} failures by class: {failures}")
        for record in result.reloads:
            label = f"{index}.{record.number}" if len(rounds) > 1 else str(record.number)
            lines.append(
                f"{label:>8}{record.gen if record.gen is not None else '-':>6}"
                f"{'ok' if record.ok else 'FAILED':>8}{number(record.duration_s, 3):>10}"
                f"{number(record.served_after_s, 3):>16}"
                + (f"  {record.reason}" if record.reason and not record.ok else "")
            )
    return lines


async def one_round(
    args: argparse.Namespace, command: tuple[str, ...]
) -> tuple[DrillResult, LoadStats | None]:
    config = DrillConfig(
        command=command,
        workers=args.workers,
        reloads=args.reloads,
        ready=args.ready,
        settle_s=args.seconds_between,
        keepalive_clients=args.keepalive_clients,
        fresh_clients=args.fresh_clients,
    )
    say = (lambda line: print(f"  {line}", file=sys.stderr)) if args.verbose else None
    print(f"handoff: {args.reloads} reloads of {args.workers} workers: {' '.join(command)}")
    result = await run_drill(config, say)
    if args.no_bare:
        return result, None
    seconds = result.load.duration_s() or args.seconds_between
    print(f"bare: {args.workers} copies on one socket for {seconds:.1f} s")
    bare = await run_bare_load(
        command,
        seconds=seconds,
        workers=args.workers,
        keepalive_clients=args.keepalive_clients,
        fresh_clients=args.fresh_clients,
        quiet=not args.verbose,
    )
    return result, bare


async def bench(args: argparse.Namespace, command: tuple[str, ...]) -> int:
    rounds: list[tuple[DrillResult, LoadStats | None]] = []
    try:
        for _ in range(args.rounds):
            rounds.append(await one_round(args, command))
    except DrillError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        for line in exc.output_tail[-20:]:
            print(f"  | {line}", file=sys.stderr)
        return 1
    except HandoffError as exc:  # a bad {fdN} placeholder for the bare run
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    ok = all(result.ok() for result, _ in rounds)
    print()
    print("\n".join(table(rounds)))
    print()
    print("PASS" if ok else "FAIL")
    if args.json is not None:
        document = {
            "command": list(command),
            "workers": args.workers,
            "reloads": args.reloads,
            "ok": ok,
            "rounds": [
                {"handoff": result.to_dict(), "bare": bare.to_dict() if bare else None}
                for result, bare in rounds
            ],
            "median_ratios": {
                name: ratio(
                    median([metric(result.load) for result, _ in rounds]),
                    median([metric(bare) for _, bare in rounds if bare is not None]),
                )
                for name, metric, _ in METRICS[:3]
            },
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reloads", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds-between", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=1, help="alternate handoff and bare runs")
    parser.add_argument("--ready", default="notify", help="handoff's --ready mode")
    parser.add_argument("--keepalive-clients", type=int, default=8)
    parser.add_argument("--fresh-clients", type=int, default=4)
    parser.add_argument("--json", metavar="OUT", help="also write the results here")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare comparison")
    parser.add_argument("-v", "--verbose", action="store_true", help="show each step")
    parser.add_argument("command", nargs="*", help="the server command (after --)")
    args = parser.parse_args()
    command = tuple(args.command) or (sys.executable, "-m", "handoff.demo.app")
    return asyncio.run(bench(args, command))


if __name__ == "__main__":
    sys.exit(main())
