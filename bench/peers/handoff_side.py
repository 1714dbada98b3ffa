"""The same gunicorn under handoff, reloaded by a drill (handoff.demo.drill)."""

from __future__ import annotations

import asyncio
import time

from handoff.demo.drill import DrillConfig, DrillResult, run_drill
from handoff.demo.load import LoadStats

from .measure import Timeline
from .runs import (
    FAILED,
    HANDOFF_READY_TIMEOUT_S,
    OK,
    REQUEST_TIMEOUT_S,
    STARTUP_TIMEOUT_S,
    STOP_TIMEOUT_S,
    ReloadOutcome,
    RunContext,
    RunResult,
    assess,
)
from .scenarios import Pair, Scenario, gunicorn_argv
from .server_logs import HANDOFF_NOTABLE, notable_lines


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
        reloads=scenario.reloads(args.reloads),
        ready="notify",
        settle_s=scenario.final_load_s(args.reloads, args.seconds_between)
        if scenario.steady
        else args.seconds_between,
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
    for number in range(len(reloads) + 1, scenario.reloads(args.reloads) + 1):
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
        timeline=timeline,
        detail={
            "command": list(config.command),
            "handoff_args": ["--workers", "1", "--ready", "notify", *config.extra_args],
            "drill": result.to_dict(),
            "all_reloads_ok": all(r.outcome == OK for r in reloads),
            **assessed,
            "log_notable": notable_lines(result.output_tail, HANDOFF_NOTABLE),
        },
    )
