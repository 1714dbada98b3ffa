"""The supervisor's functional core: ``Supervisor.handle(event, now) -> actions``.

Pure: no syscalls, no clock, no logging. It is the only code that changes the records in
``model.py``. Every transition is guarded (an impossible one raises ``InvalidTransition``,
which is a bug) and reported with exactly one ``Report``. Which timers and probes prove a
worker ready is ``readiness.py``'s to decide, when a lost worker's slot is respawned is
``respawn.py``'s; the settings and their arithmetic are ``policy.py``'s.

Master:     STARTING -> RUNNING <-> RELOADING;  any -> STOPPING -> exit.
Generation: STARTING -> ACTIVE | FAILED | DRAINING (a stop);  ACTIVE -> DRAINING;
            DRAINING | FAILED -> GONE (every worker reaped).
Worker:     see ``model.WorkerState``: STARTING -> READY; -> SETTLING -> SIGNALLED;
            -> KILLED; -> EXITED.
Invariants: at most one STARTING and one ACTIVE generation; the stop signal reaches a
worker at most once; a worker is forgotten exactly once, when its exit is reported.
"""

from __future__ import annotations

from typing import assert_never

from handoff.core import actions as act
from handoff.core import events as ev
from handoff.core.model import (
    ExitStatus,
    Generation,
    GenerationState,
    GenId,
    MasterState,
    Pid,
    Worker,
    WorkerState,
)
from handoff.core.policy import Policy, ReloadOutcome
from handoff.core.readiness import Readiness
from handoff.core.respawn import Respawns
from handoff.core.timers import TimerKey, TimerKind
from handoff.errors import EXIT_NEVER_READY, EXIT_OK
from handoff.formats.log_events import EventName, Level
from handoff.formats.options import MAX_WORKERS, MIN_WORKERS


class InvalidTransition(AssertionError):
    """A state change the state machines forbid: always a bug in handoff."""


def _report(event: EventName, level: Level = Level.INFO, /, **fields: object) -> act.Report:
    """A ``Report``, written like the ``logs.emit`` call the loop turns it into."""
    return act.Report(event=event, level=level, fields=fields)


def _worker_fields(worker: Worker) -> dict[str, object]:
    """The fields that name a worker in every ``worker.*`` report about it."""
    return {"gen": worker.gen, "worker": worker.slot, "pid": worker.pid}


