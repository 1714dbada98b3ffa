"""Peers benchmark: every tool a user would pick to reload a server, on the same app
under the same load, in one run, with tables, JSON and pictures.

    python -m bench.peers [--scenario healthy|broken|slow|all] [--reloads N]
                          [--seconds-between S] [--rounds R] [--json OUT]
                          [--pictures DIR] [--tools restart,gunicorn-hup,...]
                          [--keepalive-clients N] [--fresh-clients N] [-v]

(from the repository root, which holds the bench package; the peers are installed by
`pip install -e '.[bench]'` (circus, matplotlib), the `uwsgi` of the `test` extra, and
Debian's libserver-starter-perl (Server::Starter); a tool that is missing is reported as
not run, never dropped).

The app is tests/integration/apps/versioned_app.py, which reads VERSION_FILE at import and
answers with X-Handoff-Version and X-Handoff-Generation, run as a WSGI app by gunicorn
(2 workers) under every tool but uWSGI, which runs it itself (2 processes). The tools
(bench/peers/tools.py says exactly how each is started and reloaded):

  restart         `systemctl restart`: gunicorn stopped and started again; the port closes.
  gunicorn-hup    gunicorn alone (master + 2 workers, no --preload, so that every new worker
                  imports the app afresh), reloaded with `kill -HUP <master>` after each
                  change of VERSION_FILE. The socket is bound here and passed to gunicorn at
                  a known fd (`--bind fd://N`), so the port is known before gunicorn starts
                  and no other process can take it in between. Once gunicorn runs, this
                  process closes its own copy: the socket then lives and dies with gunicorn,
                  exactly as with `--bind HOST:PORT`.
  circus          circusd owns the socket, `circusctl reload web`.
  server-starter  Server::Starter's start_server owns the socket, SIGHUP.
  uwsgi           uWSGI's own master, SIGHUP (graceful reload).
  handoff         the same gunicorn command with --preload and `--bind fd://{fd}` under
                  `handoff run --workers 1 --ready notify --ready-timeout 20`, driven by
                  handoff.demo.drill.run_drill (one handoff worker is one gunicorn master
                  with its 2 workers, the same process tree as above). Each reload starts a
                  new gunicorn, which imports the app afresh (before it sends READY=1,
                  thanks to --preload), waits for its READY=1, then drains the old one.

Every gunicorn runs with --no-control-socket: gunicorn 27 otherwise binds one fixed path
(~/.gunicorn/gunicorn.ctl) per master, which two masters (handoff's old and new
generation, or another gunicorn on the machine) would take from each other.

Scenarios (--scenario, default all); in each, reload N deploys VERSION_FILE = "vN" except
where said:

  healthy  every release is healthy. Both pairs below.
  broken   reload 3 deploys "broken": versioned_app raises RuntimeError at import. Reloads
           4 and onwards deploy healthy releases again. Sync pair only.
  slow     reload 3 deploys "slow": versioned_app sleeps 3 s at import, then serves
           version "slow". Sync pair only.
  steady   no reload: the same load for as long as a run with reloads takes, to see what
           each tool costs in the data path; requests/s against bare gunicorn (gunicorn-hup
           with no HUP is gunicorn alone on the socket). Both pairs.

Pairs: sync workers (which close every connection, so keep-alive clients reconnect for
each request) and gthread workers with keep-alive (`-k gthread --threads 4 --keep-alive
5`), which keep connections open and so expose the race between a server closing an idle
connection and a client reusing it.

Every tool gets the same number of reloads, the same load settings and the same spacing:
`--seconds-between` of load before each reload and after the last one, counted from the
end of the previous reload (a peer: the new version answered, the tool exited, or
--reload-timeout passed; handoff: the master reported the reload's outcome). If a tool
exits, its remaining reloads are not sent ("server gone") but their time still passes under
load, so that every tool is measured for about as long.

How a reload ended: for handoff, the master's reload.succeeded / reload.failed (with its
reason); for a peer, ok if the new version answered within --reload-timeout of the reload
(its signal, its command, or the restart's stop), failed otherwise (with its exit status if
it exited meanwhile).

"Reload time" is from the reload until the load generator first receives a response from
the new code: for a peer the new X-Handoff-Version, for handoff the new generation's
X-Handoff-Generation (DrillConfig has no generation_header; each handoff generation is a
fresh gunicorn that imported the new version, so the first response of the generation is
the first of the version).

The run's live counters are sampled every 50 ms, which gives: whether the server answered
after the bad release (between the end of that reload and the next one), whether it still
answered in the last second of the load ("serving at end") and with which version, and the
longest stretch without any successful response. "max latency ms" is exact: LoadStats keeps
only a 10,000-latency sample, which can miss the few requests that wait out a stall, so
LoadStats.record_ok is wrapped for the duration of the bench to see every latency.

--pictures DIR (default: next to --json): per scenario and pair, one PNG with a row per tool
(answered and failed requests per second over time, the reloads marked: pictures.py).

Exit status 0 when every run completed (whatever the failure counts), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TextIO

from handoff.demo.master_process import DrillError

from .handoff_side import run_handoff
from .idle import idle_of_tools
from .measure import MaxLatency
from .pictures import draw
from .report import Results, report
from .runs import HANDOFF_READY_TIMEOUT_S, PeerError, RunContext, RunResult, Say, run_budget_s
from .scenarios import BAD_RELOAD, SCENARIOS, Pair, Scenario
from .server_logs import LOG_TAIL_LINES
from .standalone_side import run_standalone
from .tools import TOOL_KEYS, TOOLS

Runner = Callable[[Scenario, Pair, RunContext], Awaitable[RunResult]]


def runners(keys: list[str], out: TextIO) -> tuple[list[tuple[str, Runner]], dict[str, str]]:
    """The runs of the tools asked for, in order, and why the missing ones cannot run."""
    chosen: list[tuple[str, Runner]] = []
    skipped: dict[str, str] = {}
    for tool in TOOLS:
        if tool.key not in keys:
            continue
        why = tool.missing()
        if why is not None:
            skipped[tool.key] = why
            print(f"{tool.key}: not run: {why}", file=out, flush=True)
            continue
        chosen.append((tool.key, functools.partial(run_standalone, tool)))
    if "handoff" in keys:
        chosen.append(("handoff", run_handoff))
    return chosen, skipped


async def bench(args: argparse.Namespace, out: TextIO) -> int:
    say: Say = (
        (lambda line: print(f"  {line}", file=sys.stderr)) if args.verbose else (lambda _line: None)
    )
    scenarios = [s for s in SCENARIOS if args.scenario in ("all", s.key)]
    chosen, skipped = runners(args.tools.split(","), out)
    results: Results = {
        (scenario.key, pair.key): {key: [] for key, _ in chosen}
        for scenario in scenarios
        for pair in scenario.pairs
    }
    budget = run_budget_s(args)
    completed = True
    idle: dict[str, object] = {}
    maxima = MaxLatency()
    with tempfile.TemporaryDirectory(prefix="handoff-peers-") as tmp, maxima.installed():
        ctx = RunContext(args=args, workdir=Path(tmp), say=say, maxima=maxima)
        try:
            if args.idle_seconds > 0:
                print(f"at rest: each tool's supervisor for {args.idle_seconds:g} s", file=out)
                idle = await idle_of_tools([key for key, _ in chosen], ctx, args.idle_seconds)
            for round_number in range(1, args.rounds + 1):
                for scenario in scenarios:
                    for pair in scenario.pairs:
                        sides = list(chosen)
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

    report(args, scenarios, results, completed=completed, out=out, skipped=skipped, idle=idle)
    pictures = args.pictures or (Path(args.json).parent if args.json else None)
    if pictures is not None:
        for path in draw(scenarios, results, Path(pictures)):
            print(f"picture: {path}", file=out)
    return 0 if completed else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.peers", description=(__doc__ or "").split("\n", 1)[0]
    )
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
    parser.add_argument(
        "--tools",
        default=",".join(TOOL_KEYS),
        help=f"which tools, comma-separated, in this order (default: {','.join(TOOL_KEYS)})",
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=5.0,
        help="watch each tool's supervisor at rest this long first (0: skip)",
    )
    parser.add_argument("--json", metavar="OUT", help="also write the results here")
    parser.add_argument(
        "--pictures",
        metavar="DIR",
        help="write the PNG pictures here (default: next to --json; none without either)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show each step")
    args = parser.parse_args()
    unknown = set(args.tools.split(",")) - set(TOOL_KEYS)
    if unknown:
        parser.error(f"unknown tools: {', '.join(sorted(unknown))} (choose from {TOOL_KEYS})")
    if args.reloads < 1 or args.rounds < 1 or args.seconds_between <= 0:
        parser.error("--reloads and --rounds must be >= 1, --seconds-between > 0")
    if args.scenario in ("broken", "slow", "all") and args.reloads < BAD_RELOAD:
        parser.error(f"--scenario {args.scenario} needs --reloads >= {BAD_RELOAD}")
    if args.reload_timeout <= HANDOFF_READY_TIMEOUT_S:
        parser.error(
            f"--reload-timeout must exceed handoff's --ready-timeout "
            f"({HANDOFF_READY_TIMEOUT_S:g} s), or a slow release's outcome is never seen"
        )
    return asyncio.run(bench(args, sys.stdout))


if __name__ == "__main__":
    sys.exit(main())
