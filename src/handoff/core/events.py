"""Inputs to the state machine: things that happened.

Pure. The loop turns signals, pidfd readiness, notify datagrams and expired
timers into these; unit tests write them by hand.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from handoff.core.model import ExitStatus, GenId, Pid
from handoff.core.snapshot import FoundWorker, MachineSnapshot
from handoff.core.timers import TimerKey


@dataclass(frozen=True, slots=True, kw_only=True)
class Started:
    """The master has its sockets and loop; start the first generation."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Resumed:
    """The master re-executed itself in place (same pid): take over from the snapshot,
    keeping only the workers the kernel still shows (found)."""

    snapshot: MachineSnapshot
    found: tuple[FoundWorker, ...]
    reason: str  # why it re-executed: "crash" or "upgrade"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReloadRequested:
    source: str
    canary: int = 0  # reload --canary K: K new workers beside the old ones, until a promote


@dataclass(frozen=True, slots=True, kw_only=True)
class PromoteRequested:
    """Turn the canary into the reload (handoff promote)."""

    source: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StopRequested:
    fast: bool
    source: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ScaleRequested:
    """Set the workers per generation (workers), or change it by delta (TTIN/TTOU)."""

    source: str
    workers: int | None = None
    delta: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardRequested:
    """A signal the master passes on to every live worker (USR1: reopen logs)."""

    signal: signal.Signals


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSpawned:
    gen: GenId
    slot: int
    pid: Pid


@dataclass(frozen=True, slots=True, kw_only=True)
class SpawnFailed:
    gen: GenId
    slot: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildExited:
    pid: Pid
    status: ExitStatus


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerNotified:
    """A worker (or a process in its tree) sent sd_notify fields."""

    pid: Pid  # the worker whose tree the sender is in
    ready: bool = False
    status: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeFinished:
    """A readiness probe of a worker finished: ok means the worker is ready."""

    pid: Pid
    ok: bool
    detail: str = ""
    # http: only. asked: this was an HTTP try (past the /proc scan), retried on the slower
    # http backoff; answer: the worker's own answer ("HTTP 503 Service Unavailable").
    asked: bool = False
    answer: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class RollbackRequested:
    """Put the previous generation back (handoff rollback)."""

    source: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DetachFailed:
    """Detaching a worker left a registration of a listening socket in place (or found
    none: a server in blocking accept): it still accepts, so it cannot be parked."""

    pid: Pid
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ReattachFailed:
    """A parked worker's registrations could not all be put back: it does not accept."""

    pid: Pid
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyFinished:
    """One --verify check of a generation finished."""

    gen: GenId
    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TimerFired:
    key: TimerKey


Event = (
    Started
    | Resumed
    | ReloadRequested
    | PromoteRequested
    | StopRequested
    | ScaleRequested
    | ForwardRequested
    | WorkerSpawned
    | SpawnFailed
    | ChildExited
    | WorkerNotified
    | ProbeFinished
    | RollbackRequested
    | DetachFailed
    | ReattachFailed
    | VerifyFinished
    | TimerFired
)
