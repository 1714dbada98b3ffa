"""The generations and their workers: the generation state machine.

Pure. The ``Supervisor`` owns one ``Generations``; this class makes every generation
transition (guarded, one report each) and owns the worker lifecycle, readiness and
respawn helpers. What a worker event means for its generation is ``worker_events.py``;
what concerns the master (a reload's result, the first generation never becoming ready,
stopping, a rollback) it does not decide: the ``Supervisor`` acts on a ``Change``.

    STARTING -> ACTIVE      every worker ready (the Supervisor activates on ``Complete``)
    STARTING -> FAILED      a worker lost before the generation served (``Failing``)
    STARTING | ACTIVE -> DRAINING   replaced, or the master stops (or gives up: ``GivingUp``)
    ACTIVE -> PARKED        replaced, kept off the socket for --keep-previous (``park``)
    PARKED -> ACTIVE        a rollback puts it back (``reinstate``)
    PARKED -> DRAINING      its window ended, or the master stops
    DRAINING | FAILED | PARKED -> GONE   every worker reaped, nothing spawning or respawning
"""

from __future__ import annotations

from handoff.core import actions as act
from handoff.core.changes import CanaryReady, Change, Complete
from handoff.core.model import (
    Generation,
    GenerationState,
    GenId,
    InvalidTransition,
    WorkerState,
)
from handoff.core.policy import Policy
from handoff.core.readiness import Readiness
from handoff.core.respawn import Respawns
from handoff.core.timers import TimerKey, TimerKind
from handoff.core.worker_lifecycle import WorkerLifecycle
from handoff.formats.log_events import EventName, Level


