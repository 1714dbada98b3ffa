"""The supervisor's fixed settings and the arithmetic it applies to them.

Pure. ``Policy`` is what the machine reads from the run configuration (and its
tunables: respawn and probe backoff, crash-loop threshold); ``ReloadOutcome`` is what it
remembers of the last reload; ``backoff`` spaces respawns and probe retries.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from handoff.core.model import GenId
from handoff.formats.options import DEFAULT_SETTLE_S, ReadySpec, RunConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    workers: int
    ready: ReadySpec
    ready_timeout_s: float
    drain_timeout_s: float
    stop_signal: signal.Signals
    # --shutdown-delay: after a stop request, the workers go on serving this long (the
    # master is LEAVING: not ready) before the drain. 0: drain at once.
    shutdown_delay_s: float = 0.0
    respawn_base_s: float = 0.1
    respawn_cap_s: float = 30.0
    crash_loop_after: int = 5
    # --give-up-after: stop (exit 4) once every worker of the serving generation has
    # crashed this many times in a row and none serves. 0: respawn for ever.
    give_up_after: int = 0
    # --keep-previous: a replaced generation is parked (off the socket, not signalled)
    # this long, for a rollback. 0: drained at once.
    keep_previous_s: float = 0.0
    # --verify: seconds between checks of the new generation during the window (0: none);
    # --rollback-after: failed checks in a row, or crashes, that roll back by themselves.
    verify_interval_s: float = 0.0
    rollback_after: int = 3
    verify_timeout_s: float = 10.0  # a check still running this long counts as failed
    # --rollout: the new generation's workers come BATCH at a time (a count, or a
    # percentage of the workers); 0 and 0: all at once.
    rollout_count: int = 0
    rollout_percent: int = 0
    # A worker that was ready this long before dying starts a fresh backoff; one that
    # dies sooner (even after becoming ready) counts as one more crash in a row.
    stable_after_s: float = 10.0
    probe_base_s: float = 0.05  # exec: probes: 0.05 s doubling to 1 s
    probe_cap_s: float = 1.0
    # auto: a /proc scan of a small tree costs about 0.3 ms, and every millisecond between a
    # worker accepting and it being seen is added to the reload: 5 ms doubling to 50 ms.
    scan_base_s: float = 0.005
    scan_cap_s: float = 0.05
    # http: each try is a short probe process (about 0.05 s of CPU): 0.05 s doubling to
    # 0.5 s, so a worker that turns healthy is seen within half a second.
    http_base_s: float = 0.05
    http_cap_s: float = 0.5
    # auto: after READY=1, how long /proc may take to show a process accepting before
    # READY=1 is taken on its own word (a server that accepts in a way /proc cannot show).
    notify_grace_s: float = 2.0
    # Between removing an old worker's listening registration and its stop signal: time
    # for connections it accepted just before to be read. 0: signal at once.
    settle_s: float = DEFAULT_SETTLE_S
    # --rescue-keepalive: an old worker's connections are copied before its stop signal
    # (not when the master stops: no generation would take them).
    rescue_keepalive: bool = False

    @classmethod
    def from_config(cls, config: RunConfig) -> Policy:
        """The machine's settings from ``handoff run``'s options (the rest keep defaults)."""
        return cls(
            workers=config.workers,
            ready=config.ready,
            ready_timeout_s=config.timeouts.ready_s,
            drain_timeout_s=config.timeouts.drain_s,
            stop_signal=config.stop_signal,
            settle_s=config.timeouts.settle_s,
            shutdown_delay_s=config.timeouts.shutdown_delay_s,
            give_up_after=config.give_up_after,
            keep_previous_s=config.rollback.keep_previous_s,
            verify_interval_s=config.rollback.verify_interval_s if config.rollback.verify else 0,
            rollback_after=config.rollback.rollback_after,
            rollout_count=config.rollback.rollout.count,
            rollout_percent=config.rollback.rollout.percent,
            rescue_keepalive=config.rescue.enabled,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ReloadOutcome:
    gen: GenId
    ok: bool
    reason: str
    duration_s: float


def backoff(attempt: int, base_s: float, cap_s: float) -> float:
    """Capped exponential backoff: base, 2*base, 4*base, ... never above cap.

    The exponent is bounded: a worker retried for hours must not overflow a float.
    """
    return min(cap_s, base_s * 2.0 ** min(max(0, attempt - 1), 64))
