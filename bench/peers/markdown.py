"""The run's tables in markdown, from its JSON: what docs/benchmarks.md publishes.

    python -m bench.peers.markdown RESULTS.json [OUT.md]

`python -m bench.peers --json OUT` writes OUT.md next to it as well, so that a run
reproduces the published tables exactly; this entry point redraws them from any JSON.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .report import TITLES, number, yes_no

Summary = Mapping[str, Any]  # a tool's "summary" in the JSON (report.Summary.to_dict)
Row = tuple[str, Callable[[Summary], str]]


def _table(header: str, summaries: Mapping[str, Summary], rows: list[Row]) -> list[str]:
    keys = list(summaries)
    lines = [
        f"| {header} | " + " | ".join(TITLES.get(k, k) for k in keys) + " |",
        "|---" + "|---:" * len(keys) + "|",
    ]
    for label, value in rows:
        lines.append(f"| {label} | " + " | ".join(value(summaries[k]) for k in keys) + " |")
    return lines


def _failed(summary: Summary) -> str:
    total = summary["failures_total"]
    if not total:
        return "0"
    classes = ", ".join(f"{n:,} {c}" for c, n in summary["failures_by_class"].items() if n)
    return f"{total:,} ({classes})"


def _rows(steady: bool, bad_release: bool) -> list[Row]:
    rows: list[Row] = [
        ("failed requests", _failed),
        (
            "longest gap without an answer (s)",
            lambda x: number(x["longest_gap_without_response_s"], 2),
        ),
        (
            "latency p50 / p99 (ms)",
            lambda x: (
                f"{number(x['p50_latency_ms_median'], 1)} / {number(x['p99_latency_ms_median'], 1)}"
            ),
        ),
        ("slowest request (ms)", lambda x: number(x["max_latency_ms"], 1)),
        ("requests/s", lambda x: number(x["requests_per_s_median"])),
    ]
    if not steady:
        rows += [
            ("median reload (s)", lambda x: number(x["reload_median_s"], 3)),
            (
                "reloads ok / failed / not possible",
                lambda x: f"{x['reloads_ok']} / {x['reloads_failed']} / {x['reloads_server_gone']}",
            ),
        ]
    if bad_release:
        rows.append(
            ("serving after the bad release", lambda x: yes_no(x["serving_after_bad_release"]))
        )
    rows += [
        ("serving at the end", lambda x: yes_no(x["serving_at_end"])),
        ("version answering at the end", lambda x: ",".join(x["versions_at_end"])),
        ("exit status", lambda x: ",".join(str(c) for c in x["exit_codes"])),
    ]
    return rows


def _at_rest(idle: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = ["| at rest | wakeups/s | CPU ms/s | RSS MiB |", "|---|---:|---:|---:|"]
    for key, figures in idle.items():
        name = TITLES.get(key, key)
        if "not_measured" in figures:
            lines.append(f"| {name} | - | - | not measured: {figures['not_measured']} |")
            continue
        helpers = figures.get("helpers_rss_mib")
        rss = f"{figures['rss_mib']}" + (f" (+{helpers} helpers)" if helpers is not None else "")
        lines.append(f"| {name} | {figures['wakeups_per_s']} | {figures['cpu_ms_per_s']} | {rss} |")
    return lines


def render(results: Mapping[str, Any]) -> str:
    """Every table of a run, from its JSON document."""
    lines = ["Failed requests, every pair summed:", "", *results.get("headline", [])]
    for key, scenario in results["scenarios"].items():
        steady, bad = key == "steady", scenario["bad_release"] is not None
        for pair in scenario["pairs"].values():
            summaries = pair["summary"]
            lines += ["", f"{scenario['title']}; {pair['title']}", ""]
            lines += _table(key, summaries, _rows(steady, bad))
            bare = summaries.get("gunicorn-hup", {}).get("requests_per_s_median")
            if steady and bare:
                ratios = [
                    f"{s['requests_per_s_median'] / bare:.2f}"
                    if s["requests_per_s_median"]
                    else "-"
                    for s in summaries.values()
                ]
                lines.append("| requests/s against bare gunicorn | " + " | ".join(ratios) + " |")
    if results.get("at_rest"):
        lines += ["", *_at_rest(results["at_rest"])]
    if results.get("not_run"):
        lines += ["", "Not run: " + "; ".join(f"{k}: {v}" for k, v in results["not_run"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python -m bench.peers.markdown RESULTS.json [OUT.md]", file=sys.stderr)
        return 2
    tables = render(json.loads(Path(argv[1]).read_text(encoding="utf-8")))
    if len(argv) == 3:
        Path(argv[2]).write_text(tables, encoding="utf-8")
    else:
        sys.stdout.write(tables)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
