"""gunicorn sync workers under continuous load: how long after the new workers serve does
a reload complete?

    python -m bench.gunicorn_reload [--rounds N] [--reloads N] [--seconds-between S]
                                    [--ready MODE] [--before SRC] [--json OUT] [-v]

A real ``handoff run --ready auto`` master (one handoff worker: a gunicorn arbiter with 2
sync workers, no ``--preload``, so every generation imports the app in its own workers)
under 8 keep-alive and 4 fresh-connection clients, reloaded N times (``SIGHUP``, a new
version on disk each time). Per reload it records:

- ``reload``: what the master reports (``reload.succeeded`` ``duration_s``: from the
  ``SIGHUP`` until the new generation is ready and the old one told to drain);
- ``serving``: from the ``SIGHUP`` until the load generator first gets an answer from
  the new generation (its workers have booted and serve);
- ``lag``: reload minus serving, how long handoff took to see that the new workers serve
  (the target: at most 0.5 s);
- how each new worker was proved ready (``worker.ready`` ``via`` and ``detail``).

Medians are over every reload of every round. ``--before SRC`` compares: each round runs
the master first from SRC (another checkout's ``src``, e.g. of the commit before a change:
``git worktree add /tmp/before HEAD``, or ``git archive HEAD | tar -x -C /tmp/before``),
then from this code, and the medians of both and their ratios are printed. (The master
is started as ``python -m handoff`` with SRC first on ``PYTHONPATH``; the load generator
is always this code's.)

Exit status 0 when every reload succeeded and no request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

import handoff
from handoff.demo.drill import child_environment
from handoff.demo.load import LoadConfig, LoadGenerator, LoadStats
from handoff.demo.master_process import (
    DrillError,
    Event,
    MasterOutput,
    bound_port,
    event_number,
    kill_everything,
    start_master,
    stop_master,
)

APPS: Final = Path(__file__).resolve().parents[1] / "tests" / "integration" / "apps"
TARGET_LAG_S: Final = 0.5
STARTUP_TIMEOUT_S: Final = 60.0
RELOAD_TIMEOUT_S: Final = 60.0
OUTCOMES: Final = frozenset({"reload.succeeded", "reload.failed"})


def gunicorn_command(workers: int) -> tuple[str, ...]:
    """gunicorn sync, no --preload: the app is imported by each worker after the fork."""
    gunicorn = Path(sys.executable).parent / "gunicorn"
    return (
        *(str(gunicorn), "--bind", "fd://{fd}", "--workers", str(workers)),
        *("--graceful-timeout", "20", "--backlog", "65535", "--no-control-socket"),
        *("--chdir", str(APPS), "--log-level", "warning", "versioned_app:wsgi"),
    )


@dataclass(slots=True)
class Reload:
    round: int
    number: int
    gen: int | None
    ok: bool
    reload_s: float | None
    serving_s: float | None = None
    ready: list[str] = field(default_factory=list)  # "via: detail" per worker.ready
    reason: str | None = None
    hup_at: float = 0.0

    @property
    def lag_s(self) -> float | None:
        if self.reload_s is None or self.serving_s is None:
            return None
        return self.reload_s - self.serving_s


@dataclass(slots=True)
class Round:
    code: str  # "before" or "after"
    reloads: list[Reload]
    load: LoadStats
    exit_code: int | None


async def _one_reload(
    process: asyncio.subprocess.Process, output: MasterOutput, number: int, round_: int
) -> Reload:
    hup_at = time.monotonic()
    process.send_signal(signal.SIGHUP)
    ready: list[str] = []
    deadline = hup_at + RELOAD_TIMEOUT_S
    while True:
        try:
            event = await output.next_event(OUTCOMES | {"worker.ready"}, deadline, "reload")
        except TimeoutError:
            return Reload(round_, number, None, False, None, reason="no outcome", hup_at=hup_at)
        if event["event"] == "worker.ready":
            ready.append(f"{event.get('via')}: {event.get('detail', '')}")
            continue
        gen = event_number(event, "gen")
        return Reload(
            round_,
            number,
            int(gen) if gen is not None else None,
            event["event"] == "reload.succeeded",
            event_number(event, "duration_s"),
            ready=ready,
            reason=str(event.get("reason")) if event.get("reason") else None,
            hup_at=hup_at,
        )


async def one_round(
    args: argparse.Namespace, round_: int, say: Callable[[str], None], src: str | None
) -> Round:
    with tempfile.TemporaryDirectory(prefix="handoff-bench-") as tmp:
        version = Path(tmp) / "version"
        version.write_text("v0", encoding="utf-8")
        argv = [
            *(sys.executable, "-m", "handoff", "run", "--log-format", "json"),
            *("--bind", "127.0.0.1:0", "--workers", "1", "--ready", args.ready),
            *("--ready-timeout", "30", "--"),
            *gunicorn_command(args.gunicorn_workers),
        ]
        extra = {"VERSION_FILE": str(version)}
        if src is not None:
            extra["PYTHONPATH"] = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
        env = child_environment(extra)
        process, output = await start_master(argv, env)
        stop = asyncio.Event()
        load_task: asyncio.Task[LoadStats] | None = None
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            bound: Event = await output.next_event(
                frozenset({"listener.bound"}), deadline, "listener.bound"
            )
            await output.next_event(frozenset({"generation.active"}), deadline, "ready workers")
            port = bound_port(bound)
            code = "before" if src is not None else "after"
            say(f"round {round_} ({code}): master {process.pid} serving on 127.0.0.1:{port}")
            generator = LoadGenerator(
                LoadConfig(port=port, keepalive_clients=8, fresh_clients=4, timeout_s=5.0)
            )
            load_task = asyncio.create_task(generator.run(stop))
            reloads = []
            for number in range(1, args.reloads + 1):
                await output.watch(args.seconds_between)
                version.write_text(f"v{number}", encoding="utf-8")
                record = await _one_reload(process, output, number, round_)
                reloads.append(record)
                say(
                    f"round {round_} reload {number}: gen {record.gen} "
                    f"{'ok' if record.ok else 'FAILED'} {record.reload_s} s; {record.ready}"
                )
                if record.gen is None:
                    break
            await output.watch(args.seconds_between)
            stop.set()
            stats = await asyncio.wait_for(load_task, 20.0)
            exit_code = await stop_master(process, 60.0)
            for record in reloads:
                seen = stats.first_seen.get(str(record.gen))
                if seen is not None and seen >= record.hup_at:
                    record.serving_s = seen - record.hup_at
            return Round(code, reloads, stats, exit_code)
        finally:
            stop.set()
            if load_task is not None and not load_task.done():
                load_task.cancel()
                await asyncio.gather(load_task, return_exceptions=True)
            await kill_everything(process, output)


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _fmt(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


@dataclass(frozen=True, slots=True)
class Summary:
    reloads: int
    reloads_ok: int
    requests: int
    failed_requests: int
    median_reload_s: float | None
    max_reload_s: float | None
    median_serving_s: float | None
    median_lag_s: float | None
    max_lag_s: float | None
    within_target: int  # reloads with lag <= TARGET_LAG_S
    ready_paths: dict[str, int]  # worker.ready "via: detail", its port written PORT
    requests_per_s: float | None  # median over the rounds


def summary(rounds: list[Round]) -> Summary:
    reloads = [r for rnd in rounds for r in rnd.reloads]
    lags = [r.lag_s for r in reloads if r.lag_s is not None]
    durations = [r.reload_s for r in reloads if r.reload_s is not None]
    paths = Counter(re.sub(r":\d+ ", ":PORT ", line) for r in reloads for line in r.ready)
    return Summary(
        reloads=len(reloads),
        reloads_ok=sum(r.ok for r in reloads),
        requests=sum(rnd.load.ok + rnd.load.total_failures() for rnd in rounds),
        failed_requests=sum(rnd.load.total_failures() for rnd in rounds),
        median_reload_s=_median(list(durations)),
        max_reload_s=max(durations, default=None),
        median_serving_s=_median([r.serving_s for r in reloads]),
        median_lag_s=_median(list(lags)),
        max_lag_s=max(lags, default=None),
        within_target=sum(lag <= TARGET_LAG_S for lag in lags),
        ready_paths=dict(paths.most_common()),
        requests_per_s=_median([rnd.load.requests_per_s() for rnd in rounds]),
    )


def report(rounds: list[Round], source: str) -> list[str]:
    lines = [f"{'reload':>8}{'gen':>5}{'result':>8}{'reload s':>10}{'serving s':>11}{'lag s':>8}"]
    for rnd in rounds:
        for r in rnd.reloads:
            lines.append(
                f"{r.round:>5}.{r.number:<2}{r.gen if r.gen is not None else '-':>5}"
                f"{'ok' if r.ok else 'FAILED':>8}{_fmt(r.reload_s):>10}{_fmt(r.serving_s):>11}"
                f"{_fmt(r.lag_s):>8}  {'; '.join(sorted(set(r.ready)))}"
                + (f"  {r.reason}" if r.reason and not r.ok else "")
            )
    s = summary(rounds)
    return [
        *lines,
        "",
        f"handoff from {source}",
        f"reloads ok: {s.reloads_ok} of {s.reloads}; "
        f"failed requests: {s.failed_requests} of {s.requests}",
        f"median reload: {_fmt(s.median_reload_s)} s (max {_fmt(s.max_reload_s)}); "
        f"median serving: {_fmt(s.median_serving_s)} s; "
        f"median lag: {_fmt(s.median_lag_s)} s (max {_fmt(s.max_lag_s)}); "
        f"lag <= {TARGET_LAG_S:g} s: {s.within_target} of {s.reloads}",
        f"requests/s (median of the rounds): {_fmt(s.requests_per_s)}",
        "ready paths:",
        *(f"  {count:>3} x {path}" for path, count in s.ready_paths.items()),
    ]


def comparison(before: Summary, after: Summary) -> list[str]:
    def ratio(a: float | None, b: float | None) -> str:
        return f"{b / a:.2f}" if a and b is not None else "-"

    rows = [
        ("median reload s", before.median_reload_s, after.median_reload_s),
        ("max reload s", before.max_reload_s, after.max_reload_s),
        ("median serving s", before.median_serving_s, after.median_serving_s),
        ("median lag s", before.median_lag_s, after.median_lag_s),
        ("max lag s", before.max_lag_s, after.max_lag_s),
        ("requests/s", before.requests_per_s, after.requests_per_s),
    ]
    lines = [f"{'':<20}{'before':>10}{'after':>10}{'after/before':>14}"]
    for name, a, b in rows:
        lines.append(f"{name:<20}{_fmt(a):>10}{_fmt(b):>10}{ratio(a, b):>14}")
    lines.append(f"{'failed requests':<20}{before.failed_requests:>10}{after.failed_requests:>10}")
    lines.append(
        f"{'lag <= target':<20}{before.within_target:>7}/{before.reloads:<2}"
        f"{after.within_target:>7}/{after.reloads:<2}"
    )
    return lines


async def bench(args: argparse.Namespace) -> int:
    say = (lambda line: print(f"  {line}", file=sys.stderr)) if args.verbose else (lambda _: None)
    rounds = []
    try:
        for number in range(1, args.rounds + 1):
            if args.before is not None:
                rounds.append(await one_round(args, number, say, args.before))
            rounds.append(await one_round(args, number, say, None))
    except DrillError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        for line in exc.output_tail[-20:]:
            print(f"  | {line}", file=sys.stderr)
        return 1
    here = str(Path(handoff.__file__).parent)
    before = [rnd for rnd in rounds if rnd.code == "before"]
    after = [rnd for rnd in rounds if rnd.code == "after"]
    if before:
        print("\n".join(report(before, args.before)))
        print()
    print("\n".join(report(after, here)))
    if before:
        print()
        print("\n".join(comparison(summary(before), summary(after))))
    ok = all(r.ok for rnd in rounds for r in rnd.reloads) and all(
        rnd.load.total_failures() == 0 and rnd.exit_code == 0 for rnd in rounds
    )
    if args.json:
        document = {
            "command": list(gunicorn_command(args.gunicorn_workers)),
            "handoff": here,
            "before": args.before,
            "ready": args.ready,
            "summary": asdict(summary(after)),
            "summary_before": asdict(summary(before)) if before else None,
            "rounds": [
                {
                    "code": rnd.code,
                    "reloads": [
                        {**{k: v for k, v in asdict(r).items() if k != "hup_at"}, "lag_s": r.lag_s}
                        for r in rnd.reloads
                    ],
                    "load": rnd.load.to_dict(),
                    "exit_code": rnd.exit_code,
                }
                for rnd in rounds
            ],
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reloads", type=int, default=5)
    parser.add_argument("--seconds-between", type=float, default=2.0)
    parser.add_argument("--gunicorn-workers", type=int, default=2)
    parser.add_argument("--ready", default="auto", help="handoff's --ready mode (auto)")
    parser.add_argument("--before", metavar="SRC", help="also run the master from SRC, alternating")
    parser.add_argument("--json", metavar="OUT", help="also write every reload here")
    parser.add_argument("-v", "--verbose", action="store_true", help="show each step")
    return asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
