"""The results: each side summarised over rounds, printed side by side, written as JSON."""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

from handoff.demo.load import FailureClass

from .runs import FAILED, GONE, HANDOFF_READY_TIMEOUT_S, OK, RunResult
from .scenarios import BAD_RELOAD, Pair, Scenario

# Each (scenario key, pair key) -> each tool (tools.py, and "handoff") -> its runs by round.
Results = dict[tuple[str, str], dict[str, list[RunResult]]]


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
    p50_latency_ms: float | None  # median over rounds
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
            "p50_latency_ms_median": self.p50_latency_ms,
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
        p50_latency_ms=median(
            [v for run in runs if (v := run.load.median_latency_ms()) is not None]
        ),
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
TITLES: Final = {
    "restart": "restart",
    "gunicorn-hup": "gunicorn HUP",
    "circus": "circus",
    "server-starter": "Server::Starter",
    "uwsgi": "uWSGI HUP",
    "uwsgi-chain": "uWSGI chain",
    "handoff": "handoff",
}


def table(scenario: Scenario, pair: Pair, summaries: dict[str, Summary], rounds: int) -> list[str]:
    """One row per figure, one column per tool."""
    many = f" (sum of {rounds} rounds)" if rounds > 1 else ""
    med = " (median of rounds)" if rounds > 1 else ""
    top = " (max of rounds)" if rounds > 1 else ""
    tools = list(summaries.values())

    def row(label: str, value: Callable[[Summary], str]) -> tuple[str, list[str]]:
        return label, [value(summary) for summary in tools]

    bare = summaries.get("gunicorn-hup")

    def against_bare(x: Summary) -> str:
        if bare is None or not bare.requests_per_s or x.requests_per_s is None:
            return "-"
        return f"{x.requests_per_s / bare.requests_per_s:.2f}"

    rows = [
        row(f"requests ok{many}", lambda x: number(x.requests)),
        row(f"requests/s{med}", lambda x: number(x.requests_per_s)),
        *([row("requests/s against bare gunicorn", against_bare)] if scenario.steady else []),
        row(f"p50 latency ms{med}", lambda x: number(x.p50_latency_ms, 1)),
        row(f"p99 latency ms{med}", lambda x: number(x.p99_latency_ms, 1)),
        row(f"max latency ms{top}", lambda x: number(x.max_latency_ms, 1)),
        row(f"longest gap without a response s{top}", lambda x: number(x.longest_gap_s, 2)),
    ]
    rows += [
        row(f"  failed: {failure}", lambda x, f=str(failure): str(x.failures[f]))
        for failure in FailureClass
    ]
    rows += [
        row(f"failures total{many}", lambda x: str(sum(x.failures.values()))),
        row("idle keep-alive closes (no failure)", lambda x: str(x.idle_closes)),
        row(
            "reloads ok / failed / server gone",
            lambda x: f"{x.reloads_ok} / {x.reloads_failed} / {x.reloads_gone}",
        ),
        row("reloads whose new code answered", lambda x: f"{x.reloads_seen}/{x.reloads}"),
        row("median reload s (-> new code)", lambda x: number(x.reload_median_s, 3)),
        row("max reload s", lambda x: number(x.reload_max_s, 3)),
    ]
    if scenario.bad_release is not None:
        label = f"reload {BAD_RELOAD} ({scenario.bad_release})"
        rows.append(row(f"{label} ended", lambda x: ",".join(x.bad_reload_outcomes)))
        if scenario.bad_release == "slow":
            rows.append(
                row(
                    f"{label}: -> '{scenario.bad_release}' answers s",
                    lambda x: ",".join(number(t, 3) for t in x.bad_reload_s),
                )
            )
        rows.append(row(f"serving after {label}", lambda x: yes_no(x.serving_after_bad)))
    rows += [
        row("server still serving at end", lambda x: yes_no(x.serving_at_end)),
        row("version answering at end", lambda x: ",".join(x.versions_at_end)),
        row("server exit status", lambda x: ",".join(str(c) for c in x.exit_codes)),
    ]
    width = max(len(label) for label, _ in rows) + 2
    heads = "".join(f"{TITLES.get(key, key):>{COLUMN}}" for key in summaries)
    lines = [f"[{scenario.key}] {scenario.title}", pair.title, f"{'':<{width}}{heads}"]
    lines += [
        f"{label:<{width}}" + "".join(f"{value:>{COLUMN}}" for value in values)
        for label, values in rows
    ]
    return lines


def reload_lines(runs_by_tool: dict[str, list[RunResult]]) -> list[str]:
    """How each reload ended, per round and tool."""
    lines: list[str] = []
    rounds = max((len(runs) for runs in runs_by_tool.values()), default=0)
    for index in range(rounds):
        for runs in runs_by_tool.values():
            if index >= len(runs):
                continue
            run = runs[index]
            prefix = f"  round {index + 1} " if rounds > 1 else "  "
            lines.append(f"{prefix}{run.side}:")
            lines += [f"    reload {r.number} {r.release}: {r.describe()}" for r in run.reloads]
    return lines


