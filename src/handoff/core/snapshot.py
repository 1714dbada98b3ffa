"""The supervisor's state as plain data, to carry across the master's re-exec in place.

Pure. ``Supervisor.snapshot`` writes one, the master passes it to the code it execs (as
JSON in a memfd: master/resume_state.py), and ``Supervisor.resume`` rebuilds the machine
from it *and* from what the kernel shows: the children that are really there
(``FoundWorker``, read from /proc by the new master). The snapshot adds what the kernel
cannot show (states, deadlines, the reload in progress); the kernel decides which workers
exist. Without a snapshot (the failing code could not write one),
``snapshot_from_children`` builds one from the children alone.

Deadlines are absolute ``CLOCK_MONOTONIC`` seconds, which ``execve`` keeps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Final, TypeVar

from handoff.core.model import GenerationState, GenId, MasterState, Pid, WorkerState
from handoff.core.timers import TimerKey, TimerKind

FORMAT: Final = 1
_MAX_ITEMS: Final = 100_000  # generations, workers or timers: far beyond MAX_WORKERS
_E = TypeVar("_E", MasterState, GenerationState, WorkerState, TimerKind)


class SnapshotError(ValueError):
    """A snapshot that does not describe a state this code can resume."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FoundWorker:
    """A live child of the master that the kernel shows as a worker (its environment)."""

    pid: Pid
    gen: GenId
    slot: int


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerRecord:
    pid: Pid
    slot: int
    state: WorkerState
    started_at: float
    ready_at: float | None = None
    status: str = ""
    respawn_reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRecord:
    id: GenId
    state: GenerationState
    size: int
    started_at: float
    workers: tuple[WorkerRecord, ...] = ()
    release_of: GenId | None = None  # a rollback's restart: whose release it runs
    canary: bool = False
    admitted: int | None = None  # --rollout: the slots asked for so far


@dataclass(frozen=True, slots=True, kw_only=True)
class ReloadRecord:
    gen: GenId
    ok: bool
    reason: str
    duration_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class MachineSnapshot:
    state: MasterState
    workers_target: int
    next_gen: GenId
    generations: tuple[GenerationRecord, ...] = ()
    deadlines: Mapping[TimerKey, float] = field(default_factory=dict)
    reload_pending: bool = False
    reload_started_at: float = 0.0
    fast_stop: bool = False
    exit_code: int | None = None
    exit_reason: str = ""
    last_reload: ReloadRecord | None = None
    previous_release: GenId | None = None  # what a rollback's restart would run

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["format"] = FORMAT
        data["deadlines"] = [
            [key.kind.value, key.ident, key.slot, deadline]
            for key, deadline in self.deadlines.items()
        ]
        return data

    @classmethod
    def from_dict(cls, data: object) -> MachineSnapshot:
        """Validate and rebuild; raise SnapshotError naming what is wrong."""
        d = _mapping(data, "snapshot")
        if d.get("format") != FORMAT:
            raise SnapshotError(f"snapshot format {d.get('format')!r}, expected {FORMAT}")
        last = d.get("last_reload")
        return cls(
            state=_enum(MasterState, d.get("state"), "state"),
            workers_target=_int(d.get("workers_target"), "workers_target"),
            next_gen=GenId(_int(d.get("next_gen"), "next_gen")),
            generations=tuple(_generation(g) for g in _list(d.get("generations"), "generations")),
            deadlines=dict(_deadline(item) for item in _list(d.get("deadlines"), "deadlines")),
            reload_pending=_bool(d.get("reload_pending"), "reload_pending"),
            reload_started_at=_float(d.get("reload_started_at"), "reload_started_at"),
            fast_stop=_bool(d.get("fast_stop"), "fast_stop"),
            exit_code=None if d.get("exit_code") is None else _int(d["exit_code"], "exit_code"),
            exit_reason=_str(d.get("exit_reason"), "exit_reason"),
            last_reload=None if last is None else _reload(last),
            previous_release=_optional_gen(d.get("previous_release"), "previous_release"),
        )


