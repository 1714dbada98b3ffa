"""A heap of named deadlines with lazy cancellation.

Pure: the clock is passed in, so tests drive time by hand.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Mapping
from enum import StrEnum
from typing import NamedTuple


class TimerKind(StrEnum):
    READY_TIMEOUT = "ready-timeout"  # per worker: not ready in --ready-timeout
    READY_DELAY = "ready-delay"  # per worker: --ready delay:S elapsed
    NOTIFY_GRACE = "notify-grace"  # per worker, auto: READY=1 came, /proc has not agreed yet
    PROBE_RETRY = "probe-retry"  # per worker: run the readiness probe again
    SETTLE = "settle"  # per worker: --settle after its listening registration was removed
    DRAIN = "drain"  # per worker: --drain-timeout after the stop signal
    RESPAWN = "respawn"  # per (generation, slot): backoff before respawning a crashed worker
    SHUTDOWN_DELAY = "shutdown-delay"  # the master: --shutdown-delay before the drain
    KEEP_PREVIOUS = "keep-previous"  # per generation: the end of its parked window
    VERIFY = "verify"  # per generation: its next --verify check during the window


class TimerKey(NamedTuple):
    kind: TimerKind
    ident: int
    slot: int = 0


SHUTDOWN_DELAY_KEY = TimerKey(TimerKind.SHUTDOWN_DELAY, 0)  # the master's one


def remaining(deadlines: Mapping[TimerKey, float], key: TimerKey, now: float) -> float | None:
    """Seconds left until a carried-over deadline (0 if past); None if there is none."""
    deadline = deadlines.get(key)
    return None if deadline is None else max(0.0, deadline - now)


class Timers:
    """Deadlines keyed by TimerKey; starting a key again replaces its deadline."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimerKey]] = []
        self._deadlines: dict[TimerKey, tuple[float, int]] = {}
        self._sequence = itertools.count()

    def start(self, key: TimerKey, deadline: float) -> None:
        entry = (deadline, next(self._sequence))
        self._deadlines[key] = entry
        heapq.heappush(self._heap, (*entry, key))

    def cancel(self, key: TimerKey) -> None:
        self._deadlines.pop(key, None)

    def __contains__(self, key: TimerKey) -> bool:
        return key in self._deadlines

    def __len__(self) -> int:
        return len(self._deadlines)

    def deadline(self, key: TimerKey) -> float | None:
        entry = self._deadlines.get(key)
        return None if entry is None else entry[0]

    def deadlines(self) -> dict[TimerKey, float]:
        """Every pending deadline by key (what a re-exec carries over)."""
        return {key: deadline for key, (deadline, _) in self._deadlines.items()}

    def next_deadline(self) -> float | None:
        self._drop_cancelled()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[TimerKey]:
        """Remove and return the keys whose deadline is at or before now, earliest first."""
        due: list[TimerKey] = []
        while True:
            self._drop_cancelled()
            if not self._heap or self._heap[0][0] > now:
                return due
            _, _, key = heapq.heappop(self._heap)
            del self._deadlines[key]
            due.append(key)

    def _drop_cancelled(self) -> None:
        # An entry is stale when its key was cancelled or restarted with a newer sequence.
        while self._heap:
            deadline, sequence, key = self._heap[0]
            if self._deadlines.get(key) == (deadline, sequence):
                return
            heapq.heappop(self._heap)
