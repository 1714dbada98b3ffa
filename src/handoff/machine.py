"""The supervisor's functional core: ``Supervisor.handle(event, now) -> actions``.

Layer 0 (pure): no syscalls, no clock, no logging. It is the only module that changes the
records in ``model.py``. Every transition is guarded (an impossible one raises
``InvalidTransition``, which is a bug) and reported with exactly one ``Report``.

Generation: STARTING -> ACTIVE | FAILED;  ACTIVE -> DRAINING -> GONE;  FAILED -> GONE.
Master:     STARTING -> RUNNING <-> RELOADING -> STOPPING -> exit.
Invariants: at most one STARTING and one ACTIVE generation; the stop signal reaches a
worker at most once; a worker is forgotten exactly once, when its exit is reported.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from handoff import actions as act
from handoff import events as ev
from handoff.config import ReadyMode, ReadySpec
from handoff.errors import EXIT_NEVER_READY, EXIT_OK
from handoff.model import (
    ExitStatus,
    Generation,
    GenerationState,
    GenId,
    MasterState,
    Pid,
    Worker,
    WorkerState,
)
from handoff.timers import TimerKey, TimerKind


class InvalidTransition(AssertionError):
    """A state change the design forbids: always a bug in handoff."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    workers: int
    ready: ReadySpec
    ready_timeout_s: float
    drain_timeout_s: float
    stop_signal: signal.Signals
    respawn_base_s: float = 0.1
    respawn_cap_s: float = 30.0
    crash_loop_after: int = 5
    # A worker that was ready this long before dying starts a fresh backoff; one that
    # dies sooner (even after becoming ready) counts as one more crash in a row.
    stable_after_s: float = 10.0
    probe_base_s: float = 0.05
    probe_cap_s: float = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ReloadOutcome:
    gen: GenId
    ok: bool
    reason: str
    duration_s: float


def backoff(attempt: int, base_s: float, cap_s: float) -> float:
    """Capped exponential backoff: base, 2*base, 4*base, ... never above cap."""
    return min(cap_s, base_s * 2.0 ** max(0, attempt - 1))


