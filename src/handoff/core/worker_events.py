"""What a worker event means for its generation: spawned, exited, notified, probed, timed
out. The other half of ``generations.py``.

Pure. The ``Supervisor`` routes every worker event here; ``WorkerEvents`` makes the worker
transitions through ``WorkerLifecycle`` and the generation ones through ``Generations``,
and returns a ``Change`` (a starting generation is complete or fails, a serving one lost
a worker or gives up) for the Supervisor to act on.
"""

from __future__ import annotations

from typing import assert_never

from handoff.core import actions as act
from handoff.core import events as ev
from handoff.core.changes import Change, Crashed, Failing, GivingUp
from handoff.core.generations import Generations
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
from handoff.core.timers import TimerKey, TimerKind
from handoff.core.worker_lifecycle import worker_fields
from handoff.formats.log_events import EventName, Level


class WorkerEvents:
    """Worker events, routed to the worker and generation state machines."""

    def __init__(self, policy: Policy, gens: Generations) -> None:
        self._policy = policy
        self._gens = gens

    def spawned(
        self, gen_id: GenId, slot: int, pid: Pid, now: float, out: list[act.Action]
    ) -> None:
        gen = self._gens.by_id[gen_id]
        worker = self._gens.workers.spawned(gen.id, slot, pid, now, out)
        gen.workers[pid] = worker
        gen.spawning.discard(slot)
        if gen.state not in (GenerationState.STARTING, GenerationState.ACTIVE):
            # The generation failed or began draining while its later workers were forked.
            self._gens.workers.stop(worker, out)
            return
        self._gens.readiness.watch(worker, out)

    def spawn_failed(
        self, gen_id: GenId, slot: int, reason: str, now: float, out: list[act.Action]
    ) -> Change:
        gen = self._gens.by_id[gen_id]
        gen.spawning.discard(slot)
        out.append(
            act.report(
                EventName.WORKER_SPAWN_FAILED, Level.ERROR, gen=gen.id, worker=slot, reason=reason
            )
        )
        change = self._lost(gen, slot, None, reason=reason, now=now, out=out)
        self._gens.check_gone(gen, out)
        return change

    def exited(self, pid: Pid, status: ExitStatus, now: float, out: list[act.Action]) -> Change:
        exited = self._gens.workers.exited(pid, status, now, out)
        gen = self._gens.by_id[exited.worker.gen]
        del gen.workers[pid]
        change: Change = None
        if exited.lost_reason:
            slot = exited.worker.slot
            reason = exited.lost_reason
            ready_at = exited.was_ready_at
            change = self._lost(
                gen, slot, ready_at, reason=reason, now=now, out=out, worker=exited.worker
            )
        self._gens.check_gone(gen, out)
        return change

    def notified(self, event: ev.WorkerNotified, now: float, out: list[act.Action]) -> Change:
        worker = self._gens.workers.get(event.pid)
        if worker is None:
            return None
        if event.status is not None:
            self._gens.workers.note_status(worker, event.status)
        if event.ready and self._gens.readiness.notified(worker, out):
            return self._ready(worker, "notify", now, out)
        return None

    def probe_finished(self, event: ev.ProbeFinished, now: float, out: list[act.Action]) -> Change:
        worker = self._gens.workers.get(event.pid)
        if worker is not None and self._gens.readiness.probe_finished(worker, event, out):
            return self._ready(worker, self._policy.ready.mode.value, now, out, event.detail)
        return None

    def on_worker_timer(self, key: TimerKey, now: float, out: list[act.Action]) -> Change:
        worker = self._gens.workers.get(Pid(key.ident))
        if worker is None:
            return None  # the worker was reaped after this timer was popped
        policy = self._policy
        match key.kind:
            case TimerKind.READY_DELAY:
                return self._ready(worker, "delay", now, out)
            case TimerKind.PROBE_RETRY:
                self._gens.readiness.retry(worker, out)
            case TimerKind.NOTIFY_GRACE:
                detail = f"READY=1; no process seen accepting within {policy.notify_grace_s:g} s"
                return self._ready(worker, "notify", now, out, detail)
            case TimerKind.SETTLE:
                self._gens.workers.signal_stop(worker, out)
            case TimerKind.DRAIN:
                reason = f"still running {policy.drain_timeout_s:g} s after the stop signal"
                self._gens.workers.kill(worker, reason, out)
            case TimerKind.READY_TIMEOUT:
                return self._ready_timeout(worker, out)
            case (
                TimerKind.RESPAWN
                | TimerKind.SHUTDOWN_DELAY
                | TimerKind.KEEP_PREVIOUS
                | TimerKind.VERIFY
            ):
                raise InvalidTransition(f"a {key.kind} timer is not a worker's")
            case _:
                assert_never(key.kind)
        return None

    def respawn_due(self, key: TimerKey, *, stopping: bool, out: list[act.Action]) -> None:
        gen = self._gens.by_id.get(GenId(key.ident))
        if gen is None or not self._gens.respawns.take(key):
            return
        serving = gen.state is GenerationState.ACTIVE and not stopping
        if serving and key.slot < gen.size:
            self._gens.spawn(gen, key.slot, out)
        else:
            self._gens.check_gone(gen, out)

    def _ready(
        self, worker: Worker, via: str, now: float, out: list[act.Action], detail: str = ""
    ) -> Change:
        if not self._gens.workers.ready(worker, via, now, out, detail):
            return None
        return self._gens.complete(self._gens.by_id[worker.gen])

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
                self._gens.respawns.schedule(
                    gen.id, slot, ready_for_s=ready_for, reason=reason, out=out
                )
                return self._giving_up(gen, reason) or Crashed(gen, reason)
            case (
                GenerationState.DRAINING
                | GenerationState.FAILED
                | GenerationState.GONE
                | GenerationState.PARKED
            ):
                pass
            case _:
                assert_never(gen.state)
        return None

    def _giving_up(self, gen: Generation, reason: str) -> Change:
        limit = self._policy.give_up_after
        if not limit or gen.ready_count():
            return None
        if all(self._gens.respawns.crashes(gen.id, slot) >= limit for slot in range(gen.size)):
            return GivingUp(gen, f"every worker crashed {limit} times in a row; last: {reason}")
        return None

    def _ready_timeout(self, worker: Worker, out: list[act.Action]) -> Change:
        if worker.state is not WorkerState.STARTING:
            return None
        gen = self._gens.by_id[worker.gen]
        timeout = self._policy.ready_timeout_s
        reason = f"worker {worker.slot} (pid {worker.pid}) not ready after {timeout:g} s"
        reason += self._gens.readiness.last_seen(worker)  # http: the worker's last answer
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
        self._gens.workers.stop(worker, out, respawn_reason=reason)
        return None
