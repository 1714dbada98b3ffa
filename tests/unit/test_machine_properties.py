"""Invariants of the supervisor machine under random event sequences (Hypothesis).

Random reloads, stops, readiness, exits, probe results, spawn failures and clock steps go
through the same ``FakeLoop`` as test_machine.py, with the settle delay drawn too (0, or
above 0 as shipped: the detach -> settle -> signal path); after every step the machine's
invariants (docs/architecture.md) must hold, and at the end a graceful stop must always
reach ``Exit`` with no worker left.
"""

from __future__ import annotations

import signal
from collections import Counter
from dataclasses import replace

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from handoff.core import actions as act
from handoff.core import events as ev
from handoff.core.model import GenerationState, MasterState, Pid, WorkerState
from handoff.core.policy import Policy
from handoff.errors import EXIT_NEVER_READY, EXIT_OK
from handoff.formats.options import DEFAULT_SETTLE_S, ReadyMode, ReadySpec
from tests.unit.test_machine import FakeLoop

SETTINGS = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
READY_SPECS = {
    "notify": ReadySpec(mode=ReadyMode.NOTIFY),
    "delay": ReadySpec(mode=ReadyMode.DELAY, delay_s=1.0),
    "exec": ReadySpec(mode=ReadyMode.EXEC, command="true"),
    "auto": ReadySpec(mode=ReadyMode.AUTO),
}
STEPS = [0.05, 0.1, 0.3, 1.0, 2.0, 5.0, 12.0]
SETTLES = [0.0, DEFAULT_SETTLE_S, 1.0]
KEEPS = [0.0, 3.0, 30.0]  # --keep-previous: off, or a window (with --verify every 1 s)
STOP = signal.SIGTERM


