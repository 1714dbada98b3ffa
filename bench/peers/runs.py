"""One run of one side: what it is given, its time bounds, what it returns or raises.

Both sides (gunicorn_side, handoff_side) return a RunResult of ReloadOutcomes, assessed
from the run's Timeline by assess(), so that the report compares them line by line.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from handoff.demo.load import LoadStats

from .measure import MaxLatency, Timeline
from .scenarios import BAD_RELOAD, Scenario

STARTUP_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 40.0  # gunicorn's default --graceful-timeout is 30 s
KILL_WAIT_S: Final = 10.0
REQUEST_TIMEOUT_S: Final = 5.0
HANDOFF_READY_TIMEOUT_S: Final = 20.0  # the slow release needs ~3 s; its own bound otherwise
END_WINDOW_S: Final = 1.0  # "serving at end": answered within the load's last second

Say = Callable[[str], None]

OK: Final = "ok"
FAILED: Final = "failed"
GONE: Final = "server gone"


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

    side: str  # the tool's key (tools.py), or "handoff"
    load: LoadStats
    reloads: list[ReloadOutcome]
    exit_code: int | None
    serving_after_bad: bool | None  # None: no bad release in this scenario
    serving_at_end: bool
    versions_at_end: list[str]  # releases that answered in the load's last END_WINDOW_S
    max_latency_ms: float | None
    longest_gap_s: float | None
    timeline: Timeline | None = None  # the load's counters over time (for the pictures)
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