class Supervisor:
    """Decides what to do next from what happened; see the module docstring."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.state = MasterState.STARTING
        self.generations: dict[GenId, Generation] = {}
        self.last_reload: ReloadOutcome | None = None
        self.workers_target = policy.workers  # per generation; scale changes it
        self._workers: dict[Pid, Worker] = {}
        self._next_gen = 1
        self._reload_pending = False
        self._reload_started_at = 0.0
        self._readiness = Readiness(policy)
        self._respawns = Respawns(policy)
        self._fast_stop = False
        self._exit: act.Exit | None = None
        self._exited = False

    # -- views (read by the loop, the control server, status and the systemd glue) ------

    def generation_in(self, state: GenerationState) -> Generation | None:
        return next((g for g in self.generations.values() if g.state is state), None)

    def generation(self, gen: GenId) -> Generation | None:
        return self.generations.get(gen)

    def worker(self, pid: Pid) -> Worker | None:
        return self._workers.get(pid)

    def reloading(self) -> GenId | None:
        """The generation the reload in progress is starting, if one is."""
        starting = self.generation_in(GenerationState.STARTING)
        return starting.id if self.state is MasterState.RELOADING and starting else None

    # -- dispatch ----------------------------------------------------------------------

    def handle(self, event: ev.Event, now: float) -> list[act.Action]:
        out: list[act.Action] = []
        match event:
            case ev.Started():
                self._require_master(MasterState.STARTING)
                self._start_generation(now, out)
            case ev.ReloadRequested(source=source):
                self._on_reload_requested(source, now, out)
            case ev.StopRequested(fast=fast, source=source):
                self._on_stop_requested(fast, source, now, out)
            case ev.ScaleRequested(source=source, workers=workers, delta=delta):
                self._on_scale(source, workers, delta, out)
            case ev.ForwardRequested(signal=sig):
                out.extend(act.SendSignal(pid=pid, signal=sig) for pid in self._workers)
                out.append(_report(EventName.SIGNAL_FORWARDED, signal=sig.name))
            case ev.WorkerSpawned(gen=gen_id, slot=slot, pid=pid):
                self._on_spawned(self.generations[gen_id], slot, pid, now, out)
            case ev.SpawnFailed(gen=gen_id, slot=slot, reason=reason):
                self._on_spawn_failed(self.generations[gen_id], slot, reason, now, out)
            case ev.ChildExited(pid=pid, status=status):
                self._on_exited(pid, status, now, out)
            case ev.WorkerNotified():
                self._on_notified(event, now, out)
            case ev.ProbeFinished(pid=pid, ok=ok, detail=detail):
                self._on_probe_finished(pid, ok, detail, now, out)
            case ev.TimerFired(key=key):
                self._on_timer(key, now, out)
            case _:
                assert_never(event)
        self._check_exit(out)
        return out

    # -- generations -------------------------------------------------------------------

    def _start_generation(self, now: float, out: list[act.Action]) -> None:
        if self.generation_in(GenerationState.STARTING) is not None:
            raise InvalidTransition("a second generation may not start while one is starting")
        gen = Generation(
            id=GenId(self._next_gen),
            state=GenerationState.STARTING,
            size=self.workers_target,
            started_at=now,
        )
        self._next_gen += 1
        self.generations[gen.id] = gen
        out.append(_report(EventName.GENERATION_STARTED, gen=gen.id, workers=gen.size))
        for slot in range(gen.size):
            self._spawn(gen, slot, out)

    def _activate(self, gen: Generation, now: float, out: list[act.Action]) -> None:
        # STARTING -> ACTIVE; the generation it replaces: ACTIVE -> DRAINING.
        self._require_gen(gen, GenerationState.STARTING)
        previous = self.generation_in(GenerationState.ACTIVE)
        gen.state = GenerationState.ACTIVE
        duration = round(now - gen.started_at, 4)
        out.append(
            _report(EventName.GENERATION_ACTIVE, gen=gen.id, workers=gen.size, duration_s=duration)
        )
        if previous is not None:
            self._drain(previous, "replaced", out)
        if gen.size != self.workers_target:
            self._resize(gen, out)  # scaled while it was starting
        if self.state is MasterState.STARTING:
            self.state = MasterState.RUNNING
            out.append(_report(EventName.MASTER_READY, gen=gen.id))
            self._run_pending_reload(now, out)
        elif self.state is MasterState.RELOADING:
            self._finish_reload(gen, ok=True, reason="", now=now, out=out)

    def _on_scale(
        self, source: str, workers: int | None, delta: int, out: list[act.Action]
    ) -> None:
        if self.state is MasterState.STOPPING:
            out.append(
                _report(EventName.SCALE_REFUSED, Level.WARNING, source=source, reason="stopping")
            )
            return
        was = self.workers_target
        wanted = workers if workers is not None else was + delta
        self.workers_target = max(MIN_WORKERS, min(MAX_WORKERS, wanted))
        out.append(
            _report(EventName.MASTER_SCALED, workers=self.workers_target, was=was, source=source)
        )
        active = self.generation_in(GenerationState.ACTIVE)
        if active is not None:
            self._resize(active, out)

    def _resize(self, gen: Generation, out: list[act.Action]) -> None:
        """Bring a serving generation to workers_target: spawn new slots, retire the highest."""
        old, new = gen.size, self.workers_target
        gen.size = new
        out.append(_report(EventName.GENERATION_RESIZED, gen=gen.id, workers=new, was=old))
        for slot in range(old, new):
            if slot not in gen.spawning:
                self._spawn(gen, slot, out)
        self._respawns.cancel(gen.id, out, from_slot=new)
        for worker in gen.live_workers():
            if worker.slot >= new:
                self._stop_worker(worker, out)  # drained like an old worker, not respawned

    def _fail(self, gen: Generation, reason: str, now: float, out: list[act.Action]) -> None:
        # STARTING -> FAILED: its workers are stopped like old ones (they may hold connections).
        self._require_gen(gen, GenerationState.STARTING)
        gen.state = GenerationState.FAILED
        out.append(_report(EventName.GENERATION_FAILED, Level.ERROR, gen=gen.id, reason=reason))
        for worker in gen.live_workers():
            self._stop_worker(worker, out)
        if self.state is MasterState.STARTING:
            out.append(_report(EventName.MASTER_NEVER_READY, Level.ERROR, reason=reason))
            self._begin_stop(fast=False, now=now, out=out, code=EXIT_NEVER_READY, reason=reason)
        elif self.state is MasterState.RELOADING:
            self._finish_reload(gen, ok=False, reason=reason, now=now, out=out)
        self._check_gone(gen, out)

    def _drain(self, gen: Generation, why: str, out: list[act.Action]) -> None:
        # ACTIVE | STARTING -> DRAINING.
        self._require_gen(gen, GenerationState.ACTIVE, GenerationState.STARTING)
        gen.state = GenerationState.DRAINING
        self._respawns.cancel(gen.id, out)
        signal_name = "SIGKILL" if self._fast_stop else self.policy.stop_signal.name
        out.append(
            _report(EventName.GENERATION_DRAINING, gen=gen.id, reason=why, signal=signal_name)
        )
        for worker in gen.live_workers():
            self._stop_worker(worker, out)
        self._check_gone(gen, out)

    def _check_gone(self, gen: Generation, out: list[act.Action]) -> None:
        # DRAINING | FAILED -> GONE, once nothing of it is left or coming.
        if gen.state not in (GenerationState.DRAINING, GenerationState.FAILED):
            return
        if gen.workers or gen.spawning or self._respawns.pending(gen.id):
            return
        gen.state = GenerationState.GONE
        del self.generations[gen.id]
        self._respawns.forget(gen.id)
        out.append(_report(EventName.GENERATION_GONE, gen=gen.id))

    # -- reloads and stops -------------------------------------------------------------

    def _on_reload_requested(self, source: str, now: float, out: list[act.Action]) -> None:
        match self.state:
            case MasterState.RUNNING:
                self.state = MasterState.RELOADING
                self._reload_started_at = now
                out.append(_report(EventName.RELOAD_REQUESTED, source=source, gen=self._next_gen))
                self._start_generation(now, out)
            case MasterState.STARTING | MasterState.RELOADING:
                # Requests during a start coalesce: one pending reload, run when it ends.
                already = self._reload_pending
                self._reload_pending = True
                out.append(_report(EventName.RELOAD_QUEUED, source=source, coalesced=already))
            case MasterState.STOPPING:
                out.append(
                    _report(
                        EventName.RELOAD_REFUSED, Level.WARNING, source=source, reason="stopping"
                    )
                )
            case _:
                assert_never(self.state)

    def _finish_reload(
        self, gen: Generation, *, ok: bool, reason: str, now: float, out: list[act.Action]
    ) -> None:
        self._require_master(MasterState.RELOADING)
        self.state = MasterState.RUNNING
        duration = round(now - self._reload_started_at, 4)
        self.last_reload = ReloadOutcome(gen=gen.id, ok=ok, reason=reason, duration_s=duration)
        if ok:
            out.append(_report(EventName.RELOAD_SUCCEEDED, gen=gen.id, duration_s=duration))
        else:
            out.append(
                _report(
                    EventName.RELOAD_FAILED,
                    Level.ERROR,
                    gen=gen.id,
                    reason=reason,
                    duration_s=duration,
                )
            )
        self._run_pending_reload(now, out)

    def _run_pending_reload(self, now: float, out: list[act.Action]) -> None:
        if self._reload_pending and self.state is MasterState.RUNNING:
            self._reload_pending = False
            self._on_reload_requested("queued", now, out)

    def _on_stop_requested(
        self, fast: bool, source: str, now: float, out: list[act.Action]
    ) -> None:
        if self.state is MasterState.STOPPING:
            # A second Ctrl-C (or QUIT) means: stop waiting for the drain.
            if (fast or source == "SIGINT") and not self._fast_stop:
                self._fast_stop = True
                out.append(_report(EventName.MASTER_STOPPING, fast=True, source=source))
                for worker in self._workers.values():
                    self._kill_worker(worker, "fast stop", out)
            return
        self._begin_stop(
            fast=fast, now=now, out=out, code=EXIT_OK, reason=f"stop requested ({source})"
        )

    def _begin_stop(
        self, *, fast: bool, now: float, out: list[act.Action], code: int, reason: str
    ) -> None:
        # any -> STOPPING; a reload in progress ends as failed ("cancelled").
        self._reload_pending = False  # before _finish_reload, which would start it
        starting = self.generation_in(GenerationState.STARTING)
        if self.state is MasterState.RELOADING and starting is not None:
            self._finish_reload(
                starting, ok=False, reason="cancelled: master stopping", now=now, out=out
            )
        self.state = MasterState.STOPPING
        self._fast_stop = fast
        self._exit = act.Exit(code=code, reason=reason)
        out.append(_report(EventName.MASTER_STOPPING, fast=fast, reason=reason))
        for gen in list(self.generations.values()):
            if gen.state in (GenerationState.ACTIVE, GenerationState.STARTING):
                self._drain(gen, "stopping", out)
        if fast:
            for worker in self._workers.values():
                self._kill_worker(worker, "fast stop", out)

    def _check_exit(self, out: list[act.Action]) -> None:
        if self.state is MasterState.STOPPING and not self.generations and not self._exited:
            assert self._exit is not None
            self._exited = True
            out.append(self._exit)

    # -- workers -----------------------------------------------------------------------

    def _spawn(self, gen: Generation, slot: int, out: list[act.Action]) -> None:
        gen.spawning.add(slot)
        out.append(act.SpawnWorker(gen=gen.id, slot=slot))

    def _on_spawned(
        self, gen: Generation, slot: int, pid: Pid, now: float, out: list[act.Action]
    ) -> None:
        worker = Worker(gen=gen.id, slot=slot, pid=pid, state=WorkerState.STARTING, started_at=now)
        self._workers[pid] = worker
        gen.workers[pid] = worker
        gen.spawning.discard(slot)
        out.append(_report(EventName.WORKER_SPAWNED, **_worker_fields(worker)))
        if gen.state not in (GenerationState.STARTING, GenerationState.ACTIVE):
            # The generation failed or began draining while its later workers were forked.
            self._stop_worker(worker, out)
            return
        self._readiness.watch(worker, out)

    def _on_spawn_failed(
        self, gen: Generation, slot: int, reason: str, now: float, out: list[act.Action]
    ) -> None:
        gen.spawning.discard(slot)
        out.append(
            _report(
                EventName.WORKER_SPAWN_FAILED, Level.ERROR, gen=gen.id, worker=slot, reason=reason
            )
        )
        self._on_worker_lost(gen, slot, ready_at=None, reason=reason, now=now, out=out)
        self._check_gone(gen, out)

    def _on_ready(
        self, worker: Worker, via: str, now: float, out: list[act.Action], detail: str = ""
    ) -> None:
        # STARTING -> READY; the generation's last one makes it ACTIVE.
        if worker.state is not WorkerState.STARTING:
            return  # a repeated READY=1, or readiness of a worker already told to stop
        worker.state = WorkerState.READY
        worker.ready_at = now
        self._readiness.forget(worker, out)
        gen = self.generations[worker.gen]
        duration = round(now - worker.started_at, 4)
        fields = {**_worker_fields(worker), "via": via, "duration_s": duration}
        if detail:
            fields["detail"] = detail
        out.append(_report(EventName.WORKER_READY, **fields))
        if gen.state is GenerationState.STARTING and gen.ready_count() == gen.size:
            self._activate(gen, now, out)

    def _on_exited(self, pid: Pid, status: ExitStatus, now: float, out: list[act.Action]) -> None:
        # any live state -> EXITED; the worker is forgotten here and only here.
        worker = self._workers.pop(pid, None)
        if worker is None:
            raise InvalidTransition(f"pid {pid} reported exited but is not a live worker")
        was = worker.state
        worker.state = WorkerState.EXITED
        self._readiness.forget(worker, out)
        out.append(act.CancelTimer(key=TimerKey(TimerKind.DRAIN, pid)))
        if self.policy.settle_s > 0:
            out.append(act.CancelTimer(key=TimerKey(TimerKind.SETTLE, pid)))
        gen = self.generations[worker.gen]
        del gen.workers[pid]
        expected = was.stopping and not worker.respawn_reason
        description = status.describe(killed_by_us=was is WorkerState.KILLED)
        out.append(
            _report(
                EventName.WORKER_EXITED,
                Level.INFO if expected else Level.WARNING,
                **_worker_fields(worker),
                status=description,
                expected=expected,
                uptime_s=round(now - worker.started_at, 4),
                **status.as_fields(),
            )
        )
        if worker.respawn_reason:
            reason = worker.respawn_reason
            self._on_worker_lost(gen, worker.slot, ready_at=None, reason=reason, now=now, out=out)
        elif not expected:
            ready = "after it was ready" if was is WorkerState.READY else "before it was ready"
            reason = f"worker {worker.slot} (pid {pid}) {description} {ready}"
            self._on_worker_lost(
                gen, worker.slot, ready_at=worker.ready_at, reason=reason, now=now, out=out
            )
        self._check_gone(gen, out)

    def _on_worker_lost(
        self,
        gen: Generation,
        slot: int,
        *,
        ready_at: float | None,
        reason: str,
        now: float,
        out: list[act.Action],
    ) -> None:
        """A worker died, or never started: its starting generation fails, or it respawns."""
        match gen.state:
            case GenerationState.STARTING:
                self._fail(gen, reason, now, out)
            case GenerationState.ACTIVE:
                ready_for = None if ready_at is None else now - ready_at
                self._respawns.schedule(gen.id, slot, ready_for_s=ready_for, reason=reason, out=out)
            case GenerationState.DRAINING | GenerationState.FAILED | GenerationState.GONE:
                pass
            case _:
                assert_never(gen.state)

    def _stop_worker(self, worker: Worker, out: list[act.Action]) -> None:
        # STARTING | READY -> SETTLING: first stop it accepting (from outside), then, after
        # the settle, signal it.
        if worker.state not in (WorkerState.STARTING, WorkerState.READY):
            return
        worker.state = WorkerState.SETTLING
        self._readiness.forget(worker, out)
        out.append(act.DetachListeners(pid=worker.pid))
        if self.policy.settle_s > 0:
            key = TimerKey(TimerKind.SETTLE, worker.pid)
            out.append(act.StartTimer(key=key, delay_s=self.policy.settle_s))
        else:
            self._signal_stop(worker, out)

    def _signal_stop(self, worker: Worker, out: list[act.Action]) -> None:
        # SETTLING -> SIGNALLED: the stop signal, exactly once, and the drain deadline.
        if worker.state is not WorkerState.SETTLING:
            return
        worker.state = WorkerState.SIGNALLED
        out.append(act.SendSignal(pid=worker.pid, signal=self.policy.stop_signal))
        key = TimerKey(TimerKind.DRAIN, worker.pid)
        out.append(act.StartTimer(key=key, delay_s=self.policy.drain_timeout_s))

    def _kill_worker(self, worker: Worker, reason: str, out: list[act.Action]) -> None:
        # any live state -> KILLED (drain timeout, or a fast stop).
        if worker.state in (WorkerState.KILLED, WorkerState.EXITED):
            return
        worker.state = WorkerState.KILLED
        self._readiness.forget(worker, out)
        out.append(act.KillTree(pid=worker.pid))
        out.append(
            _report(EventName.WORKER_KILLED, Level.WARNING, **_worker_fields(worker), reason=reason)
        )

    # -- readiness and timers ----------------------------------------------------------

    def _on_notified(self, event: ev.WorkerNotified, now: float, out: list[act.Action]) -> None:
        worker = self._workers.get(event.pid)
        if worker is None:
            return
        if event.status is not None:
            worker.status = event.status
        if event.ready and self._readiness.notified(worker, out):
            self._on_ready(worker, "notify", now, out)

    def _on_probe_finished(
        self, pid: Pid, ok: bool, detail: str, now: float, out: list[act.Action]
    ) -> None:
        worker = self._workers.get(pid)
        if worker is not None and self._readiness.probe_finished(worker, ok, detail, out):
            self._on_ready(worker, self.policy.ready.mode.value, now, out, detail)

    def _on_timer(self, key: TimerKey, now: float, out: list[act.Action]) -> None:
        if key.kind is TimerKind.RESPAWN:
            self._on_respawn_due(key, out)
            return
        worker = self._workers.get(Pid(key.ident))
        if worker is None:
            return  # the worker was reaped after this timer was popped
        match key.kind:
            case TimerKind.READY_DELAY:
                self._on_ready(worker, "delay", now, out)
            case TimerKind.PROBE_RETRY:
                self._readiness.retry(worker, out)
            case TimerKind.NOTIFY_GRACE:
                grace = self.policy.notify_grace_s
                detail = f"READY=1; no process seen accepting within {grace:g} s"
                self._on_ready(worker, "notify", now, out, detail)
            case TimerKind.SETTLE:
                self._signal_stop(worker, out)
            case TimerKind.DRAIN:
                timeout = self.policy.drain_timeout_s
                reason = f"still running {timeout:g} s after the stop signal"
                self._kill_worker(worker, reason, out)
            case TimerKind.READY_TIMEOUT:
                self._on_ready_timeout(worker, now, out)
            case TimerKind.RESPAWN:
                raise InvalidTransition("respawn timers are handled above")
            case _:
                assert_never(key.kind)

    def _on_respawn_due(self, key: TimerKey, out: list[act.Action]) -> None:
        gen = self.generations.get(GenId(key.ident))
        if gen is None or not self._respawns.take(key):
            return
        serving = gen.state is GenerationState.ACTIVE and self.state is not MasterState.STOPPING
        if serving and key.slot < gen.size:
            self._spawn(gen, key.slot, out)
        else:
            self._check_gone(gen, out)

    def _on_ready_timeout(self, worker: Worker, now: float, out: list[act.Action]) -> None:
        if worker.state is not WorkerState.STARTING:
            return
        gen = self.generations[worker.gen]
        timeout = self.policy.ready_timeout_s
        reason = f"worker {worker.slot} (pid {worker.pid}) not ready after {timeout:g} s"
        out.append(
            _report(
                EventName.WORKER_NOT_READY, Level.ERROR, **_worker_fields(worker), reason=reason
            )
        )
        if gen.state is GenerationState.STARTING:
            self._fail(gen, reason, now, out)
        else:
            # A respawned worker of the active generation: stop it, and respawn its slot
            # only once it has exited, so that a slot never has two workers.
            worker.respawn_reason = reason
            self._stop_worker(worker, out)

    # -- guards ------------------------------------------------------------------------

    def _require_master(self, *allowed: MasterState) -> None:
        if self.state not in allowed:
            raise InvalidTransition(
                f"master is {self.state}, expected one of {[s.value for s in allowed]}"
            )

    @staticmethod
    def _require_gen(gen: Generation, *allowed: GenerationState) -> None:
        if gen.state not in allowed:
            raise InvalidTransition(
                f"generation {gen.id} is {gen.state}, expected {[s.value for s in allowed]}"
            )
