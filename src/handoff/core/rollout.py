"""Progressive reloads: ``--rollout BATCH`` (the new generation replaces the old one BATCH
workers at a time) and ``reload --canary K`` (K new workers serve beside the old
generation until ``promote`` or ``rollback``).

Pure. Functions of the ``Supervisor``, written out of its class (which stays small); they
are its own. What a rollout has done is read from the generations themselves, so that it
survives a re-exec: the new generation's ``admitted`` slots (``Generation.admitted``), and
the old generation's workers taken off (parked, or stopping).

A rollout, after each batch of the new generation is ready:

1. takes as many old workers off the socket (the highest slots first): parked with
   --keep-previous, else drained;
2. asks for the next batch once the drained ones have exited (a parked one holds its
   memory for the window: with --keep-previous the next batch comes at once), so that
   without --keep-previous no more than workers + BATCH workers are alive;
3. after the last batch the new generation is complete and activated as by any reload.

A batch that fails (a worker lost or not ready in time) fails the reload, and ``undo``
puts the old generation back whole: its parked workers are put back on the socket, the
slots of the drained ones are started again from its own release. A rollback during a
rollout or a canary is the same undo.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from handoff.core import actions as act
from handoff.core.model import GenerationState, MasterState, WorkerState
from handoff.formats.log_events import EventName

if TYPE_CHECKING:
    from handoff.core.machine import Supervisor


def batch_size(self: Supervisor, workers: int) -> int:
    """--rollout's batch for a generation of this many workers (0: no rollout)."""
    count, percent = self.policy.rollout_count, self.policy.rollout_percent
    if percent:
        return max(1, min(workers, math.ceil(workers * percent / 100)))
    return min(workers, count) if count else 0


def start(self: Supervisor, canary: int, now: float, out: list[act.Action]) -> None:
    """The reload's new generation: all its workers at once, its first batch, or a canary."""
    target = self.workers_target
    if canary:
        self._gens.start(min(canary, target), now, out, canary=True)
        return
    batch = batch_size(self, target)
    first = batch if 0 < batch < target else None
    self._gens.start(target, now, out, first=first)


def reload_refusal(self: Supervisor, canary: int) -> str | None:
    """Why a reload asked while one is in progress is refused, rather than queued."""
    starting = self.generation_in(GenerationState.STARTING)
    if starting is not None and starting.canary:
        return "a canary is waiting: 'handoff promote' or 'handoff rollback' first"
    if canary:
        return "a reload is in progress: a canary starts beside a generation serving alone"
    return None


def step(self: Supervisor, out: list[act.Action]) -> None:
    """After every event: move a rollout in progress on, if its batch is ready."""
    new = self.generation_in(GenerationState.STARTING)
    old = self.generation_in(GenerationState.ACTIVE)
    if new is None or old is None or new.canary or new.admitted is None:
        return
    if new.ready_count() < new.admitted or new.admitted >= new.size:
        return  # the batch is not ready yet; or the last one is asked for
    keep = self.policy.keep_previous_s > 0
    ready = (w for w in old.live_workers() if w.state is WorkerState.READY)
    serving = sorted(ready, key=lambda w: w.slot, reverse=True)
    excess = len(serving) - max(0, old.size - new.admitted)
    for worker in serving[: max(0, excess)]:
        if not (keep and self._gens.workers.park(worker, out)):
            self._gens.workers.stop(worker, out)
    if any(w.state.stopping for w in old.live_workers()):
        return  # the next batch once these have exited: memory stays bounded
    first, new.admitted = new.admitted, min(new.size, new.admitted + batch_size(self, new.size))
    out.append(
        act.report(
            EventName.ROLLOUT_BATCH, gen=new.id, slots=f"{first}-{new.admitted - 1}", of=new.size
        )
    )
    for slot in range(first, new.admitted):
        self._gens.spawn(new, slot, out)


def promote(self: Supervisor, source: str, out: list[act.Action]) -> str | None:
    """The canary becomes the reload: the rest of its workers (in --rollout batches, if
    set) are started; once all are ready it replaces the old generation. Why not, if not."""
    canary = self.generation_in(GenerationState.STARTING)
    if canary is None or not canary.canary:
        return "no canary to promote: start one with 'handoff reload --canary K'"
    canary.canary = False
    target = self.workers_target
    batch = batch_size(self, target)
    was = canary.size
    canary.size = target
    canary.admitted = min(target, was + batch) if 0 < batch < target - was else None
    out.append(act.report(EventName.CANARY_PROMOTED, gen=canary.id, source=source, workers=target))
    for slot in range(was, canary.size if canary.admitted is None else canary.admitted):
        if slot not in canary.spawning:
            self._gens.spawn(canary, slot, out)
    return None


def undo(self: Supervisor, out: list[act.Action]) -> None:
    """The reload failed or was rolled back: the active generation whole again."""
    old = self.generation_in(GenerationState.ACTIVE)
    if old is None or self.state is not MasterState.RUNNING:
        return
    restored = sum(self._gens.put_back(old, out))
    if restored:
        out.append(act.report(EventName.GENERATION_RESTORED, gen=old.id, workers=restored))
