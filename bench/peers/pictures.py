"""The pictures: per scenario and pair, one figure with a row per tool, on one time axis:
requests answered per second (line) and failed requests per second (red bars), each
reload marked by a dotted line, a reload that did not succeed by a red one.

matplotlib comes with the `bench` extra (pip install -e '.[bench]'); without it the
pictures are skipped with a hint, the tables and JSON are written as usual.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from .measure import Timeline
from .report import TITLES, Results
from .runs import OK, RunResult
from .scenarios import Scenario

BIN_S: Final = 0.25  # rates are counted over this many seconds
MISSING_HINT: Final = "pip install -e '.[bench]' (matplotlib) for the pictures"


def rates(timeline: Timeline, origin: float) -> tuple[list[float], list[float], list[float]]:
    """(seconds since origin, answered per second, failed per second), per BIN_S."""
    times: list[float] = []
    answered: list[float] = []
    failed: list[float] = []
    stopped = timeline.stats.stopped_at
    samples = [s for s in timeline.samples if stopped is None or s.at <= stopped]
    if not samples:
        return times, answered, failed
    start = samples[0]
    for sample in samples[1:]:
        elapsed = sample.at - start.at
        # Whole bins only; the last, shorter one counts if it is at least half a bin.
        if elapsed < BIN_S and (sample is not samples[-1] or elapsed < BIN_S / 2):
            continue
        times.append(sample.at - origin)
        answered.append((sample.ok - start.ok) / elapsed)
        failed.append((sample.failures - start.failures) / elapsed)
        start = sample
    return times, answered, failed


def draw(scenarios: list[Scenario], results: Results, directory: Path) -> list[Path]:
    """Write one PNG per scenario and pair (the first round of each tool); their paths."""
    try:
        import matplotlib  # noqa: PLC0415 - optional: the bench extra

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print(f"peers: no pictures: {MISSING_HINT}")
        return []
    written: list[Path] = []
    directory.mkdir(parents=True, exist_ok=True)
    for scenario in scenarios:
        for pair in scenario.pairs:
            runs = {
                key: runs[0]
                for key, runs in results.get((scenario.key, pair.key), {}).items()
                if runs and runs[0].timeline is not None
            }
            if not runs:
                continue
            figure, axes = plt.subplots(
                len(runs), 1, sharex=True, figsize=(10, 1.7 * len(runs) + 0.8), squeeze=False
            )
            ceiling = max(_peak(run) for run in runs.values()) * 1.1 or 1.0
            for row, (key, run) in zip(axes[:, 0], runs.items(), strict=True):
                _row(row, TITLES.get(key, key), run, ceiling)
            axes[-1, 0].set_xlabel("seconds since the load started")
            figure.suptitle(f"{scenario.title}: {pair.title}", fontsize=10)
            figure.tight_layout()
            path = directory / f"peers-{scenario.key}-{pair.key}.png"
            figure.savefig(path, dpi=110)
            plt.close(figure)
            written.append(path)
    return written


def _peak(run: RunResult) -> float:
    assert run.timeline is not None
    _, answered, _ = rates(run.timeline, 0.0)
    return max(answered, default=0.0)


def _row(axis: Any, title: str, run: RunResult, ceiling: float) -> None:
    assert run.timeline is not None
    assert run.timeline.samples
    origin = run.timeline.samples[0].at
    times, answered, failed = rates(run.timeline, origin)
    axis.plot(times, answered, color="tab:blue", linewidth=1.0, label="answered/s")
    axis.bar(times, failed, width=BIN_S, color="tab:red", label="failed/s")
    for reload in run.reloads:
        ok = reload.outcome == OK
        axis.axvline(
            reload.started_at - origin,
            color="grey" if ok else "red",
            linestyle=":" if ok else "--",
            linewidth=1.0,
        )
    total = run.load.total_failures()
    axis.set_ylim(0, ceiling)
    axis.set_ylabel("req/s", fontsize=8)
    axis.set_title(f"{title}: {total:,} failed", fontsize=9, loc="left")
    axis.tick_params(labelsize=8)
