"""`handoff demo`: the built-in app under handoff, under load, reloaded live.

Runs a drill with handoff.demo.app as the command, changes the app's version
file before each reload (so every generation is a "new release"), and reports what a user
wants to know: requests served, failures (zero), reload times, which generations answered.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path
from typing import Final, TextIO

from handoff.demo.drill import DrillConfig, DrillResult, run_drill
from handoff.demo.load import FailureClass, LoadStats
from handoff.demo.master_process import DrillError

_REFRESH_S: Final = 0.2


def _write_version(path: Path, version: str) -> None:
    # Atomically, so that a worker starting at that moment reads one version or the other.
    scratch = path.with_suffix(".new")
    scratch.write_text(version + "\n", encoding="utf-8")
    os.replace(scratch, path)


def _current_generation(stats: LoadStats) -> str:
    if not stats.first_seen:
        return "-"
    return max(stats.first_seen, key=lambda gen: stats.first_seen[gen])


def _live_line(stats: LoadStats) -> str:
    rate = stats.requests_per_s() or 0.0
    return (
        f"requests {stats.ok:,}  failures {stats.total_failures()}  "
        f"{rate:,.0f} req/s  newest generation {_current_generation(stats)}"
    )


class _Display:
    """Progress on out: a live status line on a terminal, plain step lines otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.live = out.isatty()
        self.stats: LoadStats | None = None
        self._width = 0

    def _clear(self) -> None:
        if self._width:
            self.out.write("\r" + " " * self._width + "\r")
            self._width = 0

    def step(self, line: str) -> None:
        self._clear()
        self.out.write(f"  {line}\n")
        self.out.flush()

    def refresh(self) -> None:
        if not self.live or self.stats is None:
            return
        line = "  " + _live_line(self.stats)
        self._clear()
        self.out.write(line)
        self.out.flush()
        self._width = len(line)

    def finish(self) -> None:
        self._clear()
        self.out.flush()

    async def run(self, done: asyncio.Event) -> None:
        """Refresh the live line until done is set."""
        while not done.is_set():
            self.refresh()
            try:
                await asyncio.wait_for(done.wait(), _REFRESH_S)
            except TimeoutError:
                continue


def _seconds(value: float | None) -> str:
    return f"{value:.2f} s" if value is not None else "-"


def _summary(result: DrillResult, workers: int) -> list[str]:
    load = result.load
    duration = load.duration_s() or 0.0
    median = load.median_latency_ms()
    p99 = load.latency_percentile_ms(99)
    by_class = "  ".join(f"{failure} {load.failures[failure]}" for failure in FailureClass)
    lines = [
        "",
        f"handoff demo: {len(result.reloads)} reloads of {workers} workers on "
        f"127.0.0.1:{result.port}, {duration:.1f} s under load",
        "",
        f"  requests served  {load.ok:,}  (keep-alive {load.ok_keepalive:,}, "
        f"fresh connections {load.ok_fresh:,}; {load.requests_per_s() or 0:,.0f} req/s)",
        f"  failed           {load.total_failures()}  ({by_class})",
        f"  median latency   {median:.2f} ms  (p99 {p99:.2f} ms)"
        if median is not None and p99 is not None
        else "  median latency   -",
        "",
        "  reload  generation  result  master reported  new generation answering",
    ]
    for record in result.reloads:
        outcome = "ok" if record.ok else "FAILED"
        lines.append(
            f"  {record.number:>6}  {record.gen if record.gen is not None else '-':>10}  "
            f"{outcome:<6}  {_seconds(record.duration_s):>15}  "
            f"{_seconds(record.served_after_s):>24}"
        )
        if record.reason and not record.ok:
            lines.append(f"          reason: {record.reason}")
    generations = ", ".join(
        f"{gen}: {count:,}"
        for gen, count in sorted(result.generations_seen.items(), key=lambda i: i[0].zfill(9))
    )
    lines += ["", f"  answers by generation  {generations or '-'}"]
    lines.append(f"  master exit status     {result.master_exit_code}")
    lines.append("")
    if result.ok():
        lines.append("PASS: zero failed requests, every reload succeeded")
    else:
        lines.append("FAIL: see the failures and reloads above")
        lines += [f"  {error}" for error in load.recent_errors]
    return lines


async def _demo(config: DrillConfig, display: _Display) -> DrillResult:
    done = asyncio.Event()
    refresher = asyncio.create_task(display.run(done))

    def started(stats: LoadStats) -> None:
        display.stats = stats

    try:
        return await run_drill(config, display.step, on_load_started=started)
    finally:
        done.set()
        await refresher
        display.finish()


def run_demo(
    *, reloads: int = 5, workers: int = 2, seconds_between: float = 1.5, out: TextIO
) -> int:
    """Run the demo, print a summary on out; return 0 only with zero failures."""
    with tempfile.TemporaryDirectory(prefix="handoff-demo-") as scratch:
        version_file = Path(scratch) / "version"
        _write_version(version_file, "release-1")

        control = str(Path(scratch) / "handoff.sock")

        def before_reload(number: int) -> None:
            _write_version(version_file, f"release-{number + 1}")

        def show_status() -> None:
            out.write(f"\n$ handoff status --control {control}\n")
            out.write(_status_table(control) + "\n\n")

        config = DrillConfig(
            command=(sys.executable, "-m", "handoff.demo.app", "--version-file", str(version_file)),
            workers=workers,
            reloads=reloads,
            settle_s=seconds_between,
            before_reload=before_reload,
            control_path=control,
            after_reloads=show_status,
        )
        display = _Display(out)
        out.write(
            f"handoff demo: {workers} workers of the built-in app, keep-alive and fresh "
            f"connections, {reloads} reloads {seconds_between:g} s apart\n"
        )
        try:
            result = asyncio.run(_demo(config, display))
        except DrillError as exc:
            out.write(f"handoff demo: error: {exc}\n")
            out.writelines(f"  | {line}\n" for line in exc.output_tail[-20:])
            return 1
    out.write("\n".join(_summary(result, workers)) + "\n")
    out.flush()
    return 0 if result.ok() else 1


def _status_table(control: str) -> str:
    """What `handoff status` prints, asked over the same control socket."""
    from handoff.cli.control_client import exchange  # noqa: PLC0415
    from handoff.cli.status_view import render_status  # noqa: PLC0415

    for line in exchange(control, {"cmd": "status"}, 10.0):
        report = line.get("status")
        if isinstance(report, dict):
            return render_status(report)
    return "(no status)"
