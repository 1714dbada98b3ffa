"""Measuring one load run: the exact maximum latency, and its counters sampled over time."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from handoff.demo.load import LoadStats

SAMPLE_S: Final = 0.05


class MaxLatency:
    """The exact largest latency of the successful requests of tracked LoadStats.

    LoadStats samples latencies (10,000 of them): a stall's few slow requests, and so the
    maximum, can fall out of the sample. While installed, LoadStats.record_ok is wrapped
    to see every latency; only the stats passed to track() are followed (and kept alive,
    so that no other object can reuse their id).
    """

    def __init__(self) -> None:
        self._maxima: dict[int, float | None] = {}
        self._tracked: list[LoadStats] = []

    def track(self, stats: LoadStats) -> None:
        self._tracked.append(stats)
        self._maxima[id(stats)] = None

    def of(self, stats: LoadStats) -> float | None:
        return self._maxima.get(id(stats))

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        original = LoadStats.record_ok
        maxima = self._maxima

        def record_ok(
            stats: LoadStats, *, fresh: bool, latency_ms: float, generation: str | None
        ) -> None:
            key = id(stats)
            if key in maxima:
                current = maxima[key]
                if current is None or latency_ms > current:
                    maxima[key] = latency_ms
            original(stats, fresh=fresh, latency_ms=latency_ms, generation=generation)

        LoadStats.record_ok = record_ok  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            LoadStats.record_ok = original  # type: ignore[method-assign]


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # time.monotonic()
    ok: int
    failures: int
    answered: dict[str, int]  # successful responses by version (or generation) header


@dataclass(frozen=True, slots=True)
class Window:
    ok: int
    failures: int
    answered: dict[str, int]  # responses by header value within the window


class Timeline:
    """The live counters of one load run, sampled every SAMPLE_S."""

    def __init__(self, stats: LoadStats) -> None:
        self.stats = stats
        self.samples: list[Sample] = []

    def sample(self, at: float | None = None) -> None:
        self.samples.append(
            Sample(
                at=time.monotonic() if at is None else at,
                ok=self.stats.ok,
                failures=self.stats.total_failures(),
                answered=dict(self.stats.by_generation),
            )
        )

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_S)

    def finish(self) -> None:
        """Take the last sample, as of the end of the load (the counters are final)."""
        self.sample(self.stats.stopped_at)

    def window(self, start: float, end: float) -> Window:
        """What happened between start and end (only what surely happened inside)."""
        first = next((s for s in self.samples if s.at >= start), None)
        last = next((s for s in reversed(self.samples) if s.at <= end), None)
        if first is None or last is None or last.at <= first.at:
            return Window(0, 0, {})
        answered = {
            key: count - first.answered.get(key, 0)
            for key, count in last.answered.items()
            if count > first.answered.get(key, 0)
        }
        return Window(last.ok - first.ok, last.failures - first.failures, answered)

    def longest_gap_s(self) -> float | None:
        """The longest time without a new successful response (to +-SAMPLE_S)."""
        if not self.samples:
            return None
        last_rise, last_ok, longest = self.samples[0].at, self.samples[0].ok, 0.0
        for sample in self.samples[1:]:
            if sample.ok > last_ok:
                longest = max(longest, sample.at - last_rise)
                last_rise, last_ok = sample.at, sample.ok
        return max(longest, self.samples[-1].at - last_rise)