class Generations:
    """Every generation not yet gone, and its workers; see the module docstring."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self.by_id: dict[GenId, Generation] = {}
        self.next_id = GenId(1)
        # The generation the serving one replaced: whose release a rollback restarts once
        # nothing is parked (None: no reload succeeded yet, or it was rolled back to).
        self.previous_release: GenId | None = None
        self.readiness = Readiness(policy)
        self.respawns = Respawns(policy)
        self.workers = WorkerLifecycle(policy, self.readiness)

    def in_state(self, state: GenerationState) -> Generation | None:
        return next((g for g in self.by_id.values() if g.state is state), None)

    # -- generation transitions ---------------------------------------------------------

    def start(
        self,
        size: int,
        now: float,
        out: list[act.Action],
        *,
        release_of: GenId | None = None,
        first: int | None = None,
        canary: bool = False,
    ) -> Generation:
        """A new STARTING generation, its workers asked for (release_of: a rollback's restart
        of that generation's release; first: only so many slots for now, a --rollout;
        canary: a reload --canary of size workers)."""
        if self.in_state(GenerationState.STARTING) is not None:
            raise InvalidTransition("a second generation may not start while one is starting")
        gen = Generation(
            id=self.next_id,
            state=GenerationState.STARTING,
            size=size,
            started_at=now,
            release_of=release_of,
            canary=canary,
            admitted=first,
        )
        self.next_id = GenId(self.next_id + 1)
        self.by_id[gen.id] = gen
        fields: dict[str, object] = {"gen": gen.id, "workers": gen.size}
        if canary:
            fields["canary"] = True
        if first is not None:
            fields["batch"] = first
        out.append(act.report(EventName.GENERATION_STARTED, **fields))
        for slot in range(gen.size if first is None else first):
            self.spawn(gen, slot, out)
        return gen

    def activate(
        self,
        gen: Generation,
        target: int,
        signal_name: str,
        now: float,
        out: list[act.Action],
        *,
        park_s: float = 0.0,
    ) -> None:
        """STARTING -> ACTIVE; the generation it replaces: ACTIVE -> DRAINING, or PARKED
        for park_s (a generation parked before is drained: one is kept, the last)."""
        _require(gen, GenerationState.STARTING)
        previous = self.in_state(GenerationState.ACTIVE)
        gen.state = GenerationState.ACTIVE
        gen.admitted = None  # a --rollout's batches are done
        duration = round(now - gen.started_at, 4)
        out.append(
            act.report(
                EventName.GENERATION_ACTIVE, gen=gen.id, workers=gen.size, duration_s=duration
            )
        )
        parked = self.in_state(GenerationState.PARKED)
        if parked is not None:
            self.drain(parked, "superseded", signal_name, out)
        if previous is not None:  # a rollback's restart leaves nothing to roll back to
            self.previous_release = None if gen.release_of is not None else previous.id
        if previous is not None and park_s > 0 and gen.release_of is None:
            self.park(previous, park_s, now, out)
        elif previous is not None:
            self.drain(previous, "rolled back" if gen.release_of else "replaced", signal_name, out)
        if gen.size != target:
            self.resize(gen, target, out)  # scaled while it was starting

    def fail(self, gen: Generation, reason: str, out: list[act.Action]) -> None:
        """STARTING -> FAILED: its workers are stopped like old ones (they may hold
        connections). The caller calls ``check_gone`` once it has acted on the failure."""
        _require(gen, GenerationState.STARTING)
        gen.state = GenerationState.FAILED
        # The worker whose exit or timeout failed it (none: a spawn failed), named so that
        # the loop can attach that worker's last output lines to the reload's result.
        culprit = gen.failed_by
        named = {} if culprit is None else {"worker": culprit.slot, "pid": culprit.pid}
        out.append(
            act.report(EventName.GENERATION_FAILED, Level.ERROR, gen=gen.id, **named, reason=reason)
        )
        for worker in gen.live_workers():
            self.workers.stop(worker, out)

    def park(self, gen: Generation, keep_s: float, now: float, out: list[act.Action]) -> None:
        """ACTIVE -> PARKED: its ready workers off the socket, unsignalled, for keep_s; the
        others (a respawn still starting) are stopped as old workers are."""
        _require(gen, GenerationState.ACTIVE)
        gen.state = GenerationState.PARKED
        gen.parked_until = now + keep_s
        self.respawns.cancel(gen.id, out)
        # Some may be parked already: taken off one by one by a --rollout.
        parked = [
            w
            for w in gen.live_workers()
            if w.state is WorkerState.PARKED or self.workers.park(w, out)
        ]
        for worker in gen.live_workers():
            if worker.state is not WorkerState.PARKED:  # a respawn still starting
                self.workers.stop(worker, out)
        out.append(act.StartTimer(key=TimerKey(TimerKind.KEEP_PREVIOUS, gen.id), delay_s=keep_s))
        out.append(
            act.report(EventName.GENERATION_PARKED, gen=gen.id, workers=len(parked), keep_s=keep_s)
        )
        self.check_gone(gen, out)

    def reinstate(self, gen: Generation, target: int, out: list[act.Action]) -> None:
        """PARKED -> ACTIVE (a rollback): its parked workers put back on the socket, its
        empty slots spawned, its size brought to target."""
        _require(gen, GenerationState.PARKED)
        gen.state = GenerationState.ACTIVE
        gen.parked_until = None
        out.append(act.CancelTimer(key=TimerKey(TimerKind.KEEP_PREVIOUS, gen.id)))
        unparked, _ = self.put_back(gen, out)
        out.append(act.report(EventName.GENERATION_RESTORED, gen=gen.id, workers=unparked))
        if gen.size != target:
            self.resize(gen, target, out)

    def put_back(self, gen: Generation, out: list[act.Action]) -> tuple[int, int]:
        """Its parked workers back on the socket, then a new worker in every slot that has
        none (ready, starting, being spawned or waiting for its respawn): a rollback, or a
        --rollout undone. How many were (put back, started)."""
        parked = [w for w in gen.live_workers() if w.state is WorkerState.PARKED]
        for worker in parked:
            self.workers.unpark(worker, out)
        on = (WorkerState.READY, WorkerState.STARTING)
        filled = {w.slot for w in gen.live_workers() if w.state in on} | gen.spawning
        empty = [
            slot
            for slot in range(gen.size)
            if slot not in filled and not self.respawns.waiting(gen.id, slot)
        ]
        for slot in empty:
            self.spawn(gen, slot, out)
        return len(parked), len(empty)

    def drain(
        self,
        gen: Generation,
        why: str,
        signal_name: str,
        out: list[act.Action],
        *,
        accept_until_signal: bool = False,
    ) -> None:
        """ACTIVE | STARTING | PARKED -> DRAINING (accept_until_signal: see
        ``WorkerLifecycle.stop``)."""
        _require(gen, GenerationState.ACTIVE, GenerationState.STARTING, GenerationState.PARKED)
        if gen.state is GenerationState.PARKED:
            out.append(act.CancelTimer(key=TimerKey(TimerKind.KEEP_PREVIOUS, gen.id)))
            gen.parked_until = None
        gen.state = GenerationState.DRAINING
        self.respawns.cancel(gen.id, out)
        out.append(
            act.report(EventName.GENERATION_DRAINING, gen=gen.id, reason=why, signal=signal_name)
        )
        for worker in gen.live_workers():
            self.workers.stop(worker, out, accept_until_signal=accept_until_signal)
        self.check_gone(gen, out)

    def check_gone(self, gen: Generation, out: list[act.Action]) -> None:
        """DRAINING | FAILED | PARKED -> GONE, once nothing of it is left or coming."""
        if gen.state not in (
            GenerationState.DRAINING,
            GenerationState.FAILED,
            GenerationState.PARKED,
        ):
            return
        if gen.workers or gen.spawning or self.respawns.pending(gen.id):
            return
        gen.state = GenerationState.GONE
        del self.by_id[gen.id]
        gen.parked_until = None
        self.respawns.forget(gen.id)
        out.append(act.report(EventName.GENERATION_GONE, gen=gen.id))

    def resize(self, gen: Generation, target: int, out: list[act.Action]) -> None:
        """Bring a serving generation to target: spawn new slots, retire the highest."""
        old = gen.size
        gen.size = target
        out.append(act.report(EventName.GENERATION_RESIZED, gen=gen.id, workers=target, was=old))
        for slot in range(old, target):
            if slot not in gen.spawning:
                self.spawn(gen, slot, out)
        self.respawns.cancel(gen.id, out, from_slot=target)
        for worker in gen.live_workers():
            if worker.slot >= target:
                self.workers.stop(worker, out)  # drained like an old worker, not respawned

    def complete(self, gen: Generation) -> Change:
        """Are all the workers of this starting generation ready (a canary: every one of it)?"""
        if gen.state is GenerationState.STARTING and gen.ready_count() >= gen.size:
            return CanaryReady(gen) if gen.canary else Complete(gen)
        return None

    # -- helpers ----------------------------------------------------------------------

    def spawn(self, gen: Generation, slot: int, out: list[act.Action]) -> None:
        gen.spawning.add(slot)
        out.append(act.SpawnWorker(gen=gen.id, slot=slot))


def _require(gen: Generation, *allowed: GenerationState) -> None:
    if gen.state not in allowed:
        raise InvalidTransition(
            f"generation {gen.id} is {gen.state}, expected {[s.value for s in allowed]}"
        )
