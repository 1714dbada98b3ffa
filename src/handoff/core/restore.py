"""Taking over after a re-exec in place: the generations rebuilt from a snapshot and from
the children the kernel shows, and the master state that follows from them.

Pure. ``Supervisor`` calls ``restore`` once, on ``Resumed``, on a fresh ``Generations``;
every state change it makes goes through the same state machines as always (the worker
lifecycle re-arms each worker's deadlines, readiness re-watches the starting ones, a
missing slot is spawned like any other).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from handoff.core import actions as act
from handoff.core.generations import Generations
from handoff.core.model import (
    Generation,
    GenerationState,
    GenId,
    MasterState,
    Pid,
    Worker,
    WorkerState,
)
from handoff.core.snapshot import FoundWorker, GenerationRecord, MachineSnapshot, WorkerRecord
from handoff.core.timers import TimerKey, TimerKind, remaining


@dataclass(frozen=True, slots=True)
class Restored:
    """How the takeover went: children found, listed workers lost, unlisted ones adopted."""

    found: int
    lost: int
    unlisted: int


def records(gens: Generations) -> tuple[GenerationRecord, ...]:
    """Every generation and its workers, as plain data (``snapshot.MachineSnapshot``)."""
    return tuple(
        GenerationRecord(
            id=gen.id,
            state=gen.state,
            size=gen.size,
            started_at=gen.started_at,
            release_of=gen.release_of,
            canary=gen.canary,
            admitted=gen.admitted,
            workers=tuple(
                WorkerRecord(
                    pid=w.pid,
                    slot=w.slot,
                    state=w.state,
                    started_at=w.started_at,
                    ready_at=w.ready_at,
                    status=w.status,
                    respawn_reason=w.respawn_reason,
                )
                for w in gen.live_workers()
            ),
        )
        for gen in gens.by_id.values()
    )


def restore(
    gens: Generations,
    snapshot: MachineSnapshot,
    found: Sequence[FoundWorker],
    now: float,
    out: list[act.Action],
) -> Restored:
    """Rebuild the generations from a snapshot, keeping only the workers found alive.

    A worker the snapshot lists but the kernel does not was reaped before its exit was
    handled: its slot is filled again. A child found but not listed (forked just before
    the state was written) joins its generation if that one serves or starts and its slot
    is free; otherwise it is drained.
    """
    alive = {worker.pid for worker in found}
    listed: set[Pid] = set()
    lost = 0
    for record in snapshot.generations:
        if record.state is GenerationState.GONE:
            continue
        gen = Generation(
            id=record.id,
            state=record.state,
            size=record.size,
            started_at=record.started_at,
            release_of=record.release_of,
            canary=record.canary,
            admitted=record.admitted,
        )
        gens.by_id[gen.id] = gen
        for w in record.workers:
            if w.pid not in alive:
                lost += 1
                continue
            listed.add(w.pid)
            gen.workers[w.pid] = Worker(
                gen=gen.id,
                slot=w.slot,
                pid=w.pid,
                state=w.state,
                started_at=w.started_at,
                ready_at=w.ready_at,
                status=w.status,
                respawn_reason=w.respawn_reason,
            )
    unlisted = [worker for worker in found if worker.pid not in listed]
    for child in unlisted:
        gen = gens.by_id.setdefault(
            child.gen,
            Generation(id=child.gen, state=GenerationState.DRAINING, size=0, started_at=now),
        )
        gen.workers[child.pid] = Worker(
            gen=gen.id, slot=child.slot, pid=child.pid, state=WorkerState.STARTING, started_at=now
        )
    gens.next_id = GenId(max([snapshot.next_gen, *(gen + 1 for gen in gens.by_id)]))
    for gen in list(gens.by_id.values()):
        _resume(gens, gen, snapshot.deadlines, now, out)
    return Restored(found=len(found), lost=lost, unlisted=len(unlisted))


def master_state(
    was: MasterState, *, active: Generation | None, starting: Generation | None
) -> MasterState:
    """The master's state after the takeover: what it was, unless the generations say
    otherwise (a crash may have come between a generation's change and the master's)."""
    if was is MasterState.STOPPING:
        return was
    if was is MasterState.LEAVING:
        return was if active is not None else MasterState.STOPPING
    if active is None:
        return MasterState.STARTING
    return MasterState.RUNNING if starting is None else MasterState.RELOADING


def _resume(
    gens: Generations,
    gen: Generation,
    deadlines: Mapping[TimerKey, float],
    now: float,
    out: list[act.Action],
) -> None:
    serving = gen.state in (GenerationState.STARTING, GenerationState.ACTIVE)
    filled: set[int] = set()  # slots that have (or will get back) their one worker
    for worker in sorted(gen.live_workers(), key=lambda w: w.started_at):
        gens.workers.resume(worker, deadlines, now, out)
        extra = worker.slot in filled or worker.slot >= gen.size
        if not worker.state.stopping or worker.respawn_reason:
            filled.add(worker.slot)
        if not serving or extra:
            gens.workers.stop(worker, out)  # only acts on a starting or ready worker
        elif worker.state is WorkerState.STARTING:
            gens.readiness.rewatch(worker, deadlines, now, out)
    if gen.state is GenerationState.ACTIVE:
        for key in deadlines:
            if key.kind is TimerKind.RESPAWN and key.ident == gen.id and key.slot not in filled:
                filled.add(key.slot)
                delay = remaining(deadlines, key, now) or 0.0
                gens.respawns.restore(gen.id, key.slot, delay, out)
    if serving:
        for slot in range(gen.size if gen.admitted is None else gen.admitted):
            if slot not in filled:
                gens.spawn(gen, slot, out)
    gens.check_gone(gen, out)
