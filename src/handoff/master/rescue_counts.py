"""Keep-alive rescue: what it counts (status, /metrics) and reports (``rescue.finished``).

Counters carried across re-execs by name, all ``rescue_*``: ``rescue_copied`` (connections
copied before a stop signal), ``rescue_connections`` (taken over after the worker let go:
held or checked), ``rescue_handed`` (requests handed to the new generation and answered),
``rescue_released_<reason>`` (let go, by ``Release``), ``rescue_cpu_us`` (the master's CPU
time spent on rescue). Per old worker, one ``rescue.finished`` once every connection
copied from it is settled.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from handoff.core.model import Pid
from handoff.formats.log_events import EventName, Level
from handoff.formats.rescue_rules import Release
from handoff.master.logs import emit


@dataclass(slots=True)
class _Tally:
    copied: int
    live: int  # connections not settled yet
    handed: int = 0
    released: Counter[str] = field(default_factory=Counter)


class RescueCounts:
    """The counters, and each old worker's tally until it is reported."""

    def __init__(self, carried: Mapping[str, int]) -> None:
        self._counts: Counter[str] = Counter(
            {key: value for key, value in carried.items() if key.startswith("rescue_")}
        )
        self._tallies: dict[Pid, _Tally] = {}

    def counters(self) -> dict[str, int]:
        return dict(self._counts)

    def copied(self, pid: Pid, copied: int, left: int) -> None:
        self._counts["rescue_copied"] += copied
        self._tallies[pid] = _Tally(copied, live=copied)
        if left:
            self._counts[f"rescue_released_{Release.LIMIT}"] += left
            self._tallies[pid].released[Release.LIMIT] += left
        self._report_if_settled(pid)

    def taken_over(self) -> None:
        self._counts["rescue_connections"] += 1

    def handed(self, pid: Pid) -> None:
        self._counts["rescue_handed"] += 1
        tally = self._tallies.get(pid)
        if tally is not None:
            tally.handed += 1
        self._settled(pid)

    def released(self, pid: Pid, why: Release) -> None:
        self._counts[f"rescue_released_{why}"] += 1
        tally = self._tallies.get(pid)
        if tally is not None:
            tally.released[why] += 1
        self._settled(pid)

    def spent_since(self, started: float) -> None:
        """Add the CPU time this thread spent since started (``time.thread_time()``)."""
        self._counts["rescue_cpu_us"] += int((time.thread_time() - started) * 1_000_000)

    def forget(self) -> None:
        self._tallies.clear()

    def _settled(self, pid: Pid) -> None:
        tally = self._tallies.get(pid)
        if tally is not None:
            tally.live -= 1
            self._report_if_settled(pid)

    def _report_if_settled(self, pid: Pid) -> None:
        tally = self._tallies.get(pid)
        if tally is None or tally.live > 0:
            return
        del self._tallies[pid]
        emit(
            EventName.RESCUE_FINISHED,
            Level.INFO,
            pid=pid,
            copied=tally.copied,
            handed=tally.handed,
            released=dict(sorted(tally.released.items())),
        )
