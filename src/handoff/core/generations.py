"""The generations and their workers: the generation state machine, and what worker events
mean for it.

Pure. The ``Supervisor`` owns one ``Generations``; this class makes every generation
transition (guarded, one report each) and routes worker events to the worker lifecycle,
readiness and respawn helpers. What concerns the master (a reload's result, the first
generation never becoming ready, stopping) it does not decide: it returns a ``Change``
(a starting generation is now complete, or must fail) and the ``Supervisor`` acts on it.

    STARTING -> ACTIVE      every worker ready (the Supervisor activates on ``Complete``)
    STARTING -> FAILED      a worker lost before the generation served (``Failing``)
    STARTING | ACTIVE -> DRAINING   replaced, or the master stops (or gives up: ``GivingUp``)
    DRAINING | FAILED -> GONE       every worker reaped, nothing spawning or respawning
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import assert_never

from handoff.core import actions as act
from handoff.core import events as ev
from handoff.core.model import (
    ExitStatus,
    Generation,
    GenerationState,
    GenId,
    InvalidTransition,
    Pid,
    Worker,
    WorkerState,
)
from handoff.core.policy import Policy
from handoff.core.readiness import Readiness
from handoff.core.respawn import Respawns
from handoff.core.timers import TimerKey, TimerKind
from handoff.core.worker_lifecycle import WorkerLifecycle, worker_fields
from handoff.formats.log_events import EventName, Level


@dataclass(frozen=True, slots=True)
class Complete:
    """Every worker of this starting generation is ready: it may serve."""

    gen: Generation


@dataclass(frozen=True, slots=True)
class Failing:
    """This starting generation lost a worker before it served: it fails."""

    gen: Generation
    reason: str


@dataclass(frozen=True, slots=True)
class GivingUp:
    """Every worker of this serving generation keeps crashing (--give-up-after)."""

    gen: Generation
    reason: str


Change = Complete | Failing | GivingUp | None


class Generations:
    """Every generation not yet gone, and its workers; see the module docstring."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self.by_id: dict[GenId, Generation] = {}
        self.next_id = GenId(1)
        self.readiness = Readiness(policy)
        self.respawns = Respawns(policy)
        self.workers = WorkerLifecycle(policy, self.readiness)

    def in_state(self, state: GenerationState) -> Generation | None:
        return next((g for g in self.by_id.values() if g.state is state), None)

    # -- generation transitions ---------------------------------------------------------

    def start(self, size: int, now: float, out: list[act.Action]) -> Generation:
        """A new STARTING generation, its workers asked for."""
        if self.in_state(GenerationState.STARTING) is not None:
            raise InvalidTransition("a second generation may not start while one is starting")
        gen = Generation(id=self.next_id, state=GenerationState.STARTING, size=size, started_at=now)
        self.next_id = GenId(self.next_id + 1)
        self.by_id[gen.id] = gen
        out.append(act.report(EventName.GENERATION_STARTED, gen=gen.id, workers=gen.size))
        for slot in range(gen.size):
            self.spawn(gen, slot, out)
        return gen

    def activate(
        self, gen: Generation, target: int, signal_name: str, now: float, out: list[act.Action]
    ) -> None:
        """STARTING -> ACTIVE; the generation it replaces: ACTIVE -> DRAINING."""
        _require(gen, GenerationState.STARTING)
        previous = self.in_state(GenerationState.ACTIVE)
        gen.state = GenerationState.ACTIVE
        duration = round(now - gen.started_at, 4)
        out.append(
            act.report(
                EventName.GENERATION_ACTIVE, gen=gen.id, workers=gen.size, duration_s=duration
            )
        )
        if previous is not None:
            self.drain(previous, "replaced", signal_name, out)
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

    def drain(
        self,
        gen: Generation,
        why: str,
        signal_name: str,
        out: list[act.Action],
        *,
        accept_until_signal: bool = False,
    ) -> None:
        """ACTIVE | STARTING -> DRAINING (accept_until_signal: see ``WorkerLifecycle.stop``)."""
        _require(gen, GenerationState.ACTIVE, GenerationState.STARTING)
        gen.state = GenerationState.DRAINING
        self.respawns.cancel(gen.id, out)
        out.append(
            act.report(EventName.GENERATION_DRAINING, gen=gen.id, reason=why, signal=signal_name)
        )
        for worker in gen.live_workers():
            self.workers.stop(worker, out, accept_until_signal=accept_until_signal)
        self.check_gone(gen, out)

    def check_gone(self, gen: Generation, out: list[act.Action]) -> None:
        """DRAINING | FAILED -> GONE, once nothing of it is left or coming."""
        if gen.state not in (GenerationState.DRAINING, GenerationState.FAILED):
            return
        if gen.workers or gen.spawning or self.respawns.pending(gen.id):
            return
        gen.state = GenerationState.GONE
        del self.by_id[gen.id]
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
        """A starting generation whose workers are all ready already (after a re-exec)."""
        if gen.state is GenerationState.STARTING and gen.ready_count() >= gen.size:
            return Complete(gen)
        return None

    # -- worker events ----------------------------------------------------------------

    def spawned(
        self, gen_id: GenId, slot: int, pid: Pid, now: float, out: list[act.Action]
    ) -> None:
        gen = self.by_id[gen_id]
        worker = self.workers.spawned(gen.id, slot, pid, now, out)
        gen.workers[pid] = worker
        gen.spawning.discard(slot)
        if gen.state not in (GenerationState.STARTING, GenerationState.ACTIVE):
            # The generation failed or began draining while its later workers were forked.
            self.workers.stop(worker, out)
            return
        self.readiness.watch(worker, out)

    def spawn_failed(
        self, gen_id: GenId, slot: int, reason: str, now: float, out: list[act.Action]
    ) -> Change:
        gen = self.by_id[gen_id]
        gen.spawning.discard(slot)
        out.append(
            act.report(
                EventName.WORKER_SPAWN_FAILED, Level.ERROR, gen=gen.id, worker=slot, reason=reason
            )
        )
        change = self._lost(gen, slot, None, reason=reason, now=now, out=out)
        self.check_gone(gen, out)
        return change

    def exited(self, pid: Pid, status: ExitStatus, now: float, out: list[act.Action]) -> Change:
        exited = self.workers.exited(pid, status, now, out)
        gen = self.by_id[exited.worker.gen]
        del gen.workers[pid]
        change: Change = None
        if exited.lost_reason:
            slot = exited.worker.slot
            reason = exited.lost_reason
            ready_at = exited.was_ready_at
            change = self._lost(
                gen, slot, ready_at, reason=reason, now=now, out=out, worker=exited.worker
            )
        self.check_gone(gen, out)
        return change

    def notified(self, event: ev.WorkerNotified, now: float, out: list[act.Action]) -> Change:
        worker = self.workers.get(event.pid)
        if worker is None:
            return None
        if event.status is not None:
            self.workers.note_status(worker, event.status)
        if event.ready and self.readiness.notified(worker, out):
            return self._ready(worker, "notify", now, out)
        return None

    def probe_finished(self, event: ev.ProbeFinished, now: float, out: list[act.Action]) -> Change:
        worker = self.workers.get(event.pid)
        if worker is not None and self.readiness.probe_finished(worker, event, out):
            return self._ready(worker, self._policy.ready.mode.value, now, out, event.detail)
        return None

    def on_worker_timer(self, key: TimerKey, now: float, out: list[act.Action]) -> Change:
        worker = self.workers.get(Pid(key.ident))
        if worker is None:
            return None  # the worker was reaped after this timer was popped
        policy = self._policy
        match key.kind:
            case TimerKind.READY_DELAY:
                return self._ready(worker, "delay", now, out)
            case TimerKind.PROBE_RETRY:
                self.readiness.retry(worker, out)
            case TimerKind.NOTIFY_GRACE:
                detail = f"READY=1; no process seen accepting within {policy.notify_grace_s:g} s"
                return self._ready(worker, "notify", now, out, detail)
            case TimerKind.SETTLE:
                self.workers.signal_stop(worker, out)
            case TimerKind.DRAIN:
                reason = f"still running {policy.drain_timeout_s:g} s after the stop signal"
                self.workers.kill(worker, reason, out)
            case TimerKind.READY_TIMEOUT:
                return self._ready_timeout(worker, out)
            case TimerKind.RESPAWN | TimerKind.SHUTDOWN_DELAY:
                raise InvalidTransition(f"a {key.kind} timer is not a worker's")
            case _:
                assert_never(key.kind)
        return None

    def respawn_due(self, key: TimerKey, *, stopping: bool, out: list[act.Action]) -> None:
        gen = self.by_id.get(GenId(key.ident))
        if gen is None or not self.respawns.take(key):
            return
        serving = gen.state is GenerationState.ACTIVE and not stopping
        if serving and key.slot < gen.size:
            self.spawn(gen, key.slot, out)
        else:
            self.check_gone(gen, out)

    # -- helpers ----------------------------------------------------------------------

    def spawn(self, gen: Generation, slot: int, out: list[act.Action]) -> None:
        gen.spawning.add(slot)
        out.append(act.SpawnWorker(gen=gen.id, slot=slot))

    def _ready(
        self, worker: Worker, via: str, now: float, out: list[act.Action], detail: str = ""
    ) -> Change:
        if not self.workers.ready(worker, via, now, out, detail):
            return None
        gen = self.by_id[worker.gen]
        if gen.state is GenerationState.STARTING and gen.ready_count() == gen.size:
            return Complete(gen)
        return None

    def _lost(
        self,
        gen: Generation,
        slot: int,
        ready_at: float | None,
        *,
        reason: str,
        now: float,
        out: list[act.Action],
        worker: Worker | None = None,
    ) -> Change:
        """A worker died, or never started: its starting generation fails, or it respawns."""
        match gen.state:
            case GenerationState.STARTING:
                gen.failed_by = worker
                return Failing(gen, reason)
            case GenerationState.ACTIVE:
                ready_for = None if ready_at is None else now - ready_at
                self.respawns.schedule(gen.id, slot, ready_for_s=ready_for, reason=reason, out=out)
                return self._giving_up(gen, reason)
            case GenerationState.DRAINING | GenerationState.FAILED | GenerationState.GONE:
                pass
            case _:
                assert_never(gen.state)
        return None

    def _giving_up(self, gen: Generation, reason: str) -> Change:
        limit = self._policy.give_up_after
        if not limit or gen.ready_count():
            return None
        if all(self.respawns.crashes(gen.id, slot) >= limit for slot in range(gen.size)):
            return GivingUp(gen, f"every worker crashed {limit} times in a row; last: {reason}")
        return None

    def _ready_timeout(self, worker: Worker, out: list[act.Action]) -> Change:
        if worker.state is not WorkerState.STARTING:
            return None
        gen = self.by_id[worker.gen]
        timeout = self._policy.ready_timeout_s
        reason = f"worker {worker.slot} (pid {worker.pid}) not ready after {timeout:g} s"
        reason += self.readiness.last_seen(worker)  # http: the worker's last answer
        out.append(
            act.report(
                EventName.WORKER_NOT_READY, Level.ERROR, **worker_fields(worker), reason=reason
            )
        )
        if gen.state is GenerationState.STARTING:
            gen.failed_by = worker
            return Failing(gen, reason)
        # A respawned worker of the active generation: stop it, and respawn its slot only
        # once it has exited, so that a slot never has two workers.
        self.workers.stop(worker, out, respawn_reason=reason)
        return None


def _require(gen: Generation, *allowed: GenerationState) -> None:
    if gen.state not in allowed:
        raise InvalidTransition(
            f"generation {gen.id} is {gen.state}, expected {[s.value for s in allowed]}"
        )
