"""Peers benchmark: gunicorn reloading itself on SIGHUP against the same gunicorn under handoff.

    python bench/peers.py [--scenario healthy|broken|slow|all] [--reloads N]
                          [--seconds-between S] [--rounds R] [--json OUT]
                          [--keepalive-clients N] [--fresh-clients N] [-v]

One run compares, under the same load, two ways of reloading the same app
(tests/integration/apps/versioned_app.py, which reads VERSION_FILE at import and answers
with X-Handoff-Version and X-Handoff-Generation):

  gunicorn HUP  gunicorn alone (master + 2 workers, no --preload, so that every new worker
                imports the app afresh), reloaded with `kill -HUP <master>` after each
                change of VERSION_FILE. The socket is bound here and passed to gunicorn at
                a known fd (`--bind fd://N`), so the port is known before gunicorn starts
                and no other process can take it in between. Once gunicorn runs, this
                process closes its own copy: the socket then lives and dies with gunicorn,
                exactly as with `--bind HOST:PORT` (if gunicorn exits, clients are refused
                rather than left waiting in the queue of a socket nobody accepts from).
  handoff       the same gunicorn command with --preload and `--bind fd://{fd}` under
                `handoff run --workers 1 --ready notify --ready-timeout 20`, driven by
                handoff.drill.run_drill (one handoff worker is one gunicorn master with
                its 2 workers, the same process tree as above). Each reload starts a new
                gunicorn, which imports the app afresh (before it sends READY=1, thanks to
                --preload), waits for its READY=1, then drains the old one.

Both sides run with --no-control-socket: gunicorn 27 otherwise binds one fixed path
(~/.gunicorn/gunicorn.ctl) per master, which two masters (handoff's old and new
generation, or another gunicorn on the machine) would take from each other.

Scenarios (--scenario, default all); in each, reload N deploys VERSION_FILE = "vN" except
where said:

  healthy  every release is healthy. Both pairs below.
  broken   reload 3 deploys "broken": versioned_app raises RuntimeError at import. Reloads
           4 and onwards deploy healthy releases again. Sync pair only.
  slow     reload 3 deploys "slow": versioned_app sleeps 3 s at import, then serves
           version "slow". Sync pair only.

Pairs: sync workers (which close every connection, so keep-alive clients reconnect for
each request) and gthread workers with keep-alive (`-k gthread --threads 4 --keep-alive
5`), which keep connections open and so expose the race between a server closing an idle
connection and a client reusing it.

Both sides get the same number of reloads, the same load settings and the same spacing:
`--seconds-between` of load before each reload and after the last one, counted from the
end of the previous reload (gunicorn: the new version answered, gunicorn exited, or
--reload-timeout passed; handoff: the master reported the reload's outcome). If gunicorn
exits, its remaining reloads are not sent ("server gone") but their time still passes under
load, so that both sides are measured for about as long.

How a reload ended: for handoff, the master's reload.succeeded / reload.failed (with its
reason); for gunicorn, ok if the new version answered within --reload-timeout of SIGHUP,
failed otherwise (with gunicorn's exit status if it exited meanwhile).

"Reload time" is from SIGHUP until the load generator first receives a response from the
new code: for gunicorn HUP the new X-Handoff-Version, for handoff the new generation's
X-Handoff-Generation (DrillConfig has no generation_header; each handoff generation is a
fresh gunicorn that imported the new version, so the first response of the generation is
the first of the version).

The run's live counters are sampled every 50 ms, which gives: whether the server answered
after the bad release (between the end of that reload and the next one), whether it still
answered in the last second of the load ("serving at end") and with which version, and the
longest stretch without any successful response. "max latency ms" is exact: LoadStats keeps
only a 10,000-latency sample, which can miss the few requests that wait out a stall, so
LoadStats.record_ok is wrapped for the duration of the bench to see every latency.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TextIO

from handoff.demo.drill import DrillConfig, DrillError, DrillResult, clean_environment, run_drill
from handoff.demo.load import FailureClass, LoadConfig, LoadGenerator, LoadStats

APPS: Final = Path(__file__).resolve().parents[1] / "tests" / "integration" / "apps"
GUNICORN: Final = str(Path(sys.executable).with_name("gunicorn"))
GUNICORN_WORKERS: Final = 2
STARTUP_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 40.0  # gunicorn's default --graceful-timeout is 30 s
KILL_WAIT_S: Final = 10.0
REQUEST_TIMEOUT_S: Final = 5.0
LOG_TAIL_LINES: Final = 20
NOTABLE_LINES: Final = 40
HANDOFF_READY_TIMEOUT_S: Final = 20.0  # the slow release needs ~3 s; its own bound otherwise
SAMPLE_S: Final = 0.05
END_WINDOW_S: Final = 1.0  # "serving at end": answered within the load's last second
BAD_RELOAD: Final = 3  # the reload that deploys the bad release
SLOW_IMPORT_S: Final = 3.0  # versioned_app.SLOW_IMPORT_S

Say = Callable[[str], None]

OK: Final = "ok"
FAILED: Final = "failed"
GONE: Final = "server gone"


@dataclass(frozen=True, slots=True)
class Pair:
    """One gunicorn configuration, reloaded both ways."""

    key: str
    title: str
    worker_args: tuple[str, ...]


SYNC: Final = Pair("sync", "gunicorn sync workers (--workers 2)", ())
GTHREAD: Final = Pair(
    "gthread",
    "gunicorn gthread workers with keep-alive (--workers 2 -k gthread --threads 4 --keep-alive 5)",
    ("-k", "gthread", "--threads", "4", "--keep-alive", "5"),
)
PAIRS: Final = (SYNC, GTHREAD)


@dataclass(frozen=True, slots=True)
class Scenario:
    """What each reload deploys."""

    key: str
    title: str
    bad_release: str | None  # VERSION_FILE content of reload BAD_RELOAD; None: all healthy
    pairs: tuple[Pair, ...]

    def release(self, number: int) -> str:
        """VERSION_FILE content for reload number (0: the first generation)."""
        if self.bad_release is not None and number == BAD_RELOAD:
            return self.bad_release
        return f"v{number}"


SCENARIOS: Final = (
    Scenario("healthy", "every release healthy", None, PAIRS),
    Scenario(
        "broken",
        f"reload {BAD_RELOAD} deploys a release that raises at import, the next ones are healthy",
        "broken",
        (SYNC,),
    ),
    Scenario(
        "slow",
        f"reload {BAD_RELOAD} deploys a release whose import takes {SLOW_IMPORT_S:g} s",
        "slow",
        (SYNC,),
    ),
)


def gunicorn_argv(bind: str, pair: Pair, *, preload: bool) -> tuple[str, ...]:
    return (
        GUNICORN,
        "--bind",
        bind,
        "--workers",
        str(GUNICORN_WORKERS),
        "--no-control-socket",
        *(("--preload",) if preload else ()),
        *pair.worker_args,
        "--chdir",
        str(APPS),
        "versioned_app:wsgi",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RunContext:
    """What every run needs besides its scenario and pair."""

    args: argparse.Namespace
    workdir: Path
    say: Say
    maxima: MaxLatency


class PeerError(Exception):
    """A run could not complete: the server did not start, or died under it."""

    def __init__(self, message: str, output_tail: list[str]) -> None:
        super().__init__(message)
        self.output_tail = output_tail


# ---------------------------------------------------------------- measuring


class MaxLatency:
    """The exact largest latency of the successful requests of tracked LoadStats.

    LoadStats samples latencies (10,000 of them): a stall's few slow requests, and so the
    maximum, can fall out of the sample. While installed, LoadStats.record_ok is wrapped
    to see every latency; only the stats passed to track() are followed (and kept alive,
    so that no other object can reuse their id).
    """

    def __init__(self) -> None:
        self._maxima: dict[int, float | None] = {}
        self._tracked: list[LoadStats] = []

    def track(self, stats: LoadStats) -> None:
        self._tracked.append(stats)
        self._maxima[id(stats)] = None

    def of(self, stats: LoadStats) -> float | None:
        return self._maxima.get(id(stats))

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        original = LoadStats.record_ok
        maxima = self._maxima

        def record_ok(
            stats: LoadStats, *, fresh: bool, latency_ms: float, generation: str | None
        ) -> None:
            key = id(stats)
            if key in maxima:
                current = maxima[key]
                if current is None or latency_ms > current:
                    maxima[key] = latency_ms
            original(stats, fresh=fresh, latency_ms=latency_ms, generation=generation)

        LoadStats.record_ok = record_ok  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            LoadStats.record_ok = original  # type: ignore[method-assign]


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # time.monotonic()
    ok: int
    failures: int
    answered: dict[str, int]  # successful responses by version (or generation) header


@dataclass(frozen=True, slots=True)
class Window:
    ok: int
    failures: int
    answered: dict[str, int]  # responses by header value within the window


class Timeline:
    """The live counters of one load run, sampled every SAMPLE_S."""

    def __init__(self, stats: LoadStats) -> None:
        self.stats = stats
        self.samples: list[Sample] = []

    def sample(self, at: float | None = None) -> None:
        self.samples.append(
            Sample(
                at=time.monotonic() if at is None else at,
                ok=self.stats.ok,
                failures=self.stats.total_failures(),
                answered=dict(self.stats.by_generation),
            )
        )

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_S)

    def finish(self) -> None:
        """Take the last sample, as of the end of the load (the counters are final)."""
        self.sample(self.stats.stopped_at)

    def window(self, start: float, end: float) -> Window:
        """What happened between start and end (only what surely happened inside)."""
        first = next((s for s in self.samples if s.at >= start), None)
        last = next((s for s in reversed(self.samples) if s.at <= end), None)
        if first is None or last is None or last.at <= first.at:
            return Window(0, 0, {})
        answered = {
            key: count - first.answered.get(key, 0)
            for key, count in last.answered.items()
            if count > first.answered.get(key, 0)
        }
        return Window(last.ok - first.ok, last.failures - first.failures, answered)

    def longest_gap_s(self) -> float | None:
        """The longest time without a new successful response (to +-SAMPLE_S)."""
        if not self.samples:
            return None
        last_rise, last_ok, longest = self.samples[0].at, self.samples[0].ok, 0.0
        for sample in self.samples[1:]:
            if sample.ok > last_ok:
                longest = max(longest, sample.at - last_rise)
                last_rise, last_ok = sample.at, sample.ok
        return max(longest, self.samples[-1].at - last_rise)


@dataclass(slots=True, kw_only=True)
class ReloadOutcome:
    """One reload of one run, in a form common to both sides."""

    number: int
    release: str  # what VERSION_FILE held
    outcome: str  # OK, FAILED or GONE
    answered_after_s: float | None  # SIGHUP -> the new code's first response
    detail: str | None  # why it failed
    started_at: float  # time.monotonic() of SIGHUP (or when it would have been sent)
    ended_at: float  # when its outcome was known

    def to_dict(self) -> dict[str, object]:
        return {
            "number": self.number,
            "release": self.release,
            "outcome": self.outcome,
            "answered_after_s": (
                round(self.answered_after_s, 6) if self.answered_after_s is not None else None
            ),
            "detail": self.detail,
            "observed_s": round(self.ended_at - self.started_at, 6),
        }

    def describe(self) -> str:
        if self.outcome == OK and self.answered_after_s is not None:
            return f"ok, answered after {self.answered_after_s:.3f} s"
        if self.outcome == OK:
            return "ok, new code never seen by the load"
        return self.outcome + (f": {self.detail}" if self.detail else "")


@dataclass(slots=True, kw_only=True)
class RunResult:
    """One side of one pair in one round, in a form common to both sides."""

    side: str  # "gunicorn" or "handoff"
    load: LoadStats
    reloads: list[ReloadOutcome]
    exit_code: int | None
    serving_after_bad: bool | None  # None: no bad release in this scenario
    serving_at_end: bool
    versions_at_end: list[str]  # releases that answered in the load's last END_WINDOW_S
    max_latency_ms: float | None
    longest_gap_s: float | None
    detail: dict[str, object] = field(default_factory=dict)  # side-specific, for the JSON

    @property
    def reload_times_s(self) -> list[float | None]:
        return [r.answered_after_s for r in self.reloads]

    def count(self, outcome: str) -> int:
        return sum(1 for r in self.reloads if r.outcome == outcome)

    def to_dict(self) -> dict[str, object]:
        return {
            "side": self.side,
            "load": self.load.to_dict(),
            "reloads": [r.to_dict() for r in self.reloads],
            "reload_times_s": [round(t, 6) if t is not None else None for t in self.reload_times_s],
            "exit_code": self.exit_code,
            "serving_after_bad_release": self.serving_after_bad,
            "serving_at_end": self.serving_at_end,
            "versions_at_end": self.versions_at_end,
            "max_latency_ms": self.max_latency_ms,
            "longest_gap_without_response_s": self.longest_gap_s,
            **self.detail,
        }


def assess(
    scenario: Scenario,
    timeline: Timeline,
    reloads: list[ReloadOutcome],
    release_of: Callable[[str], str],
) -> tuple[bool | None, bool, list[str], dict[str, object]]:
    """serving after the bad release, serving at end, releases answering at end, details."""
    stats = timeline.stats
    end = stats.stopped_at if stats.stopped_at is not None else time.monotonic()
    serving_after_bad: bool | None = None
    details: dict[str, object] = {}
    bad = next((r for r in reloads if r.number == BAD_RELOAD), None)
    if scenario.bad_release is not None and bad is not None:
        following = next((r for r in reloads if r.number == BAD_RELOAD + 1), None)
        until = following.started_at if following is not None else end
        after = timeline.window(bad.ended_at, until)
        serving_after_bad = after.ok > 0
        details["after_bad_release"] = {
            "seconds": round(until - bad.ended_at, 3),
            "ok": after.ok,
            "failures": after.failures,
            "answered": {release_of(k): n for k, n in after.answered.items()},
        }
    last = timeline.window(end - END_WINDOW_S, end)
    details["last_second"] = {
        "ok": last.ok,
        "failures": last.failures,
        "answered": {release_of(k): n for k, n in last.answered.items()},
    }
    versions = sorted({release_of(k) for k in last.answered})
    return serving_after_bad, last.ok > 0, versions, details


# ---------------------------------------------------------------- gunicorn alone


def log_tail(path: Path) -> list[str]:
    return read_lines(path)[-LOG_TAIL_LINES:]


GUNICORN_NOTABLE: Final = (
    "[ERROR]",
    "[CRITICAL]",
    "[WARNING]",
    "Hang up",
    "Shutting down",
    "Reason:",
    "HaltServer",
    "Error:",
)


def notable_lines(lines: list[str], markers: tuple[str, ...]) -> list[str]:
    picked = [line for line in lines if any(marker in line for marker in markers)]
    return picked[-NOTABLE_LINES:]


def lines_of_reload(lines: list[str], number: int) -> list[str]:
    """gunicorn's log from its number-th "Hang up" to the next one (at most NOTABLE_LINES)."""
    hups = [i for i, line in enumerate(lines) if "Hang up" in line]
    if len(hups) < number:
        return []
    end = hups[number] if len(hups) > number else len(lines)
    return lines[hups[number - 1] : end][:NOTABLE_LINES]


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []


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
        self.exited_at: float | None = None  # time.monotonic()
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
        self.exited = asyncio.create_task(self._wait(self.process))

    async def _wait(self, process: asyncio.subprocess.Process) -> int:
        code = await process.wait()
        self.exited_at = time.monotonic()
        return code

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def gone(self) -> bool:
        return self.exited is not None and self.exited.done()

    def status(self) -> int | None:
        assert self.process is not None
        return self.process.returncode

    def check_alive(self, when: str) -> None:
        assert self.exited is not None
        if self.exited.done():
            code = self.exited.result()
            raise PeerError(f"gunicorn exited (status {code}) {when}", log_tail(self.log))

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
        self, generator: LoadGenerator, number: int, version: str, timeout_s: float
    ) -> ReloadOutcome:
        """SIGHUP gunicorn; wait until the load sees version, gunicorn exits, or timeout_s."""
        assert self.exited is not None
        hup_at = time.monotonic()
        os.kill(self.pid, signal.SIGHUP)
        seen = asyncio.create_task(generator.wait_until(version_seen(version)))
        await asyncio.wait(
            {seen, self.exited}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        ended_at = time.monotonic()
        seen.cancel()
        await asyncio.gather(seen, return_exceptions=True)
        at = generator.stats.first_seen.get(version)
        took = at - hup_at if at is not None and at >= hup_at else None
        detail: str | None = None
        if took is None:
            if self.gone and self.exited_at is not None:
                detail = (
                    f"gunicorn exited (status {self.status()}) "
                    f"{self.exited_at - hup_at:.2f} s after SIGHUP"
                )
            else:
                detail = f"{version} did not answer within {timeout_s:g} s"
        return ReloadOutcome(
            number=number,
            release=version,
            outcome=OK if took is not None else FAILED,
            answered_after_s=took,
            detail=detail,
            started_at=hup_at,
            ended_at=ended_at,
        )

    async def reload_all(
        self, generator: LoadGenerator, version_file: Path, scenario: Scenario, ctx: RunContext
    ) -> list[ReloadOutcome]:
        """Each reload after ctx.args.seconds_between of load; none once gunicorn is gone."""
        args = ctx.args
        reloads: list[ReloadOutcome] = []
        for number in range(1, args.reloads + 1):
            await asyncio.sleep(args.seconds_between)
            version = scenario.release(number)
            if self.gone:
                now = time.monotonic()
                reloads.append(
                    ReloadOutcome(
                        number=number,
                        release=version,
                        outcome=GONE,
                        answered_after_s=None,
                        detail=f"not sent: gunicorn exited (status {self.status()}) before",
                        started_at=now,
                        ended_at=now,
                    )
                )
                ctx.say(f"gunicorn reload {number}: {version} not sent, gunicorn is gone")
                continue
            version_file.write_text(version, encoding="utf-8")
            outcome = await self.reload(generator, number, version, args.reload_timeout)
            reloads.append(outcome)
            ctx.say(f"gunicorn reload {number}: {version} {outcome.describe()}")
        return reloads

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
    scenario: Scenario,
    pair: Pair,
    ctx: RunContext,
) -> RunResult:
    """gunicorn alone, reloaded args.reloads times with SIGHUP, under load."""
    args, workdir, say, maxima = ctx.args, ctx.workdir, ctx.say, ctx.maxima
    version_file = workdir / f"version-{scenario.key}-{pair.key}-gunicorn"
    version_file.write_text(scenario.release(0), encoding="utf-8")
    log = workdir / f"gunicorn-{scenario.key}-{pair.key}.log"
    stop = asyncio.Event()
    load_task: asyncio.Task[LoadStats] | None = None
    sampler: asyncio.Task[None] | None = None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(socket.SOMAXCONN)
        port = int(listener.getsockname()[1])
        server = StandaloneGunicorn(
            gunicorn_argv(f"fd://{listener.fileno()}", pair, preload=False), listener, log
        )
        try:
            await server.start(clean_environment({"VERSION_FILE": str(version_file)}))
            # gunicorn holds the socket now; from here on it is open only while gunicorn is.
            listener.close()
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
            maxima.track(generator.stats)
            timeline = Timeline(generator.stats)
            load_task = asyncio.create_task(generator.run(stop))
            sampler = asyncio.create_task(timeline.run())
            reloads = await server.reload_all(generator, version_file, scenario, ctx)
            await asyncio.sleep(args.seconds_between)
            stop.set()
            stats = await asyncio.wait_for(load_task, REQUEST_TIMEOUT_S + KILL_WAIT_S)
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
            timeline.finish()
            exited_during_run = server.gone
            exited_at = server.exited_at
            say("stopping gunicorn (SIGTERM)" if not server.gone else "gunicorn already gone")
            exit_code = await server.close()
            serving_after_bad, serving_at_end, versions, assessed = assess(
                scenario, timeline, reloads, lambda key: key
            )
            lines = read_lines(log)
            return RunResult(
                side="gunicorn",
                load=stats,
                reloads=reloads,
                exit_code=exit_code,
                serving_after_bad=serving_after_bad,
                serving_at_end=serving_at_end,
                versions_at_end=versions,
                max_latency_ms=maxima.of(stats),
                longest_gap_s=timeline.longest_gap_s(),
                detail={
                    "command": list(server.argv),
                    "port": port,
                    "exited_during_run": exited_during_run,
                    "load_s_after_exit": (
                        round(stats.stopped_at - exited_at, 3)
                        if exited_during_run
                        and exited_at is not None
                        and stats.stopped_at is not None
                        else None
                    ),
                    "versions_seen": dict(stats.by_generation),
                    **assessed,
                    "log_notable": notable_lines(lines, GUNICORN_NOTABLE),
                    "log_bad_reload": (
                        lines_of_reload(lines, BAD_RELOAD) if scenario.bad_release else []
                    ),
                    "log_tail": lines[-LOG_TAIL_LINES:],
                },
            )
        finally:
            stop.set()
            for task in (load_task, sampler):
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            await server.close()


