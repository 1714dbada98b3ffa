"""Peers benchmark: gunicorn reloading itself on SIGHUP against the same gunicorn under handoff.

    python bench/peers.py [--reloads N] [--seconds-between S] [--rounds R] [--json OUT]
                          [--keepalive-clients N] [--fresh-clients N] [-v]

One run compares, under the same load, two ways of reloading the same app
(tests/integration/apps/versioned_app.py, which reads VERSION_FILE at import and answers
with X-Handoff-Version and X-Handoff-Generation):

  gunicorn HUP  gunicorn alone (master + 2 workers, no --preload, so that every new worker
                imports the app afresh), reloaded with `kill -HUP <master>` after each
                change of VERSION_FILE. The socket is bound here and passed to gunicorn at
                a known fd (`--bind fd://N`), so the port is known before gunicorn starts
                and no other process can take it in between.
  handoff       the same gunicorn command with --preload and `--bind fd://{fd}` under
                `handoff run --workers 1 --ready notify`, driven by handoff.drill.run_drill
                (one handoff worker is one gunicorn master with its 2 workers, the same
                process tree as above). Each reload starts a new gunicorn, which imports
                the app afresh, waits for its READY=1, then drains the old one.

Both sides get the same number of reloads, the same load settings and the same spacing:
`--seconds-between` of load before each reload and after the last one, counted from the
end of the previous reload (gunicorn: the new version answered; handoff: the master
reported the reload's outcome).

Two pairs run: sync workers (which close every connection, so keep-alive clients
reconnect for each request) and gthread workers with keep-alive (`-k gthread --threads 4
--keep-alive 5`), which keep connections open and so expose the race between a server
closing an idle connection and a client reusing it.

"Reload time" is from SIGHUP until the load generator first receives a response from the
new code: for gunicorn HUP the new X-Handoff-Version, for handoff the new generation's
X-Handoff-Generation (DrillConfig has no generation_header; each handoff generation is a
fresh gunicorn that imported the new version, so the first response of the generation is
the first of the version). Reloads whose new code never answered within --reload-timeout
count as missed.

Exit status 0 when every run completed (whatever the failure counts), 1 otherwise.
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
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TextIO

from handoff.drill import DrillConfig, DrillError, DrillResult, clean_environment, run_drill
from handoff.loadgen import FailureClass, LoadConfig, LoadGenerator, LoadStats

APPS: Final = Path(__file__).resolve().parents[1] / "tests" / "integration" / "apps"
GUNICORN: Final = str(Path(sys.executable).with_name("gunicorn"))
GUNICORN_WORKERS: Final = 2
STARTUP_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 40.0  # gunicorn's default --graceful-timeout is 30 s
KILL_WAIT_S: Final = 10.0
REQUEST_TIMEOUT_S: Final = 5.0
LOG_TAIL_LINES: Final = 20

Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Pair:
    """One gunicorn configuration, reloaded both ways."""

    key: str
    title: str
    worker_args: tuple[str, ...]


PAIRS: Final = (
    Pair("sync", "gunicorn sync workers (--workers 2)", ()),
    Pair(
        "gthread",
        "gunicorn gthread workers with keep-alive (--workers 2 -k gthread --threads 4 "
        "--keep-alive 5)",
        ("-k", "gthread", "--threads", "4", "--keep-alive", "5"),
    ),
)


def gunicorn_argv(bind: str, pair: Pair, *, preload: bool) -> tuple[str, ...]:
    return (
        GUNICORN,
        "--bind",
        bind,
        "--workers",
        str(GUNICORN_WORKERS),
        *(("--preload",) if preload else ()),
        *pair.worker_args,
        "--chdir",
        str(APPS),
        "versioned_app:wsgi",
    )


class PeerError(Exception):
    """A run could not complete: the server did not start, or died under it."""

    def __init__(self, message: str, output_tail: list[str]) -> None:
        super().__init__(message)
        self.output_tail = output_tail


@dataclass(slots=True)
class RunResult:
    """One side of one pair in one round, in a form common to both sides."""

    side: str  # "gunicorn" or "handoff"
    load: LoadStats
    reload_times_s: list[float | None]  # SIGHUP -> new code answering; None: never seen
    exit_code: int | None
    detail: dict[str, object] = field(default_factory=dict)  # side-specific, for the JSON

    def to_dict(self) -> dict[str, object]:
        return {
            "side": self.side,
            "load": self.load.to_dict(),
            "reload_times_s": [round(t, 6) if t is not None else None for t in self.reload_times_s],
            "exit_code": self.exit_code,
            **self.detail,
        }


def log_tail(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return lines[-LOG_TAIL_LINES:]


async def stop_group(process: asyncio.subprocess.Process, timeout_s: float) -> int | None:
    """SIGTERM the process group (gunicorn: graceful stop), SIGKILL it past timeout_s.

    Returns the leader's exit status if it stopped within timeout_s, else None. Whatever
    the leader did, the group (its workers) gets a final SIGKILL so that nothing is left.
    """
    exit_code: int | None = process.returncode
    if exit_code is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            exit_code = await asyncio.wait_for(process.wait(), timeout_s)
        except TimeoutError:
            exit_code = None
    # Workers of a gunicorn whose master died are still in its group (they never call
    # setsid), so this reaches them; ESRCH when the group is already empty.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.returncode is None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), KILL_WAIT_S)
    return exit_code


def version_seen(version: str) -> Callable[[LoadStats], bool]:
    def predicate(stats: LoadStats) -> bool:
        return version in stats.first_seen

    return predicate


class StandaloneGunicorn:
    """gunicorn started here on a socket bound here, in its own process group."""

    def __init__(self, argv: tuple[str, ...], listener: socket.socket, log: Path) -> None:
        self.argv = argv
        self.listener = listener
        self.log = log
        self.process: asyncio.subprocess.Process | None = None
        self.exited: asyncio.Task[int] | None = None
        self.exit_code: int | None = None
        self.closed = False

    async def start(self, env: dict[str, str]) -> None:
        with self.log.open("wb") as log_file:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                pass_fds=(self.listener.fileno(),),
                env=env,
                start_new_session=True,
            )
        self.exited = asyncio.create_task(self.process.wait())

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def check_alive(self, when: str) -> None:
        assert self.exited is not None
        if self.exited.done():
            code = self.exited.result()
            raise PeerError(f"gunicorn exited (status {code}) {when}", log_tail(self.log))

    async def watch(self, seconds: float) -> None:
        """Let seconds pass; raise PeerError if gunicorn exits meanwhile."""
        assert self.exited is not None
        await asyncio.wait({self.exited}, timeout=seconds)
        self.check_alive("under load")

    async def wait_serving(self, port: int) -> None:
        """Return once gunicorn answers one request with 200; the socket queues until then."""
        assert self.exited is not None
        probe = LoadGenerator(
            LoadConfig(port=port, keepalive_clients=1, fresh_clients=0, timeout_s=STARTUP_TIMEOUT_S)
        )
        stop = asyncio.Event()
        task = asyncio.create_task(probe.run(stop))
        answered = asyncio.create_task(
            probe.wait_until(lambda stats: stats.ok + stats.total_failures() > 0)
        )
        try:
            done, _ = await asyncio.wait(
                {answered, self.exited},
                timeout=STARTUP_TIMEOUT_S,
                return_when=asyncio.FIRST_COMPLETED,
            )
            self.check_alive("at start")
            if not done:
                raise PeerError(
                    f"gunicorn did not answer within {STARTUP_TIMEOUT_S:g} s", log_tail(self.log)
                )
        finally:
            answered.cancel()
            stop.set()
            await asyncio.gather(answered, return_exceptions=True)
            await asyncio.wait_for(task, REQUEST_TIMEOUT_S + KILL_WAIT_S)
        if probe.stats.ok == 0:
            errors = list(probe.stats.recent_errors)
            raise PeerError(f"gunicorn failed: {errors}", log_tail(self.log))

    async def reload(
        self, generator: LoadGenerator, version: str, timeout_s: float
    ) -> float | None:
        """SIGHUP gunicorn; return seconds until the load first saw version, None if never."""
        assert self.exited is not None
        hup_at = time.monotonic()
        os.kill(self.pid, signal.SIGHUP)
        seen = asyncio.create_task(generator.wait_until(version_seen(version)))
        await asyncio.wait(
            {seen, self.exited}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        seen.cancel()
        await asyncio.gather(seen, return_exceptions=True)
        at = generator.stats.first_seen.get(version)
        return at - hup_at if at is not None and at >= hup_at else None

    async def close(self) -> int | None:
        """Stop gunicorn and its workers, whatever their state; return its exit status.

        Idempotent: the group is signalled once, so a later call cannot hit a reused pid.
        """
        if not self.closed:
            self.closed = True
            if self.process is not None:
                self.exit_code = await stop_group(self.process, STOP_TIMEOUT_S)
            if self.exited is not None:
                self.exited.cancel()
                await asyncio.gather(self.exited, return_exceptions=True)
        return self.exit_code


async def run_gunicorn_hup(
    pair: Pair, args: argparse.Namespace, workdir: Path, say: Say
) -> RunResult:
    """gunicorn alone, reloaded args.reloads times with SIGHUP, under load."""
    version_file = workdir / f"version-{pair.key}-gunicorn"
    version_file.write_text("v0", encoding="utf-8")
    log = workdir / f"gunicorn-{pair.key}.log"
    stop = asyncio.Event()
    load_task: asyncio.Task[LoadStats] | None = None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(socket.SOMAXCONN)
        port = int(listener.getsockname()[1])
        server = StandaloneGunicorn(
            gunicorn_argv(f"fd://{listener.fileno()}", pair, preload=False), listener, log
        )
        try:
            await server.start(clean_environment({"VERSION_FILE": str(version_file)}))
            await server.wait_serving(port)
            say(f"gunicorn {server.pid} serving on 127.0.0.1:{port}")
            generator = LoadGenerator(
                LoadConfig(
                    port=port,
                    keepalive_clients=args.keepalive_clients,
                    fresh_clients=args.fresh_clients,
                    timeout_s=REQUEST_TIMEOUT_S,
                    generation_header="x-handoff-version",
                )
            )
            load_task = asyncio.create_task(generator.run(stop))
            times: list[float | None] = []
            for reload_number in range(1, args.reloads + 1):
                await server.watch(args.seconds_between)
                version = f"v{reload_number}"
                version_file.write_text(version, encoding="utf-8")
                took = await server.reload(generator, version, args.reload_timeout)
                times.append(took)
                say(
                    f"gunicorn reload {reload_number}: {version} "
                    + (f"answered after {took:.3f} s" if took is not None else "never answered")
                )
            await server.watch(args.seconds_between)
            stop.set()
            stats = await asyncio.wait_for(load_task, REQUEST_TIMEOUT_S + KILL_WAIT_S)
            say("stopping gunicorn (SIGTERM)")
            exit_code = await server.close()
            return RunResult(
                side="gunicorn",
                load=stats,
                reload_times_s=times,
                exit_code=exit_code,
                detail={
                    "command": list(server.argv),
                    "port": port,
                    "versions_seen": dict(stats.by_generation),
                    "log_tail": log_tail(log),
                },
            )
        finally:
            stop.set()
            if load_task is not None and not load_task.done():
                load_task.cancel()
                await asyncio.gather(load_task, return_exceptions=True)
            await server.close()


async def run_handoff(pair: Pair, args: argparse.Namespace, workdir: Path, say: Say) -> RunResult:
    """The same gunicorn under handoff, reloaded by a drill."""
    version_file = workdir / f"version-{pair.key}-handoff"
    version_file.write_text("v0", encoding="utf-8")

    def before_reload(number: int) -> None:
        version_file.write_text(f"v{number}", encoding="utf-8")

    config = DrillConfig(
        command=gunicorn_argv("fd://{fd}", pair, preload=True),
        workers=1,
        reloads=args.reloads,
        ready="notify",
        settle_s=args.seconds_between,
        keepalive_clients=args.keepalive_clients,
        fresh_clients=args.fresh_clients,
        request_timeout_s=REQUEST_TIMEOUT_S,
        startup_timeout_s=STARTUP_TIMEOUT_S,
        reload_timeout_s=args.reload_timeout,
        stop_timeout_s=STOP_TIMEOUT_S,
        env={"VERSION_FILE": str(version_file)},
        before_reload=before_reload,
    )
    result: DrillResult = await run_drill(config, say)
    times = [record.served_after_s for record in result.reloads]
    times += [None] * (args.reloads - len(times))
    return RunResult(
        side="handoff",
        load=result.load,
        reload_times_s=times,
        exit_code=result.master_exit_code,
        detail={
            "command": list(config.command),
            "drill": result.to_dict(),
            "all_reloads_ok": len(result.reloads) == args.reloads
            and all(record.ok for record in result.reloads),
        },
    )


def run_budget_s(args: argparse.Namespace) -> float:
    """An upper bound on one run: every step is bounded, this bounds their sum."""
    per_reload = float(args.seconds_between) + float(args.reload_timeout)
    return float(
        STARTUP_TIMEOUT_S
        + args.reloads * per_reload
        + args.seconds_between
        + 2 * (REQUEST_TIMEOUT_S + KILL_WAIT_S)
        + 2 * (STOP_TIMEOUT_S + KILL_WAIT_S)
    )


# ---------------------------------------------------------------- reporting


def number(value: float | None, digits: int = 0) -> str:
    return f"{value:,.{digits}f}" if value is not None else "-"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass(slots=True)
class Summary:
    """One side of one pair over all rounds."""

    requests: int
    requests_per_s: float | None  # median over rounds
    p99_latency_ms: float | None  # median over rounds
    failures: dict[str, int]  # summed over rounds
    idle_closes: int
    reloads_seen: int
    reloads: int
    reload_median_s: float | None
    reload_max_s: float | None
    exit_codes: list[int | None]

    def to_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "requests_per_s_median": self.requests_per_s,
            "p99_latency_ms_median": self.p99_latency_ms,
            "failures_by_class": self.failures,
            "failures_total": sum(self.failures.values()),
            "idle_closes": self.idle_closes,
            "reloads_new_code_seen": self.reloads_seen,
            "reloads": self.reloads,
            "reload_median_s": self.reload_median_s,
            "reload_max_s": self.reload_max_s,
            "exit_codes": self.exit_codes,
        }


def summarise(runs: list[RunResult]) -> Summary:
    times = [t for run in runs for t in run.reload_times_s if t is not None]
    return Summary(
        requests=sum(run.load.ok for run in runs),
        requests_per_s=median([v for run in runs if (v := run.load.requests_per_s()) is not None]),
        p99_latency_ms=median(
            [v for run in runs if (v := run.load.latency_percentile_ms(99)) is not None]
        ),
        failures={str(c): sum(run.load.failures[c] for run in runs) for c in FailureClass},
        idle_closes=sum(run.load.idle_closes for run in runs),
        reloads_seen=len(times),
        reloads=sum(len(run.reload_times_s) for run in runs),
        reload_median_s=median(times),
        reload_max_s=max(times) if times else None,
        exit_codes=[run.exit_code for run in runs],
    )


def table(pair: Pair, gunicorn: Summary, handoff: Summary, rounds: int) -> list[str]:
    many = f" (sum of {rounds} rounds)" if rounds > 1 else ""
    med = " (median of rounds)" if rounds > 1 else ""
    rows: list[tuple[str, str, str]] = [
        (f"requests ok{many}", number(gunicorn.requests), number(handoff.requests)),
        (
            f"requests/s{med}",
            number(gunicorn.requests_per_s),
            number(handoff.requests_per_s),
        ),
        (
            f"p99 latency ms{med}",
            number(gunicorn.p99_latency_ms, 1),
            number(handoff.p99_latency_ms, 1),
        ),
    ]
    for failure in FailureClass:
        name = str(failure)
        rows.append(
            (f"  failed: {name}", str(gunicorn.failures[name]), str(handoff.failures[name]))
        )
    rows += [
        (
            f"failures total{many}",
            str(sum(gunicorn.failures.values())),
            str(sum(handoff.failures.values())),
        ),
        (
            "idle keep-alive closes (no failure)",
            str(gunicorn.idle_closes),
            str(handoff.idle_closes),
        ),
        (
            "reloads whose new code answered",
            f"{gunicorn.reloads_seen}/{gunicorn.reloads}",
            f"{handoff.reloads_seen}/{handoff.reloads}",
        ),
        (
            "median reload s (HUP -> new code)",
            number(gunicorn.reload_median_s, 3),
            number(handoff.reload_median_s, 3),
        ),
        (
            "max reload s",
            number(gunicorn.reload_max_s, 3),
            number(handoff.reload_max_s, 3),
        ),
        (
            "server exit status",
            ",".join(str(c) for c in gunicorn.exit_codes),
            ",".join(str(c) for c in handoff.exit_codes),
        ),
    ]
    width = max(len(label) for label, _, _ in rows) + 2
    lines = [pair.title, f"{'':<{width}}{'gunicorn HUP':>14}{'handoff':>14}"]
    lines += [f"{label:<{width}}{a:>14}{b:>14}" for label, a, b in rows]
    return lines


def error_samples(runs: list[RunResult], limit: int = 3) -> list[str]:
    lines: list[str] = []
    for run in runs:
        if run.load.total_failures():
            for error in list(run.load.recent_errors)[-limit:]:
                lines.append(f"  {run.side}: {error}")
    return lines


# ---------------------------------------------------------------- driver


async def bench(args: argparse.Namespace, out: TextIO) -> int:
    say: Say = (
        (lambda line: print(f"  {line}", file=sys.stderr)) if args.verbose else (lambda _line: None)
    )
    results: dict[str, dict[str, list[RunResult]]] = {
        pair.key: {"gunicorn": [], "handoff": []} for pair in PAIRS
    }
    budget = run_budget_s(args)
    completed = True
    with tempfile.TemporaryDirectory(prefix="handoff-peers-") as tmp:
        workdir = Path(tmp)
        try:
            for round_number in range(1, args.rounds + 1):
                for pair in PAIRS:
                    sides = [("gunicorn", run_gunicorn_hup), ("handoff", run_handoff)]
                    if round_number % 2 == 0:  # alternate who runs first
                        sides.reverse()
                    for side, runner in sides:
                        print(
                            f"round {round_number}/{args.rounds}: {pair.key} {side}: "
                            f"{args.reloads} reloads, {args.seconds_between:g} s apart",
                            file=out,
                            flush=True,
                        )
                        async with asyncio.timeout(budget):
                            run = await runner(pair, args, workdir, say)
                        results[pair.key][side].append(run)
        except (PeerError, DrillError) as exc:
            completed = False
            print(f"peers: error: {exc}", file=sys.stderr)
            for line in exc.output_tail[-LOG_TAIL_LINES:]:
                print(f"  | {line}", file=sys.stderr)
        except TimeoutError:
            completed = False
            print(f"peers: error: a run took longer than {budget:g} s", file=sys.stderr)

    document: dict[str, object] = {
        "reloads": args.reloads,
        "seconds_between": args.seconds_between,
        "rounds": args.rounds,
        "keepalive_clients": args.keepalive_clients,
        "fresh_clients": args.fresh_clients,
        "completed": completed,
        "pairs": {},
    }
    pairs_doc: dict[str, object] = {}
    for pair in PAIRS:
        gunicorn_runs = results[pair.key]["gunicorn"]
        handoff_runs = results[pair.key]["handoff"]
        if not gunicorn_runs and not handoff_runs:
            continue
        gunicorn, handoff = summarise(gunicorn_runs), summarise(handoff_runs)
        print(file=out)
        print("\n".join(table(pair, gunicorn, handoff, max(len(gunicorn_runs), 1))), file=out)
        samples = error_samples(gunicorn_runs + handoff_runs)
        if samples:
            print("last failures seen:", file=out)
            print("\n".join(samples), file=out)
        pairs_doc[pair.key] = {
            "title": pair.title,
            "summary": {"gunicorn": gunicorn.to_dict(), "handoff": handoff.to_dict()},
            "runs": {
                "gunicorn": [run.to_dict() for run in gunicorn_runs],
                "handoff": [run.to_dict() for run in handoff_runs],
            },
        }
    document["pairs"] = pairs_doc
    if args.json is not None:
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0 if completed else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--reloads", type=int, default=5)
    parser.add_argument("--seconds-between", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=1, help="repeat both pairs, alternating")
    parser.add_argument("--keepalive-clients", type=int, default=8)
    parser.add_argument("--fresh-clients", type=int, default=4)
    parser.add_argument(
        "--reload-timeout",
        type=float,
        default=30.0,
        help="seconds after SIGHUP for the new code to answer",
    )
    parser.add_argument("--json", metavar="OUT", help="also write the results here")
    parser.add_argument("-v", "--verbose", action="store_true", help="show each step")
    args = parser.parse_args()
    if args.reloads < 1 or args.rounds < 1 or args.seconds_between <= 0:
        parser.error("--reloads and --rounds must be >= 1, --seconds-between > 0")
    return asyncio.run(bench(args, sys.stdout))


if __name__ == "__main__":
    sys.exit(main())