def snapshot_from_children(found: Sequence[FoundWorker], workers_target: int) -> MachineSnapshot:
    """What the kernel alone says: the newest generation found serves, older ones drain.

    Each worker is taken as ready: a worker that was still starting when the state was
    lost is one the old master had not yet put in service, but the kernel cannot tell
    which, and stopping a serving generation would be the outage this exists to avoid.
    """
    by_gen: dict[GenId, list[FoundWorker]] = {}
    for worker in found:
        by_gen.setdefault(worker.gen, []).append(worker)
    newest = max(by_gen, default=GenId(0))
    generations = tuple(
        GenerationRecord(
            id=gen,
            state=GenerationState.ACTIVE if gen == newest else GenerationState.DRAINING,
            size=max(len(workers), 1) if gen != newest else max(w.slot for w in workers) + 1,
            started_at=0.0,
            workers=tuple(
                WorkerRecord(pid=w.pid, slot=w.slot, state=WorkerState.READY, started_at=0.0)
                for w in workers
            ),
        )
        for gen, workers in sorted(by_gen.items())
    )
    return MachineSnapshot(
        state=MasterState.RUNNING if by_gen else MasterState.STARTING,
        workers_target=workers_target,
        next_gen=GenId(newest + 1),
        generations=generations,
    )


# -- validation helpers ---------------------------------------------------------------


def _generation(data: object) -> GenerationRecord:
    d = _mapping(data, "generation")
    return GenerationRecord(
        id=GenId(_int(d.get("id"), "generation id")),
        state=_enum(GenerationState, d.get("state"), "generation state"),
        size=_int(d.get("size"), "generation size"),
        started_at=_float(d.get("started_at"), "started_at"),
        workers=tuple(_worker(w) for w in _list(d.get("workers"), "workers")),
        release_of=_optional_gen(d.get("release_of"), "release_of"),
        canary=_bool(d.get("canary", False), "canary"),
        admitted=None if d.get("admitted") is None else _int(d.get("admitted"), "admitted"),
    )


def _optional_gen(value: object, what: str) -> GenId | None:
    return None if value is None else GenId(_int(value, what))


def _worker(data: object) -> WorkerRecord:
    d = _mapping(data, "worker")
    ready_at = d.get("ready_at")
    return WorkerRecord(
        pid=Pid(_int(d.get("pid"), "worker pid")),
        slot=_int(d.get("slot"), "worker slot"),
        state=_enum(WorkerState, d.get("state"), "worker state"),
        started_at=_float(d.get("started_at"), "started_at"),
        ready_at=None if ready_at is None else _float(ready_at, "ready_at"),
        status=_str(d.get("status"), "status"),
        respawn_reason=_str(d.get("respawn_reason"), "respawn_reason"),
    )


def _reload(data: object) -> ReloadRecord:
    d = _mapping(data, "last_reload")
    return ReloadRecord(
        gen=GenId(_int(d.get("gen"), "last_reload gen")),
        ok=_bool(d.get("ok"), "last_reload ok"),
        reason=_str(d.get("reason"), "last_reload reason"),
        duration_s=_float(d.get("duration_s"), "last_reload duration_s"),
    )


def _deadline(data: object) -> tuple[TimerKey, float]:
    items = _list(data, "deadline")
    if len(items) != 4:
        raise SnapshotError("a deadline is [kind, ident, slot, seconds]")
    kind = _enum(TimerKind, items[0], "timer kind")
    return TimerKey(kind, _int(items[1], "timer ident"), _int(items[2], "timer slot")), _float(
        items[3], "deadline"
    )


def _mapping(value: object, what: str) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise SnapshotError(f"{what} is not an object")
    return value


def _list(value: object, what: str) -> list[object]:
    if not isinstance(value, list) or len(value) > _MAX_ITEMS:
        raise SnapshotError(f"{what} is not a list (of at most {_MAX_ITEMS})")
    return value


def _int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 62:
        raise SnapshotError(f"{what} is not a whole number")
    return value


def _float(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SnapshotError(f"{what} is not a number")
    return float(value)


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise SnapshotError(f"{what} is not true or false")
    return value


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise SnapshotError(f"{what} is not a string")
    return value


def _enum(kind: type[_E], value: object, what: str) -> _E:
    unknown = SnapshotError(f"{what} {value!r} is unknown")
    if not isinstance(value, str):
        raise unknown
    try:
        return kind(value)
    except ValueError:
        raise unknown from None
