"""Records of the supervision state: workers, generations, exit statuses.

The records are mutable, but only the core's state machines change them (workers:
``worker_lifecycle.py``; generations: ``generations.py``; the master: ``machine.py``);
everything else reads them (the loop for process titles, the control server for
progress and status, the systemd glue for STATUS=).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NewType

Pid = NewType("Pid", int)
GenId = NewType("GenId", int)


class InvalidTransition(AssertionError):
    """A state change the state machines forbid: always a bug in handoff."""


class MasterState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    RELOADING = "reloading"
    LEAVING = "leaving"  # --shutdown-delay: a stop was asked, the workers still serve
    STOPPING = "stopping"


class GenerationState(StrEnum):
    STARTING = "starting"
    ACTIVE = "active"
    PARKED = "parked"  # --keep-previous: replaced, off the socket, kept for a rollback
    FAILED = "failed"
    DRAINING = "draining"
    GONE = "gone"


class WorkerState(StrEnum):
    """A worker's life; the three stopping phases come in this order (KILLED may cut in).

    STARTING -> READY;  STARTING | READY -> SETTLING -> SIGNALLED;
    READY -> PARKED -> READY (a rollback) | SIGNALLED (the window ends);
    any live state -> KILLED;  any live state -> EXITED (reaped).
    """

    STARTING = "starting"  # spawned, proving it is ready
    READY = "ready"
    PARKED = "parked"  # taken off the listening socket, kept (--keep-previous): no signal
    SETTLING = "settling"  # taken off the listening socket; stop signal after --settle
    SIGNALLED = "signalled"  # stop signal sent once; draining until --drain-timeout
    KILLED = "killed"  # its process tree was SIGKILLed
    EXITED = "exited"  # reaped

    @property
    def stopping(self) -> bool:
        """In one of the stopping phases (what ``handoff status`` calls "stopping")."""
        return self in _STOPPING_PHASES


_STOPPING_PHASES = frozenset({WorkerState.SETTLING, WorkerState.SIGNALLED, WorkerState.KILLED})


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How a process ended: an exit code, or the signal that killed it."""

    code: int | None = None
    signal: int | None = None

    @property
    def success(self) -> bool:
        return self.code == 0

    def describe(self, *, killed_by_us: bool = False) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            oom = self.signal == signal.SIGKILL and not killed_by_us
            hint = " (out of memory?)" if oom else ""
            return f"killed by {name}{hint}"
        if self.code == 127:
            return "exited 127 (command not found?)"
        if self.code == 126:
            return "exited 126 (command not executable?)"
        return f"exited {self.code}"

    def as_fields(self) -> dict[str, object]:
        if self.signal is not None:
            try:
                return {"signal": signal.Signals(self.signal).name}
            except ValueError:
                return {"signal": self.signal}
        return {"exit_code": self.code}


@dataclass(slots=True, kw_only=True)
class Worker:
    """One worker process (a respawn is a new Worker in the same slot)."""

    gen: GenId
    slot: int
    pid: Pid
    state: WorkerState
    started_at: float
    ready_at: float | None = None
    status: str = ""  # the last STATUS= it sent over the notify socket
    # Why its slot must be respawned once it has exited (it was stopped for not becoming
    # ready in time); empty for a worker stopped because it is no longer wanted.
    respawn_reason: str = ""


@dataclass(slots=True, kw_only=True)
class Generation:
    """The workers started from one reading of the command."""

    id: GenId
    state: GenerationState
    size: int
    started_at: float
    workers: dict[Pid, Worker] = field(default_factory=dict)  # every worker not yet reaped
    spawning: set[int] = field(default_factory=set)  # slots asked to spawn, no answer yet
    failed_by: Worker | None = None  # the worker whose exit or ready timeout failed it
    parked_until: float | None = None  # PARKED: when the --keep-previous window ends
    # A rollback's restart: the generation whose release (directory, env files) it runs.
    release_of: GenId | None = None
    # reload --canary: its workers serve beside the active generation until a promote.
    canary: bool = False
    # --rollout: the slots asked for so far, batch by batch (None: every slot at once).
    admitted: int | None = None

    def live_workers(self) -> list[Worker]:
        return list(self.workers.values())

    def ready_count(self) -> int:
        return sum(1 for w in self.workers.values() if w.state is WorkerState.READY)