class Supervisor:
    """Decides what to do next from what happened; see the module docstring."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.state = MasterState.STARTING
        self.generations: dict[GenId, Generation] = {}
        self.last_reload: ReloadOutcome | None = None
        self._workers: dict[Pid, Worker] = {}
        self._next_gen = 1
        self._reload_pending = False
        self._reload_started_at = 0.0
        self._probe_attempts: dict[Pid, int] = {}
        self._fast_stop = False
        self._exit: act.Exit | None = None
        self._exited = False

    # -- views -------------------------------------------------------------------------

    def generation_in(self, state: GenerationState) -> Generation | None:
        return next((g for g in self.generations.values() if g.state is state), None)

    def worker(self, pid: Pid) -> Worker | None:
        return self._workers.get(pid)

    def live_pids(self) -> list[Pid]:
        return list(self._workers)

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
            case ev.ForwardRequested(signal=sig):
                for pid in self._workers:
                    out.append(act.SendSignal(pid=pid, signal=sig))
                out.append(act.Report(event="signal.forwarded", fields={"signal": sig.name}))
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
        self._check_exit(out)
        return out

    # -- generations -------------------------------------------------------------------

    def _start_generation(self, now: float, out: list[act.Action]) -> None:
        if self.generation_in(GenerationState.STARTING) is not None:
            raise InvalidTransition("a second generation may not start while one is starting")
        gen = Generation(
            id=GenId(self._next_gen),
            state=GenerationState.STARTING,
            size=self.policy.workers,
            started_at=now,
        )
        self._next_gen += 1
        self.generations[gen.id] = gen
        out.append(
            act.Report(event="generation.started", fields={"gen": gen.id, "workers": gen.size})
        )
        for slot in range(gen.size):
            self._spawn(gen, slot, out)

    def _activate(self, gen: Generation, now: float, out: list[act.Action]) -> None:
        self._require_gen(gen, GenerationState.STARTING)
        previous = self.generation_in(GenerationState.ACTIVE)
        gen.state = GenerationState.ACTIVE
        gen.active_at = now
        out.append(
            act.Report(
                event="generation.active",
                fields={
                    "gen": gen.id,
                    "workers": gen.size,
                    "duration_s": round(now - gen.started_at, 4),
                },
            )
        )
        if previous is not None:
            self._drain(previous, "replaced", now, out)
        if self.state is MasterState.STARTING:
            self.state = MasterState.RUNNING
            out.append(act.Report(event="master.ready", fields={"gen": gen.id}))
            self._run_pending_reload(now, out)
        elif self.state is MasterState.RELOADING:
            self._finish_reload(gen, ok=True, reason="", now=now, out=out)

    def _fail(self, gen: Generation, reason: str, now: float, out: list[act.Action]) -> None:
        self._require_gen(gen, GenerationState.STARTING)
        gen.state = GenerationState.FAILED
        gen.failure = reason
        out.append(
            act.Report(
                event="generation.failed", level="error", fields={"gen": gen.id, "reason": reason}
            )
        )
        for worker in gen.live_workers():
            self._stop_worker(worker, out)
        if self.state is MasterState.STARTING:
            out.append(
                act.Report(event="master.never_ready", level="error", fields={"reason": reason})
            )
            self._begin_stop(fast=False, now=now, out=out, code=EXIT_NEVER_READY, reason=reason)
        elif self.state is MasterState.RELOADING:
            self._finish_reload(gen, ok=False, reason=reason, now=now, out=out)
        self._check_gone(gen, out)

    def _drain(self, gen: Generation, why: str, now: float, out: list[act.Action]) -> None:
        if gen.state not in (GenerationState.ACTIVE, GenerationState.STARTING):
            raise InvalidTransition(f"generation {gen.id} cannot drain from {gen.state}")
        gen.state = GenerationState.DRAINING
        for slot in gen.respawn_pending:
            out.append(act.CancelTimer(key=TimerKey(TimerKind.RESPAWN, gen.id, slot)))
        gen.respawn_pending.clear()
        out.append(
            act.Report(
                event="generation.draining",
                fields={"gen": gen.id, "reason": why, "signal": self._stop_signal_name()},
            )
        )
        for worker in gen.live_workers():
            self._stop_worker(worker, out)
        self._check_gone(gen, out)

    def _check_gone(self, gen: Generation, out: list[act.Action]) -> None:
        if gen.state not in (GenerationState.DRAINING, GenerationState.FAILED):
            return
        if gen.workers or gen.respawn_pending or gen.spawning:
            return
        gen.state = GenerationState.GONE
        del self.generations[gen.id]
        out.append(act.Report(event="generation.gone", fields={"gen": gen.id}))

    # -- reloads and stops -------------------------------------------------------------

    def _on_reload_requested(self, source: str, now: float, out: list[act.Action]) -> None:
        match self.state:
            case MasterState.RUNNING:
                self.state = MasterState.RELOADING
                self._reload_started_at = now
                out.append(
                    act.Report(
                        event="reload.requested", fields={"source": source, "gen": self._next_gen}
                    )
                )
                self._start_generation(now, out)
            case MasterState.STARTING | MasterState.RELOADING:
                # Requests during a start coalesce: one pending reload, run when it ends.
                already = self._reload_pending
                self._reload_pending = True
                out.append(
                    act.Report(
                        event="reload.queued", fields={"source": source, "coalesced": already}
                    )
                )
            case MasterState.STOPPING:
                out.append(
                    act.Report(
                        event="reload.refused",
                        level="warning",
                        fields={"source": source, "reason": "stopping"},
                    )
                )

    def _finish_reload(
        self, gen: Generation, *, ok: bool, reason: str, now: float, out: list[act.Action]
    ) -> None:
        self._require_master(MasterState.RELOADING)
        self.state = MasterState.RUNNING
        duration = round(now - self._reload_started_at, 4)
        self.last_reload = ReloadOutcome(gen=gen.id, ok=ok, reason=reason, duration_s=duration)
        if ok:
            out.append(
                act.Report(event="reload.succeeded", fields={"gen": gen.id, "duration_s": duration})
            )
        else:
            fields: dict[str, object] = {"gen": gen.id, "reason": reason, "duration_s": duration}
            out.append(act.Report(event="reload.failed", level="error", fields=fields))
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
                out.append(
                    act.Report(event="master.stopping", fields={"fast": True, "source": source})
                )
                for worker in self._workers.values():
                    self._kill_worker(worker, "fast stop", out)
            return
        self._begin_stop(
            fast=fast, now=now, out=out, code=EXIT_OK, reason=f"stop requested ({source})"
        )

    def _begin_stop(
        self, *, fast: bool, now: float, out: list[act.Action], code: int, reason: str
    ) -> None:
        self._reload_pending = False  # before _finish_reload, which would start it
        starting = self.generation_in(GenerationState.STARTING)
        if self.state is MasterState.RELOADING and starting is not None:
            self._finish_reload(
                starting, ok=False, reason="cancelled: master stopping", now=now, out=out
            )
        self.state = MasterState.STOPPING
        self._fast_stop = fast
        self._exit = act.Exit(code=code, reason=reason)
        out.append(act.Report(event="master.stopping", fields={"fast": fast, "reason": reason}))
        for gen in list(self.generations.values()):
            if gen.state in (GenerationState.ACTIVE, GenerationState.STARTING):
                self._drain(gen, "stopping", now, out)
        if fast:
            for worker in self._workers.values():
                self._kill_worker(worker, "fast stop", out)

    def _check_exit(self, out: list[act.Action]) -> None:
        if self.state is MasterState.STOPPING and not self.generations and not self._exited:
            assert self._exit is not None
            self._exited = True
            out.append(self._exit)

    # -- workers -----------------------------------------------------------------------

    def _on_spawned(
        self, gen: Generation, slot: int, pid: Pid, now: float, out: list[act.Action]
    ) -> None:
        worker = Worker(gen=gen.id, slot=slot, pid=pid, state=WorkerState.STARTING, started_at=now)
        self._workers[pid] = worker
        gen.workers[pid] = worker
        gen.spawning.discard(slot)
        out.append(
            act.Report(event="worker.spawned", fields={"gen": gen.id, "worker": slot, "pid": pid})
        )
        if gen.state not in (GenerationState.STARTING, GenerationState.ACTIVE):
            # The generation failed or began draining while its later workers were forked.
            self._stop_worker(worker, out)
            return
        out.append(
            act.StartTimer(
                key=TimerKey(TimerKind.READY_TIMEOUT, pid), delay_s=self.policy.ready_timeout_s
            )
        )
        match self.policy.ready.mode:
            case ReadyMode.DELAY:
                key = TimerKey(TimerKind.READY_DELAY, pid)
                out.append(act.StartTimer(key=key, delay_s=self.policy.ready.delay_s))
            case ReadyMode.EXEC | ReadyMode.AUTO:
                self._probe_attempts[pid] = 0
                out.append(act.RunProbe(pid=pid, gen=gen.id, slot=slot))
            case ReadyMode.NOTIFY:
                pass

    def _on_spawn_failed(
        self, gen: Generation, slot: int, reason: str, now: float, out: list[act.Action]
    ) -> None:
        gen.spawning.discard(slot)
        fields = {"gen": gen.id, "worker": slot, "reason": reason}
        out.append(act.Report(event="worker.spawn_failed", level="error", fields=fields))
        self._on_worker_lost(gen, slot, reason, now, out)
        self._check_gone(gen, out)

    def _on_ready(self, worker: Worker, via: str, now: float, out: list[act.Action]) -> None:
        if worker.state is not WorkerState.STARTING:
            return  # a repeated READY=1, or readiness of a worker already told to stop
        worker.state = WorkerState.READY
        worker.ready_at = now
        self._forget_readiness(worker, out)
        gen = self.generations[worker.gen]
        fields = {
            "gen": gen.id,
            "worker": worker.slot,
            "pid": worker.pid,
            "via": via,
            "duration_s": round(now - worker.started_at, 4),
        }
        out.append(act.Report(event="worker.ready", fields=fields))
        if gen.state is GenerationState.STARTING and gen.ready_count() == gen.size:
            self._activate(gen, now, out)

    def _on_exited(self, pid: Pid, status: ExitStatus, now: float, out: list[act.Action]) -> None:
        worker = self._workers.pop(pid, None)
        if worker is None:
            raise InvalidTransition(f"pid {pid} reported exited but is not a live worker")
        was = worker.state
        worker.state = WorkerState.EXITED
        self._forget_readiness(worker, out)
        out.append(act.CancelTimer(key=TimerKey(TimerKind.DRAIN, pid)))
        gen = self.generations[worker.gen]
        del gen.workers[pid]
        expected = was is WorkerState.STOPPING and not worker.respawn_on_exit
        description = status.describe(killed_by_us=worker.killed)
        fields: dict[str, object] = {
            "gen": gen.id,
            "worker": worker.slot,
            "pid": pid,
            "status": description,
            "expected": expected,
            "uptime_s": round(now - worker.started_at, 4),
            **status.as_fields(),
        }
        level = "info" if expected else "warning"
        out.append(act.Report(event="worker.exited", level=level, fields=fields))
        if worker.respawn_on_exit:
            self._on_worker_lost(gen, worker, worker.status, now, out)
        elif not expected:
            ready = "after it was ready" if was is WorkerState.READY else "before it was ready"
            reason = f"worker {worker.slot} (pid {pid}) {description} {ready}"
            self._on_worker_lost(gen, worker, reason, now, out)
        self._check_gone(gen, out)

    def _on_worker_lost(
        self, gen: Generation, lost: Worker | int, reason: str, now: float, out: list[act.Action]
    ) -> None:
        """A worker died or never started (lost is its slot then): fail or respawn."""
        slot = lost if isinstance(lost, int) else lost.slot
        match gen.state:
            case GenerationState.STARTING:
                self._fail(gen, reason, now, out)
            case GenerationState.ACTIVE:
                stable = (
                    isinstance(lost, Worker)
                    and lost.ready_at is not None
                    and now - lost.ready_at >= self.policy.stable_after_s
                )
                crashes = 1 if stable else gen.crashes.get(slot, 0) + 1
                gen.crashes[slot] = crashes
                delay = backoff(crashes, self.policy.respawn_base_s, self.policy.respawn_cap_s)
                gen.respawn_pending.add(slot)
                out.append(
                    act.StartTimer(key=TimerKey(TimerKind.RESPAWN, gen.id, slot), delay_s=delay)
                )
                crash_loop = crashes >= self.policy.crash_loop_after
                fields: dict[str, object] = {
                    "gen": gen.id,
                    "worker": slot,
                    "reason": reason,
                    "crashes": crashes,
                    "delay_s": delay,
                }
                event = "worker.crash_loop" if crash_loop else "worker.respawn_scheduled"
                out.append(
                    act.Report(
                        event=event, level="error" if crash_loop else "warning", fields=fields
                    )
                )
            case GenerationState.DRAINING | GenerationState.FAILED | GenerationState.GONE:
                pass

    def _spawn(self, gen: Generation, slot: int, out: list[act.Action]) -> None:
        gen.spawning.add(slot)
        out.append(act.SpawnWorker(gen=gen.id, slot=slot))

    def _stop_worker(self, worker: Worker, out: list[act.Action]) -> None:
        if worker.stop_signalled or worker.state is WorkerState.EXITED:
            return
        worker.stop_signalled = True
        worker.state = WorkerState.STOPPING
        self._forget_readiness(worker, out)
        out.append(act.SendSignal(pid=worker.pid, signal=self.policy.stop_signal))
        out.append(
            act.StartTimer(
                key=TimerKey(TimerKind.DRAIN, worker.pid), delay_s=self.policy.drain_timeout_s
            )
        )

    def _kill_worker(self, worker: Worker, reason: str, out: list[act.Action]) -> None:
        if worker.killed:
            return
        worker.killed = True
        worker.state = WorkerState.STOPPING
        self._forget_readiness(worker, out)
        out.append(act.KillTree(pid=worker.pid))
        fields = {"gen": worker.gen, "worker": worker.slot, "pid": worker.pid, "reason": reason}
        out.append(act.Report(event="worker.killed", level="warning", fields=fields))

    def _forget_readiness(self, worker: Worker, out: list[act.Action]) -> None:
        out.append(act.CancelTimer(key=TimerKey(TimerKind.READY_TIMEOUT, worker.pid)))
        match self.policy.ready.mode:
            case ReadyMode.DELAY:
                out.append(act.CancelTimer(key=TimerKey(TimerKind.READY_DELAY, worker.pid)))
            case ReadyMode.EXEC | ReadyMode.AUTO:
                if self._probe_attempts.pop(worker.pid, None) is not None:
                    out.append(act.CancelTimer(key=TimerKey(TimerKind.PROBE_RETRY, worker.pid)))
                    out.append(act.CancelProbe(pid=worker.pid))
            case ReadyMode.NOTIFY:
                pass

    # -- readiness and timers ----------------------------------------------------------

    def _on_notified(self, event: ev.WorkerNotified, now: float, out: list[act.Action]) -> None:
        worker = self._workers.get(event.pid)
        if worker is None:
            return
        if event.status is not None:
            worker.status = event.status
        if event.ready:
            self._on_ready(worker, "notify", now, out)

    def _on_probe_finished(
        self, pid: Pid, ok: bool, detail: str, now: float, out: list[act.Action]
    ) -> None:
        worker = self._workers.get(pid)
        if (
            worker is None
            or worker.state is not WorkerState.STARTING
            or pid not in self._probe_attempts
        ):
            return
        if ok:
            self._on_ready(worker, self.policy.ready.mode.value, now, out)
            return
        attempts = self._probe_attempts[pid] + 1
        self._probe_attempts[pid] = attempts
        delay = backoff(attempts, self.policy.probe_base_s, self.policy.probe_cap_s)
        out.append(act.StartTimer(key=TimerKey(TimerKind.PROBE_RETRY, pid), delay_s=delay))
        if detail:
            out.append(
                act.Report(
                    event="worker.probe_failed",
                    level="debug",
                    fields={"pid": pid, "detail": detail},
                )
            )

    def _on_timer(self, key: TimerKey, now: float, out: list[act.Action]) -> None:
        match key.kind:
            case TimerKind.RESPAWN:
                gen = self.generations.get(GenId(key.ident))
                if gen is None or key.slot not in gen.respawn_pending:
                    return
                gen.respawn_pending.discard(key.slot)
                if gen.state is GenerationState.ACTIVE and self.state is not MasterState.STOPPING:
                    self._spawn(gen, key.slot, out)
                else:
                    self._check_gone(gen, out)
                return
            case (
                TimerKind.READY_TIMEOUT
                | TimerKind.READY_DELAY
                | TimerKind.PROBE_RETRY
                | TimerKind.DRAIN
            ):
                worker = self._workers.get(Pid(key.ident))
        if worker is None:
            return
        match key.kind:
            case TimerKind.READY_DELAY:
                self._on_ready(worker, "delay", now, out)
            case TimerKind.PROBE_RETRY:
                if worker.state is WorkerState.STARTING:
                    out.append(act.RunProbe(pid=worker.pid, gen=worker.gen, slot=worker.slot))
            case TimerKind.DRAIN:
                self._kill_worker(
                    worker,
                    f"still running {self.policy.drain_timeout_s:g} s after the stop signal",
                    out,
                )
            case TimerKind.READY_TIMEOUT:
                self._on_ready_timeout(worker, now, out)

    def _on_ready_timeout(self, worker: Worker, now: float, out: list[act.Action]) -> None:
        if worker.state is not WorkerState.STARTING:
            return
        gen = self.generations[worker.gen]
        timeout = self.policy.ready_timeout_s
        reason = f"worker {worker.slot} (pid {worker.pid}) not ready after {timeout:g} s"
        out.append(
            act.Report(
                event="worker.not_ready",
                level="error",
                fields={"gen": gen.id, "worker": worker.slot, "pid": worker.pid, "reason": reason},
            )
        )
        if gen.state is GenerationState.STARTING:
            self._fail(gen, reason, now, out)
        else:
            # A respawned worker of the active generation: stop it, and respawn its slot
            # only once it has exited, so that a slot never has two workers.
            worker.status = reason
            worker.respawn_on_exit = True
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

    def _stop_signal_name(self) -> str:
        return "SIGKILL" if self._fast_stop else self.policy.stop_signal.name
