"""The results: each side summarised over rounds, printed side by side, written as JSON."""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

from handoff.demo.load import FailureClass

from .runs import FAILED, GONE, HANDOFF_READY_TIMEOUT_S, OK, RunResult
from .scenarios import BAD_RELOAD, Pair, Scenario

# Each (scenario key, pair key) -> each side ("gunicorn", "handoff") -> its runs by round.
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


def report(
    args: argparse.Namespace,
    scenarios: list[Scenario],
    results: Results,
    *,
    completed: bool,
    out: TextIO,
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