def headline(scenarios: list[Scenario], results: Results) -> list[str]:
    """The markdown table the README and docs/benchmarks.md show: failed requests per
    scenario per tool (every pair and round summed), and what the bad releases did."""
    by_tool: dict[str, dict[str, list[RunResult]]] = {}
    for scenario in scenarios:
        for pair in scenario.pairs:
            for key, runs in results.get((scenario.key, pair.key), {}).items():
                by_tool.setdefault(key, {}).setdefault(scenario.key, []).extend(runs)
    keys = [s.key for s in scenarios]
    head = ["tool", *(f"failed: {key}" for key in keys)]
    extra = []
    if "broken" in keys:
        extra.append("serving after the broken release")
    if "slow" in keys:
        extra.append("longest gap, slow release (s)")
    if "healthy" in keys:
        extra.append("median reload (s)")
    lines = ["| " + " | ".join(head + extra) + " |", "|---" * (len(head) + len(extra)) + "|"]
    for key, runs_by_scenario in by_tool.items():
        cells = [TITLES.get(key, key)]
        for scenario_key in keys:
            runs = runs_by_scenario.get(scenario_key, [])
            cells.append(number(sum(r.load.total_failures() for r in runs)) if runs else "-")
        if "broken" in keys:
            broken = runs_by_scenario.get("broken", [])
            cells.append(
                yes_no([r.serving_after_bad for r in broken if r.serving_after_bad is not None])
            )
        if "slow" in keys:
            slow = [
                r.longest_gap_s
                for r in runs_by_scenario.get("slow", [])
                if r.longest_gap_s is not None
            ]
            cells.append(number(max(slow), 2) if slow else "-")
        if "healthy" in keys:
            summary = summarise(runs_by_scenario.get("healthy", []))
            cells.append(number(summary.reload_median_s, 3))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def rest_lines(idle: dict[str, object]) -> list[str]:
    """The supervisors at rest, one line each."""
    lines = [f"{'at rest, no load':<18}{'wakeups/s':>12}{'CPU ms/s':>12}  RSS MiB"]
    for key, figures in idle.items():
        assert isinstance(figures, dict)
        name = TITLES.get(key, key)
        if "not_measured" in figures:
            lines.append(f"{name:<18}  not measured: {figures['not_measured']}")
            continue
        rss = f"{figures['rss_mib']}" + (
            f" (+{figures['helpers_rss_mib']} helpers)" if "helpers_rss_mib" in figures else ""
        )
        lines.append(
            f"{name:<18}{figures['wakeups_per_s']:>12}{figures['cpu_ms_per_s']:>12}  {rss}"
        )
    return lines


def error_samples(runs: list[RunResult], limit: int = 3) -> list[str]:
    lines: list[str] = []
    for run in runs:
        if run.load.total_failures():
            for error in list(run.load.recent_errors)[-limit:]:
                lines.append(f"  {run.side}: {error}")
    return lines


def report(
    args: argparse.Namespace,
    scenarios: list[Scenario],
    results: Results,
    *,
    completed: bool,
    out: TextIO,
    skipped: dict[str, str] | None = None,
    idle: dict[str, object] | None = None,
) -> None:
    """Print each pair's table to out and, with --json, write every number to that file."""
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
        "not_run": skipped or {},  # tools that could not run here, and why
        "at_rest": idle or {},  # each supervisor with no load (idle.py)
        "scenarios": {},
    }
    if idle:
        print(file=out)
        print("\n".join(rest_lines(idle)), file=out)
    scenarios_doc: dict[str, object] = {}
    for scenario in scenarios:
        pairs_doc: dict[str, object] = {}
        for pair in scenario.pairs:
            by_tool = {k: v for k, v in results[scenario.key, pair.key].items() if v}
            if not by_tool:
                continue
            summaries = {key: summarise(runs) for key, runs in by_tool.items()}
            every = [run for runs in by_tool.values() for run in runs]
            print(file=out)
            rounds = max(len(runs) for runs in by_tool.values())
            print("\n".join(table(scenario, pair, summaries, rounds)), file=out)
            if scenario.bad_release is not None or any(
                run.count(OK) != len(run.reloads) for run in every
            ):
                print("how each reload ended:", file=out)
                print("\n".join(reload_lines(by_tool)), file=out)
            samples = error_samples(every)
            if samples:
                print("last failures seen:", file=out)
                print("\n".join(samples), file=out)
            pairs_doc[pair.key] = {
                "title": pair.title,
                "summary": {key: summary.to_dict() for key, summary in summaries.items()},
                "runs": {key: [run.to_dict() for run in runs] for key, runs in by_tool.items()},
            }
        if pairs_doc:
            scenarios_doc[scenario.key] = {
                "title": scenario.title,
                "bad_release": scenario.bad_release,
                "pairs": pairs_doc,
            }
    document["scenarios"] = scenarios_doc
    document["headline"] = headline(scenarios, results)
    print(file=out)
    print("\n".join(document["headline"]), file=out)
    if args.json is not None:
        from .markdown import render  # noqa: PLC0415 - it imports this module

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        tables = render(json.loads(json.dumps(document)))
        Path(args.json).with_suffix(".md").write_text(tables, encoding="utf-8")