class SupervisorRules(RuleBasedStateMachine):
    """Random drive of the machine; invariants checked after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: FakeLoop = FakeLoop(_policy(1, "notify", 0.0))
        self.first_stopping = -1  # index in loop.log of the first master.stopping report

    @initialize(
        workers=st.integers(1, 3),
        mode=st.sampled_from(sorted(READY_SPECS)),
        settle_s=st.sampled_from(SETTLES),
        keep_s=st.sampled_from(KEEPS),
        rollout=st.sampled_from([0, 1, 2]),
    )
    def boot(self, workers: int, mode: str, settle_s: float, keep_s: float, rollout: int) -> None:
        policy = replace(_policy(workers, mode, settle_s, keep_s), rollout_count=rollout)
        self.loop = FakeLoop(policy)
        self.loop.start()

    # -- rules ------------------------------------------------------------------------

    def running(self) -> bool:
        return not self.loop.exits

    @precondition(lambda self: not self.running())
    @rule()
    def exited(self) -> None:
        """After Exit the master is gone: nothing more happens (Hypothesis needs a rule)."""

    @precondition(running)
    @rule()
    def reload(self) -> None:
        self.loop.reload()

    @precondition(running)
    @rule(workers=st.integers(1, 4), delta=st.sampled_from([0, 1, -1]))
    def scale(self, workers: int, delta: int) -> None:
        if delta:
            self.loop.feed(ev.ScaleRequested(source="SIGTTIN", delta=delta))
        else:
            self.loop.feed(ev.ScaleRequested(source="control", workers=workers))

    @precondition(running)
    @rule(source=st.sampled_from(["SIGTERM", "SIGINT", "SIGQUIT"]), dice=st.integers(0, 3))
    def stop(self, source: str, dice: int) -> None:
        if dice != 0:
            return  # a stop ends the interesting part of a run: make it rarer than the rest
        self.loop.stop(fast=source == "SIGQUIT", source=source)

    @precondition(running)
    @rule()
    def forward(self) -> None:
        self.loop.feed(ev.ForwardRequested(signal=signal.SIGUSR1))

    @precondition(lambda self: self.running() and self.loop.alive)
    @rule(index=st.integers(0, 20))
    def ready(self, index: int) -> None:
        pid = self._pick(index)
        self.loop.ready(pid)

    @precondition(running)
    @rule()
    def starting_generation_ready(self) -> None:
        starting = self.loop.machine.generation_in(GenerationState.STARTING)
        if starting is not None:
            for worker in starting.live_workers():
                self.loop.ready(worker.pid)

    @precondition(running)
    @rule(index=st.integers(0, 20))
    def serving_worker_crashes(self, index: int) -> None:
        active = self.loop.machine.generation_in(GenerationState.ACTIVE)
        if active is not None and (live := active.live_workers()):
            self.loop.exit(live[index % len(live)].pid, code=1)

    @precondition(running)
    @rule()
    def ready_from_a_stranger(self) -> None:
        assert self.loop.feed(ev.WorkerNotified(pid=Pid(1), ready=True)) == []

    @precondition(lambda self: self.running() and self.loop.alive)
    @rule(index=st.integers(0, 20), ok=st.booleans())
    def probe_finished(self, index: int, ok: bool) -> None:
        self.loop.feed(ev.ProbeFinished(pid=self._pick(index), ok=ok, detail="exited 1"))

    @precondition(lambda self: self.running() and self.loop.alive)
    @rule(
        index=st.integers(0, 20),
        how=st.sampled_from([(0, None), (1, None), (127, None), (None, 9), (None, 15)]),
    )
    def exit(self, index: int, how: tuple[int | None, int | None]) -> None:
        code, sig = how
        self.loop.exit(self._pick(index), code=code, sig=sig)

    @precondition(running)
    @rule(canary=st.integers(1, 3))
    def reload_canary(self, canary: int) -> None:
        self.loop.feed(ev.ReloadRequested(source="control", canary=canary))

    @precondition(running)
    @rule()
    def promote(self) -> None:
        self.loop.feed(ev.PromoteRequested(source="control"))

    @precondition(running)
    @rule()
    def rollback(self) -> None:
        self.loop.feed(ev.RollbackRequested(source="control"))

    @precondition(running)
    @rule(ok=st.booleans())
    def verify_finished(self, ok: bool) -> None:
        serving = self.loop.machine.generation_in(GenerationState.ACTIVE)
        if serving is not None:
            self.loop.feed(ev.VerifyFinished(gen=serving.id, ok=ok, detail="HTTP 500"))

    @precondition(lambda self: self.running() and self.loop.alive)
    @rule(index=st.integers(0, 20), detach=st.booleans())
    def switch_failed(self, index: int, detach: bool) -> None:
        """A parked worker's detach left it accepting, or a rollback could not put it back."""
        pid = self._pick(index)
        if detach:
            self.loop.feed(ev.DetachFailed(pid=pid, reason="signal-only"))
        else:
            self.loop.feed(ev.ReattachFailed(pid=pid, reason="0 of 1 put back"))

    @precondition(running)
    @rule(seconds=st.sampled_from(STEPS))
    def advance(self, seconds: float) -> None:
        self.loop.advance(seconds)

    @precondition(running)
    @rule(slot=st.integers(0, 2))
    def fail_next_spawn(self, slot: int) -> None:
        last = self.loop.policy.workers - 1
        self.loop.fail_spawn(None, min(slot, last))

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def generations_by_state(self) -> None:
        counts = Counter(g.state for g in self.loop.machine.generations.values())
        assert counts[GenerationState.STARTING] <= 1
        assert counts[GenerationState.ACTIVE] <= 1
        assert counts[GenerationState.PARKED] <= 1
        assert GenerationState.GONE not in counts, "a GONE generation is dropped"
        expected = {
            MasterState.STARTING: (1, 0),
            MasterState.RUNNING: (0, 1),
            MasterState.RELOADING: (1, 1),
            MasterState.STOPPING: (0, 0),
        }[self.loop.machine.state]
        actual = (counts[GenerationState.STARTING], counts[GenerationState.ACTIVE])
        assert actual == expected, f"{self.loop.machine.state}: (starting, active) {actual}"

    @invariant()
    def stop_signal_at_most_once_per_worker(self) -> None:
        per_pid = Counter(s.pid for s in self.loop.stop_signals())
        assert all(n == 1 for n in per_pid.values()), per_pid
        kills = Counter(a.pid for a in self.loop.log if isinstance(a, act.KillTree))
        assert all(n == 1 for n in kills.values()), kills

    @invariant()
    def a_worker_is_taken_off_the_socket_before_its_stop_signal(self) -> None:
        detached: set[Pid] = set()
        for action in self.loop.log:
            if isinstance(action, act.DetachListeners):
                detached.add(action.pid)
            elif isinstance(action, act.SendSignal) and action.signal is STOP:
                assert action.pid in detached, f"pid {action.pid} signalled before detached"

    @invariant()
    def detached_workers_are_parked_or_stopping(self) -> None:
        """Off the socket: parked, or stopping; put back (a rollback): serving again."""
        off: set[Pid] = set()
        for action in self.loop.log:
            if isinstance(action, act.DetachListeners):
                off.add(action.pid)
            elif isinstance(action, act.ReattachListeners):
                assert action.pid in off, f"pid {action.pid} put back, never taken off"
                off.discard(action.pid)
        for pid in self.loop.alive & off:
            worker = self.loop.machine.worker(pid)
            assert worker is not None
            phase = worker.state.stopping or worker.state is WorkerState.PARKED
            assert phase, f"pid {pid} was detached but is {worker.state}"

    @invariant()
    def parked_workers_belong_to_a_parked_or_rolling_generation(self) -> None:
        """Parked: a replaced generation's, or the serving one's during a --rollout."""
        machine = self.loop.machine
        rolling = machine.state is MasterState.RELOADING
        for gen in machine.generations.values():
            for worker in gen.live_workers():
                if worker.state is WorkerState.PARKED:
                    allowed = {GenerationState.PARKED}
                    if rolling:
                        allowed.add(GenerationState.ACTIVE)
                    assert gen.state in allowed, f"{worker} in {gen.state}"

    @invariant()
    def a_rollout_admits_no_more_than_its_size(self) -> None:
        for gen in self.loop.machine.generations.values():
            if gen.admitted is not None:
                assert 0 < gen.admitted <= gen.size
                assert gen.state is not GenerationState.ACTIVE, "its batches are done"

    @invariant()
    def pids_are_spawned_tracked_and_reaped_once(self) -> None:
        loop = self.loop
        assert len(loop.exited) == len(set(loop.exited))
        assert set(loop.exited) <= set(loop.spawned)
        tracked = {pid for gen in loop.machine.generations.values() for pid in gen.workers}
        assert tracked == loop.alive
        assert not loop.dead_targets, f"signal or kill aimed at a reaped pid: {loop.dead_targets}"
        for pid in loop.alive:
            worker = loop.machine.worker(pid)
            assert worker is not None
            assert worker.state is not WorkerState.EXITED
            assert worker.gen in loop.machine.generations, "a live worker's generation exists"

    @invariant()
    def exit_once_and_only_with_no_worker_left(self) -> None:
        assert len(self.loop.exits) <= 1
        if self.loop.exits:
            assert self.loop.alive_at_exit == set()
            assert self.loop.exits[0].code in (EXIT_OK, EXIT_NEVER_READY)
            assert self.loop.machine.state is MasterState.STOPPING

    @invariant()
    def nothing_spawns_once_stopping(self) -> None:
        log = self.loop.log
        if self.first_stopping < 0:
            self.first_stopping = next(
                (
                    i
                    for i, a in enumerate(log)
                    if isinstance(a, act.Report) and a.event == "master.stopping"
                ),
                -1,
            )
        if self.first_stopping >= 0:
            assert not any(isinstance(a, act.SpawnWorker) for a in log[self.first_stopping :])

    # -- liveness: a graceful stop always ends ----------------------------------------

    def teardown(self) -> None:
        loop = self.loop
        if not loop.exits:
            loop.stop()
        for _ in range(10):
            if loop.exits:
                break
            loop.exit_all(sorted(loop.alive))
            loop.advance(100)
        assert loop.exits, "a graceful stop must end in Exit"
        assert not loop.alive
        assert not loop.machine.generations
        self.exit_once_and_only_with_no_worker_left()
        self.stop_signal_at_most_once_per_worker()

    # -- helpers ----------------------------------------------------------------------

    def _pick(self, index: int) -> Pid:
        alive = sorted(self.loop.alive)
        return alive[index % len(alive)]


def _policy(workers: int, mode: str, settle_s: float, keep_s: float = 0.0) -> Policy:
    return Policy(
        keep_previous_s=keep_s,
        verify_interval_s=1.0 if keep_s else 0.0,
        rollback_after=2,
        workers=workers,
        ready=READY_SPECS[mode],
        ready_timeout_s=5.0,
        drain_timeout_s=3.0,
        stop_signal=STOP,
        settle_s=settle_s,
    )


def test_invariants() -> None:
    run_state_machine_as_test(SupervisorRules, settings=SETTINGS)