# ---------------------------------------------------------------- under handoff

HANDOFF_NOTABLE: Final = (
    '"reload.failed"',
    '"generation.failed"',
    '"worker.not_ready"',
    '"worker.spawn_failed"',
    "Error:",
    "RuntimeError",
)


async def run_handoff(
    scenario: Scenario,
    pair: Pair,
    ctx: RunContext,
) -> RunResult:
    """The same gunicorn under handoff, reloaded by a drill."""
    args, workdir, say, maxima = ctx.args, ctx.workdir, ctx.say, ctx.maxima
    version_file = workdir / f"version-{scenario.key}-{pair.key}-handoff"
    version_file.write_text(scenario.release(0), encoding="utf-8")

    def before_reload(number: int) -> None:
        version_file.write_text(scenario.release(number), encoding="utf-8")

    config = DrillConfig(
        command=gunicorn_argv("fd://{fd}", pair, preload=True),
        workers=1,
        reloads=args.reloads,
        ready="notify",
        settle_s=args.seconds_between,
        extra_args=("--ready-timeout", f"{HANDOFF_READY_TIMEOUT_S:g}"),
        keepalive_clients=args.keepalive_clients,
        fresh_clients=args.fresh_clients,
        request_timeout_s=REQUEST_TIMEOUT_S,
        startup_timeout_s=STARTUP_TIMEOUT_S,
        reload_timeout_s=args.reload_timeout,
        stop_timeout_s=STOP_TIMEOUT_S,
        env={"VERSION_FILE": str(version_file)},
        before_reload=before_reload,
    )
    timelines: list[Timeline] = []
    samplers: list[asyncio.Task[None]] = []

    def on_load_started(stats: LoadStats) -> None:
        maxima.track(stats)
        timeline = Timeline(stats)
        timelines.append(timeline)
        samplers.append(asyncio.get_running_loop().create_task(timeline.run()))

    try:
        result: DrillResult = await run_drill(config, say, on_load_started=on_load_started)
    finally:
        for task in samplers:
            task.cancel()
        await asyncio.gather(*samplers, return_exceptions=True)
    timeline = timelines[0]
    timeline.finish()

    reloads: list[ReloadOutcome] = []
    for record in result.reloads:
        reloads.append(
            ReloadOutcome(
                number=record.number,
                release=scenario.release(record.number),
                outcome=OK if record.ok else FAILED,
                answered_after_s=record.served_after_s,
                detail=None if record.ok else record.reason,
                started_at=record.hup_at,
                ended_at=record.hup_at + record.observed_s,
            )
        )
    for number in range(len(reloads) + 1, args.reloads + 1):
        now = time.monotonic()
        reloads.append(
            ReloadOutcome(
                number=number,
                release=scenario.release(number),
                outcome=FAILED,
                answered_after_s=None,
                detail=f"not sent: the drill stopped after reload {len(result.reloads)}",
                started_at=now,
                ended_at=now,
            )
        )
    # The load sees generations; each generation runs the release of the reload that
    # started it, and the first generation runs release 0.
    release_of_gen = {
        str(record.gen): scenario.release(record.number)
        for record in result.reloads
        if record.gen is not None
    }

    def release_of(gen: str) -> str:
        return release_of_gen.get(gen, scenario.release(0))

    serving_after_bad, serving_at_end, versions, assessed = assess(
        scenario, timeline, reloads, release_of
    )
    return RunResult(
        side="handoff",
        load=result.load,
        reloads=reloads,
        exit_code=result.master_exit_code,
        serving_after_bad=serving_after_bad,
        serving_at_end=serving_at_end,
        versions_at_end=versions,
        max_latency_ms=maxima.of(result.load),
        longest_gap_s=timeline.longest_gap_s(),
        detail={
            "command": list(config.command),
            "handoff_args": ["--workers", "1", "--ready", "notify", *config.extra_args],
            "drill": result.to_dict(),
            "all_reloads_ok": all(r.outcome == OK for r in reloads),
            **assessed,
            "log_notable": notable_lines(result.output_tail, HANDOFF_NOTABLE),
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


def yes_no(values: list[bool]) -> str:
    return ",".join("yes" if v else "no" for v in values) if values else "-"


@dataclass(slots=True)
class Summary:
    """One side of one pair over all rounds."""

    requests: int
    requests_per_s: float | None  # median over rounds
    p99_latency_ms: float | None  # median over rounds
    max_latency_ms: float | None  # max over rounds
    longest_gap_s: float | None  # max over rounds
    failures: dict[str, int]  # summed over rounds
    idle_closes: int
    reloads_seen: int
    reloads: int
    reloads_ok: int
    reloads_failed: int
    reloads_gone: int
    reload_median_s: float | None
    reload_max_s: float | None
    bad_reload_s: list[float | None]  # per round: SIGHUP -> the bad release answering
    bad_reload_outcomes: list[str]  # per round
    serving_after_bad: list[bool]  # per round; empty without a bad release
    serving_at_end: list[bool]  # per round
    versions_at_end: list[str]  # per round, "+"-joined
    exit_codes: list[int | None]

    def to_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "requests_per_s_median": self.requests_per_s,
            "p99_latency_ms_median": self.p99_latency_ms,
            "max_latency_ms": self.max_latency_ms,
            "longest_gap_without_response_s": self.longest_gap_s,
            "failures_by_class": self.failures,
            "failures_total": sum(self.failures.values()),
            "idle_closes": self.idle_closes,
            "reloads_new_code_seen": self.reloads_seen,
            "reloads": self.reloads,
            "reloads_ok": self.reloads_ok,
            "reloads_failed": self.reloads_failed,
            "reloads_server_gone": self.reloads_gone,
            "reload_median_s": self.reload_median_s,
            "reload_max_s": self.reload_max_s,
            "bad_reload_answered_after_s": self.bad_reload_s,
            "bad_reload_outcomes": self.bad_reload_outcomes,
            "serving_after_bad_release": self.serving_after_bad,
            "serving_at_end": self.serving_at_end,
            "versions_at_end": self.versions_at_end,
            "exit_codes": self.exit_codes,
        }


def summarise(runs: list[RunResult]) -> Summary:
    times = [t for run in runs for t in run.reload_times_s if t is not None]
    maxima = [run.max_latency_ms for run in runs if run.max_latency_ms is not None]
    gaps = [run.longest_gap_s for run in runs if run.longest_gap_s is not None]
    bad = [next((r for r in run.reloads if r.number == BAD_RELOAD), None) for run in runs]
    return Summary(
        requests=sum(run.load.ok for run in runs),
        requests_per_s=median([v for run in runs if (v := run.load.requests_per_s()) is not None]),
        p99_latency_ms=median(
            [v for run in runs if (v := run.load.latency_percentile_ms(99)) is not None]
        ),
        max_latency_ms=max(maxima) if maxima else None,
        longest_gap_s=max(gaps) if gaps else None,
        failures={str(c): sum(run.load.failures[c] for run in runs) for c in FailureClass},
        idle_closes=sum(run.load.idle_closes for run in runs),
        reloads_seen=len(times),
        reloads=sum(len(run.reloads) for run in runs),
        reloads_ok=sum(run.count(OK) for run in runs),
        reloads_failed=sum(run.count(FAILED) for run in runs),
        reloads_gone=sum(run.count(GONE) for run in runs),
        reload_median_s=median(times),
        reload_max_s=max(times) if times else None,
        bad_reload_s=[r.answered_after_s if r is not None else None for r in bad],
        bad_reload_outcomes=[r.outcome if r is not None else "-" for r in bad],
        serving_after_bad=[
            run.serving_after_bad for run in runs if run.serving_after_bad is not None
        ],
        serving_at_end=[run.serving_at_end for run in runs],
        versions_at_end=["+".join(run.versions_at_end) or "none" for run in runs],
        exit_codes=[run.exit_code for run in runs],
    )


COLUMN: Final = 16


def table(
    scenario: Scenario, pair: Pair, gunicorn: Summary, handoff: Summary, rounds: int
) -> list[str]:
    many = f" (sum of {rounds} rounds)" if rounds > 1 else ""
    med = " (median of rounds)" if rounds > 1 else ""
    top = " (max of rounds)" if rounds > 1 else ""
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
        (
            f"max latency ms{top}",
            number(gunicorn.max_latency_ms, 1),
            number(handoff.max_latency_ms, 1),
        ),
        (
            f"longest gap without a response s{top}",
            number(gunicorn.longest_gap_s, 2),
            number(handoff.longest_gap_s, 2),
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
            "reloads ok / failed / server gone",
            f"{gunicorn.reloads_ok} / {gunicorn.reloads_failed} / {gunicorn.reloads_gone}",
            f"{handoff.reloads_ok} / {handoff.reloads_failed} / {handoff.reloads_gone}",
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
    ]
    if scenario.bad_release is not None:
        label = f"reload {BAD_RELOAD} ({scenario.bad_release})"
        rows.append(
            (
                f"{label} ended",
                ",".join(gunicorn.bad_reload_outcomes),
                ",".join(handoff.bad_reload_outcomes),
            )
        )
        if scenario.bad_release == "slow":
            rows.append(
                (
                    f"{label}: HUP -> '{scenario.bad_release}' answers s",
                    ",".join(number(t, 3) for t in gunicorn.bad_reload_s),
                    ",".join(number(t, 3) for t in handoff.bad_reload_s),
                )
            )
        rows.append(
            (
                f"serving after {label}",
                yes_no(gunicorn.serving_after_bad),
                yes_no(handoff.serving_after_bad),
            )
        )
    rows += [
        (
            "server still serving at end",
            yes_no(gunicorn.serving_at_end),
            yes_no(handoff.serving_at_end),
        ),
        (
            "version answering at end",
            ",".join(gunicorn.versions_at_end),
            ",".join(handoff.versions_at_end),
        ),
        (
            "server exit status",
            ",".join(str(c) for c in gunicorn.exit_codes),
            ",".join(str(c) for c in handoff.exit_codes),
        ),
    ]
    width = max(len(label) for label, _, _ in rows) + 2
    lines = [
        f"[{scenario.key}] {scenario.title}",
        pair.title,
        f"{'':<{width}}{'gunicorn HUP':>{COLUMN}}{'handoff':>{COLUMN}}",
    ]
    lines += [f"{label:<{width}}{a:>{COLUMN}}{b:>{COLUMN}}" for label, a, b in rows]
    return lines


def reload_lines(gunicorn_runs: list[RunResult], handoff_runs: list[RunResult]) -> list[str]:
    """How each reload ended, per round and side."""
    lines: list[str] = []
    for round_index, runs in enumerate(zip(gunicorn_runs, handoff_runs, strict=False), 1):
        for run in runs:
            prefix = f"  round {round_index} " if len(gunicorn_runs) > 1 else "  "
            lines.append(f"{prefix}{run.side}:")
            lines += [f"    reload {r.number} {r.release}: {r.describe()}" for r in run.reloads]
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
    scenarios = [s for s in SCENARIOS if args.scenario in ("all", s.key)]
    results: dict[tuple[str, str], dict[str, list[RunResult]]] = {
        (scenario.key, pair.key): {"gunicorn": [], "handoff": []}
        for scenario in scenarios
        for pair in scenario.pairs
    }
    budget = run_budget_s(args)
    completed = True
    maxima = MaxLatency()
    with tempfile.TemporaryDirectory(prefix="handoff-peers-") as tmp, maxima.installed():
        ctx = RunContext(args=args, workdir=Path(tmp), say=say, maxima=maxima)
        try:
            for round_number in range(1, args.rounds + 1):
                for scenario in scenarios:
                    for pair in scenario.pairs:
                        sides = [("gunicorn", run_gunicorn_hup), ("handoff", run_handoff)]
                        if round_number % 2 == 0:  # alternate who runs first
                            sides.reverse()
                        for side, runner in sides:
                            print(
                                f"round {round_number}/{args.rounds}: {scenario.key} "
                                f"{pair.key} {side}: {args.reloads} reloads, "
                                f"{args.seconds_between:g} s apart",
                                file=out,
                                flush=True,
                            )
                            async with asyncio.timeout(budget):
                                run = await runner(scenario, pair, ctx)
                            results[scenario.key, pair.key][side].append(run)
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
        "reload_timeout_s": args.reload_timeout,
        "handoff_ready_timeout_s": HANDOFF_READY_TIMEOUT_S,
        "bad_reload": BAD_RELOAD,
        "completed": completed,
        "scenarios": {},
    }
    scenarios_doc: dict[str, object] = {}
    for scenario in scenarios:
        pairs_doc: dict[str, object] = {}
        for pair in scenario.pairs:
            gunicorn_runs = results[scenario.key, pair.key]["gunicorn"]
            handoff_runs = results[scenario.key, pair.key]["handoff"]
            if not gunicorn_runs and not handoff_runs:
                continue
            gunicorn, handoff = summarise(gunicorn_runs), summarise(handoff_runs)
            print(file=out)
            rounds = max(len(gunicorn_runs), len(handoff_runs), 1)
            print("\n".join(table(scenario, pair, gunicorn, handoff, rounds)), file=out)
            if scenario.bad_release is not None or any(
                run.count(OK) != len(run.reloads) for run in gunicorn_runs + handoff_runs
            ):
                print("how each reload ended:", file=out)
                print("\n".join(reload_lines(gunicorn_runs, handoff_runs)), file=out)
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
        if pairs_doc:
            scenarios_doc[scenario.key] = {
                "title": scenario.title,
                "bad_release": scenario.bad_release,
                "pairs": pairs_doc,
            }
    document["scenarios"] = scenarios_doc
    if args.json is not None:
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0 if completed else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument(
        "--scenario",
        choices=[*(s.key for s in SCENARIOS), "all"],
        default="all",
        help="which releases the reloads deploy (default: all scenarios in turn)",
    )
    parser.add_argument("--reloads", type=int, default=5)
    parser.add_argument("--seconds-between", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything, alternating")
    parser.add_argument("--keepalive-clients", type=int, default=8)
    parser.add_argument("--fresh-clients", type=int, default=4)
    parser.add_argument(
        "--reload-timeout",
        type=float,
        default=30.0,
        help="seconds after SIGHUP for the new code to answer (handoff: for its outcome)",
    )
    parser.add_argument("--json", metavar="OUT", help="also write the results here")
    parser.add_argument("-v", "--verbose", action="store_true", help="show each step")
    args = parser.parse_args()
    if args.reloads < 1 or args.rounds < 1 or args.seconds_between <= 0:
        parser.error("--reloads and --rounds must be >= 1, --seconds-between > 0")
    if args.scenario != "healthy" and args.reloads < BAD_RELOAD:
        parser.error(f"--scenario {args.scenario} needs --reloads >= {BAD_RELOAD}")
    if args.reload_timeout <= HANDOFF_READY_TIMEOUT_S:
        parser.error(
            f"--reload-timeout must exceed handoff's --ready-timeout "
            f"({HANDOFF_READY_TIMEOUT_S:g} s), or a slow release's outcome is never seen"
        )
    return asyncio.run(bench(args, sys.stdout))


if __name__ == "__main__":
    sys.exit(main())
