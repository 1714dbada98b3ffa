"""Outputs of the state machine: things the loop must do.

Pure. Each is executed by ``master/loop.py`` against the real system, or recorded by
the unit tests' fake system.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

from handoff.core.model import GenId, Pid
from handoff.core.timers import TimerKey
from handoff.formats.log_events import EventName, Level


@dataclass(frozen=True, slots=True, kw_only=True)
class SpawnWorker:
    """Fork and exec one worker; the loop answers with WorkerSpawned or SpawnFailed."""

    gen: GenId
    slot: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SendSignal:
    """Signal the worker; rescue (--rescue-keepalive, an old worker's stop signal while
    another generation serves): copy its connections first (master/rescue.py)."""

    pid: Pid
    signal: signal.Signals
    rescue: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class DetachListeners:
    """Remove the worker tree's epoll registrations of the listening sockets (stop accepting)."""

    pid: Pid


@dataclass(frozen=True, slots=True, kw_only=True)
class ReattachListeners:
    """Put back the registrations detaching removed from a parked worker (it accepts again);
    the loop answers with ReattachFailed if one cannot be put back."""

    pid: Pid


@dataclass(frozen=True, slots=True, kw_only=True)
class RunVerify:
    """One --verify check of the serving generation; the loop answers with VerifyFinished."""

    gen: GenId


@dataclass(frozen=True, slots=True, kw_only=True)
class StopTakingConnections:
    """The master stops: its own listeners start no new connection; what is queued stays
    for the workers still on them (their detach waits for their stop signal)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseListeners:
    """The master stops and no worker accepts any more: close the listeners it alone holds
    (not those systemd holds too), so that a new connection is refused, not left waiting."""


@dataclass(frozen=True, slots=True, kw_only=True)
class KillTree:
    """SIGKILL the worker's process group, then any descendant that left the group."""

    pid: Pid


@dataclass(frozen=True, slots=True, kw_only=True)
class StartTimer:
    key: TimerKey
    delay_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelTimer:
    key: TimerKey


@dataclass(frozen=True, slots=True, kw_only=True)
class RunProbe:
    """Start one readiness probe of the worker (exec: runs the command, auto scans /proc)."""

    pid: Pid
    gen: GenId
    slot: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelProbe:
    pid: Pid


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """A log event with a stable dotted name (catalogued in docs/events.md)."""

    event: EventName
    level: Level = Level.INFO
    fields: dict[str, object] = field(default_factory=dict)


def report(event: EventName, level: Level = Level.INFO, /, **fields: object) -> Report:
    """A ``Report``, written like the ``logs.emit`` call the loop turns it into."""
    return Report(event=event, level=level, fields=fields)


@dataclass(frozen=True, slots=True, kw_only=True)
class Exit:
    code: int
    reason: str = ""


Action = (
    SpawnWorker
    | SendSignal
    | DetachListeners
    | ReattachListeners
    | RunVerify
    | StopTakingConnections
    | CloseListeners
    | KillTree
    | StartTimer
    | CancelTimer
    | RunProbe
    | CancelProbe
    | Report
    | Exit
)
