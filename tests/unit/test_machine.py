"""The supervisor machine driven by hand-written event sequences and a fake clock.

``FakeLoop`` plays ``loop.py``'s part without processes: it executes ``SpawnWorker`` at
once by feeding ``WorkerSpawned`` with a fresh fake pid (or ``SpawnFailed`` when told to),
keeps ``StartTimer``/``CancelTimer`` in a real ``Timers``, fires due timers when the test
advances the clock, and records every action in execution order. Nested events are fed
while the outer action list is being executed, exactly as the loop does.
"""

from __future__ import annotations

import dataclasses
import signal
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import pytest

from handoff.core import actions as act
from handoff.core import events as ev
from handoff.core.machine import Supervisor
from handoff.core.model import ExitStatus, GenerationState, GenId, MasterState, Pid, WorkerState
from handoff.core.policy import Policy, backoff
from handoff.core.timers import TimerKey, TimerKind, Timers
from handoff.errors import EXIT_NEVER_READY, EXIT_OK
from handoff.formats.options import ReadyMode, ReadySpec

A = TypeVar("A", bound=act.Action)
STOP = signal.SIGTERM
FIRST_PID = 100
SPAWN_FAILURE = "command not found: 'app'"


def make_policy(
    *,
    workers: int = 2,
    ready: ReadySpec | None = None,
    ready_timeout_s: float = 60.0,
    drain_timeout_s: float = 30.0,
    stop_signal: signal.Signals = STOP,
    settle_s: float = 0.0,
) -> Policy:
    return Policy(
        workers=workers,
        ready=ready or ReadySpec(mode=ReadyMode.NOTIFY),
        ready_timeout_s=ready_timeout_s,
        drain_timeout_s=drain_timeout_s,
        stop_signal=stop_signal,
        settle_s=settle_s,
    )


class FakeLoop:
    """The loop's part, with fake pids and a fake clock; see the module docstring."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.machine = Supervisor(policy)
        self.timers = Timers()
        self.now = 0.0
        self.log: list[act.Action] = []
        self.spawned: dict[Pid, tuple[GenId, int]] = {}  # in spawn order
        self.alive: set[Pid] = set()
        self.exited: list[Pid] = []
        self.exits: list[act.Exit] = []
        self.alive_at_exit: set[Pid] | None = None
        self.dead_targets: list[act.Action] = []  # signals or kills aimed at reaped pids
        self._failing: Counter[tuple[int | None, int]] = Counter()
        self._next_pid = FIRST_PID

    # -- driving --------------------------------------------------------------------------

    def feed(self, event: ev.Event) -> list[act.Action]:
        """Feed one event; return every action it led to (nested spawns included)."""
        start = len(self.log)
        self._feed(event)
        return self.log[start:]

    def start(self) -> list[act.Action]:
        return self.feed(ev.Started())

    def advance(self, seconds: float) -> list[act.Action]:
        """Move the clock on, waking at each deadline like the loop and firing due timers."""
        start = len(self.log)
        target = self.now + seconds
        while (deadline := self.timers.next_deadline()) is not None and deadline <= target:
            self.now = max(self.now, deadline)
            # The loop pops every due key first, then feeds them: a key cancelled by an
            # earlier one in the same batch still fires, and the machine must shrug it off.
            due = self.timers.pop_due(self.now)
            self.before_timers(due)
            for key in due:
                self._feed(ev.TimerFired(key=key))
        self.now = target
        return self.log[start:]

    def ready(self, pid: Pid) -> list[act.Action]:
        return self.feed(ev.WorkerNotified(pid=pid, ready=True))

    def exit(self, pid: Pid, *, code: int | None = 0, sig: int | None = None) -> list[act.Action]:
        assert pid in self.alive, f"pid {pid} is not a live fake process"
        self.alive.discard(pid)
        self.exited.append(pid)
        status = ExitStatus(signal=sig) if sig is not None else ExitStatus(code=code)
        return self.feed(ev.ChildExited(pid=pid, status=status))

    def exit_all(self, pids: Iterable[Pid]) -> list[act.Action]:
        out: list[act.Action] = []
        for pid in list(pids):
            out += self.exit(pid)
        return out

    def reload(self, source: str = "SIGHUP") -> list[act.Action]:
        return self.feed(ev.ReloadRequested(source=source))

    def stop(self, *, fast: bool = False, source: str = "SIGTERM") -> list[act.Action]:
        return self.feed(ev.StopRequested(fast=fast, source=source))

    def before_timers(self, due: list[TimerKey]) -> None:
        """Called with each batch of due keys before they fire: a hook for subclasses."""

    def fail_spawn(self, gen: int | None, slot: int, times: int = 1) -> None:
        """Make the next ``times`` spawns into (gen, slot) fail; gen None: any generation."""
        self._failing[(gen, slot)] += times

    # -- views ----------------------------------------------------------------------------

    def pids(self, gen: int) -> list[Pid]:
        """Live fake pids of a generation, in spawn order."""
        return [pid for pid, (g, _) in self.spawned.items() if g == gen and pid in self.alive]

    def pid(self, gen: int, slot: int) -> Pid:
        """The newest pid spawned into (gen, slot)."""
        found = [pid for pid, where in self.spawned.items() if where == (gen, slot)]
        assert found, f"nothing spawned into gen {gen} slot {slot}"
        return found[-1]

    def master_state(self) -> MasterState:
        # A call, not an attribute: mypy would narrow the attribute across events.
        return self.machine.state

    def gen_state(self, gen: int) -> GenerationState:
        record = self.machine.generations.get(GenId(gen))
        return GenerationState.GONE if record is None else record.state

    def stop_signals(self, pid: Pid | None = None) -> list[act.SendSignal]:
        return [
            a
            for a in self.log
            if isinstance(a, act.SendSignal)
            and a.signal is self.policy.stop_signal
            and (pid is None or a.pid == pid)
        ]

    # -- executing actions ----------------------------------------------------------------

    def _feed(self, event: ev.Event) -> None:
        for action in self.machine.handle(event, self.now):
            self.log.append(action)
            self._execute(action)

    def _execute(self, action: act.Action) -> None:
        match action:
            case act.SpawnWorker(gen=gen, slot=slot):
                failing = next(
                    (k for k in ((gen, slot), (None, slot)) if self._failing[k] > 0), None
                )
                if failing is not None:
                    self._failing[failing] -= 1
                    self._feed(ev.SpawnFailed(gen=gen, slot=slot, reason=SPAWN_FAILURE))
                    return
                pid = Pid(self._next_pid)
                self._next_pid += 1
                self.spawned[pid] = (gen, slot)
                self.alive.add(pid)
                self._feed(ev.WorkerSpawned(gen=gen, slot=slot, pid=pid))
            case act.SendSignal(pid=pid) | act.KillTree(pid=pid):
                if pid not in self.alive:
                    self.dead_targets.append(action)
            case act.StartTimer(key=key, delay_s=delay):
                assert delay >= 0
                self.timers.start(key, self.now + delay)
            case act.CancelTimer(key=key):
                self.timers.cancel(key)
            case act.Exit():
                if not self.exits:
                    self.alive_at_exit = set(self.alive)
                self.exits.append(action)
            case act.RunProbe() | act.CancelProbe() | act.Report():
                pass


# -- helpers for assertions -----------------------------------------------------------------


def names(actions: Sequence[act.Action]) -> list[str]:
    return [a.event for a in actions if isinstance(a, act.Report)]


def report(actions: Sequence[act.Action], name: str) -> act.Report:
    found = [a for a in actions if isinstance(a, act.Report) and a.event == name]
    assert len(found) == 1, f"expected one {name!r} report, got {names(actions)}"
    return found[0]


def of_type(actions: Sequence[act.Action], kind: type[A]) -> list[A]:
    return [a for a in actions if isinstance(a, kind)]


def spawns(actions: Sequence[act.Action]) -> list[tuple[int, int]]:
    return [(a.gen, a.slot) for a in of_type(actions, act.SpawnWorker)]


def started(
    workers: int = 2, *, ready_timeout_s: float = 60.0, drain_timeout_s: float = 30.0
) -> FakeLoop:
    """A loop whose first generation (gen 1) is serving."""
    policy = make_policy(
        workers=workers, ready_timeout_s=ready_timeout_s, drain_timeout_s=drain_timeout_s
    )
    return serving_with(policy)


def serving_with(policy: Policy) -> FakeLoop:
    """A loop with this policy whose first generation (gen 1) is serving."""
    loop = FakeLoop(policy)
    loop.start()
    for pid in loop.pids(1):
        loop.ready(pid)
    assert loop.master_state() is MasterState.RUNNING
    return loop


# -- the first generation -------------------------------------------------------------------


def test_first_generation_ready_via_notify_serves() -> None:
    loop = FakeLoop(make_policy(workers=2))

    out = loop.start()

    assert spawns(out) == [(1, 0), (1, 1)]
    assert names(out) == ["generation.started", "worker.spawned", "worker.spawned"]
    p0, p1 = loop.pids(1)
    timers = of_type(out, act.StartTimer)
    assert [(t.key, t.delay_s) for t in timers] == [
        (TimerKey(TimerKind.READY_TIMEOUT, p0), 60.0),
        (TimerKey(TimerKind.READY_TIMEOUT, p1), 60.0),
    ]
    assert loop.master_state() is MasterState.STARTING

    out = loop.ready(p0)
    assert names(out) == ["worker.ready"]
    assert loop.gen_state(1) is GenerationState.STARTING

    out = loop.ready(p1)
    assert names(out) == ["worker.ready", "generation.active", "master.ready"]
    assert report(out, "master.ready").fields == {"gen": 1}
    assert report(out, "worker.ready").fields["via"] == "notify"
    assert loop.master_state() is MasterState.RUNNING
    assert loop.gen_state(1) is GenerationState.ACTIVE
    assert len(loop.timers) == 0  # both ready timeouts were cancelled
    assert not loop.stop_signals()
    assert not loop.exits


@pytest.mark.parametrize(
    ("code", "sig", "described"),
    [
        (1, None, "exited 1"),
        (127, None, "exited 127 (command not found?)"),
        (None, signal.SIGSEGV, "killed by SIGSEGV"),
        (None, signal.SIGKILL, "killed by SIGKILL (out of memory?)"),
    ],
)
def test_first_generation_worker_exit_fails_and_exits_3_after_all_reaped(
    code: int | None, sig: int | None, described: str
) -> None:
    loop = FakeLoop(make_policy(workers=2))
    loop.start()
    p0, p1 = loop.pids(1)

    out = loop.exit(p0, code=code, sig=sig)

    reason = f"worker 0 (pid {p0}) {described} before it was ready"
    failed = {"gen": 1, "worker": 0, "pid": p0, "reason": reason}  # who: for its output
    assert report(out, "generation.failed").fields == failed
    assert report(out, "master.never_ready").fields == {"reason": reason}
    assert "master.stopping" in names(out)
    assert report(out, "worker.exited").fields["expected"] is False
    assert of_type(out, act.SendSignal) == [act.SendSignal(pid=p1, signal=STOP)]
    assert not loop.exits, "no Exit while a worker is still running"
    assert loop.master_state() is MasterState.STOPPING

    out = loop.exit(p1)

    assert names(out) == ["worker.exited", "generation.gone"]
    assert loop.exits == [act.Exit(code=EXIT_NEVER_READY, reason=reason)]
    assert loop.alive_at_exit == set()


def test_first_generation_ready_timeout_fails_and_exits_3_after_all_reaped() -> None:
    loop = FakeLoop(make_policy(workers=2, ready_timeout_s=60))
    loop.start()
    p0, p1 = loop.pids(1)
    loop.ready(p0)

    assert not names(loop.advance(59.9))
    out = loop.advance(0.1)

    reason = f"worker 1 (pid {p1}) not ready after 60 s"
    assert report(out, "worker.not_ready").fields["reason"] == reason
    assert report(out, "generation.failed").fields["reason"] == reason
    assert "master.never_ready" in names(out)
    assert sorted(s.pid for s in of_type(out, act.SendSignal)) == [p0, p1]
    assert not loop.exits

    # The workers ignore the stop signal: the drain timeout kills them, still no Exit.
    out = loop.advance(30)
    assert of_type(out, act.KillTree) == [act.KillTree(pid=p0), act.KillTree(pid=p1)]
    assert not loop.exits

    loop.exit(p0, sig=signal.SIGKILL)
    assert not loop.exits
    loop.exit(p1, sig=signal.SIGKILL)
    assert [e.code for e in loop.exits] == [EXIT_NEVER_READY]
    assert "not ready after 60 s" in loop.exits[0].reason
    assert len(loop.stop_signals(p0)) == len(loop.stop_signals(p1)) == 1


def test_first_generation_ready_timeouts_due_together_fail_it_once() -> None:
    loop = FakeLoop(make_policy(workers=3))
    loop.start()

    out = loop.advance(60)

    assert names(out).count("generation.failed") == 1
    assert names(out).count("worker.not_ready") == 1  # the stale keys in the batch are ignored
    assert sorted(s.pid for s in of_type(out, act.SendSignal)) == loop.pids(1)


def test_first_generation_spawn_failure_exits_3_at_once() -> None:
    loop = FakeLoop(make_policy(workers=1))
    loop.fail_spawn(1, 0)

    out = loop.start()

    assert report(out, "worker.spawn_failed").fields["reason"] == SPAWN_FAILURE
    assert report(out, "generation.failed").fields["reason"] == SPAWN_FAILURE
    assert loop.exits == [act.Exit(code=EXIT_NEVER_READY, reason=SPAWN_FAILURE)]


def test_first_generation_last_slot_spawn_failure_stops_the_others() -> None:
    loop = FakeLoop(make_policy(workers=2))
    loop.fail_spawn(1, 1)

    out = loop.start()

    (p0,) = loop.pids(1)
    assert report(out, "generation.failed").fields["reason"] == SPAWN_FAILURE
    assert of_type(out, act.SendSignal) == [act.SendSignal(pid=p0, signal=STOP)]
    assert not loop.exits
    loop.exit(p0)
    assert [e.code for e in loop.exits] == [EXIT_NEVER_READY]


# -- reloads --------------------------------------------------------------------------------


def test_reload_success_drains_the_old_generation_once() -> None:
    loop = started(workers=2)
    old = loop.pids(1)

    out = loop.reload()

    assert names(out)[:2] == ["reload.requested", "generation.started"]
    assert report(out, "reload.requested").fields == {"source": "SIGHUP", "gen": 2}
    assert spawns(out) == [(2, 0), (2, 1)]
    assert loop.master_state() is MasterState.RELOADING
    new = loop.pids(2)

    assert not of_type(loop.ready(new[0]), act.SendSignal), "old keeps serving until all ready"
    loop.advance(5)
    out = loop.ready(new[1])

    assert names(out) == [
        "worker.ready",
        "generation.active",
        "generation.draining",
        "reload.succeeded",
    ]
    assert report(out, "generation.draining").fields == {
        "gen": 1,
        "reason": "replaced",
        "signal": "SIGTERM",
    }
    assert report(out, "reload.succeeded").fields == {"gen": 2, "duration_s": 5.0}
    assert of_type(out, act.SendSignal) == [act.SendSignal(pid=p, signal=STOP) for p in old]
    drains = [(t.key, t.delay_s) for t in of_type(out, act.StartTimer)]
    assert drains == [(TimerKey(TimerKind.DRAIN, p), 30.0) for p in old]
    assert loop.master_state() is MasterState.RUNNING
    assert loop.gen_state(1) is GenerationState.DRAINING
    assert loop.gen_state(2) is GenerationState.ACTIVE
    assert loop.machine.last_reload is not None
    assert loop.machine.last_reload.ok

    out = loop.exit(old[0])
    assert report(out, "worker.exited").fields["expected"] is True
    assert report(out, "worker.exited").level == "info"
    assert "generation.gone" not in names(out)
    out = loop.exit(old[1])
    assert report(out, "generation.gone").fields == {"gen": 1}
    assert loop.gen_state(1) is GenerationState.GONE
    assert all(len(loop.stop_signals(p)) == 1 for p in old)
    assert not of_type(loop.log, act.KillTree)
    assert not loop.stop_signals(new[0])
    assert not loop.stop_signals(new[1])
    assert len(loop.timers) == 0


def _fail_by_exit(loop: FakeLoop) -> str:
    pid = loop.pids(2)[0]
    loop.exit(pid, code=1)
    return f"worker 0 (pid {pid}) exited 1 before it was ready"


def _fail_by_signal(loop: FakeLoop) -> str:
    pid = loop.pids(2)[1]
    loop.exit(pid, sig=signal.SIGSEGV)
    return f"worker 1 (pid {pid}) killed by SIGSEGV before it was ready"


def _fail_by_timeout(loop: FakeLoop) -> str:
    loop.ready(loop.pids(2)[0])
    loop.advance(60)
    return f"worker 1 (pid {loop.pid(2, 1)}) not ready after 60 s"


@pytest.mark.parametrize("fail", [_fail_by_exit, _fail_by_signal, _fail_by_timeout])
def test_reload_failure_keeps_the_old_generation_untouched(
    fail: Callable[[FakeLoop], str],
) -> None:
    loop = started(workers=2)
    old = loop.pids(1)
    loop.reload()
    start = len(loop.log)

    reason = fail(loop)
    out = loop.log[start:]

    assert report(out, "reload.failed").fields["reason"] == reason
    assert report(out, "reload.failed").level == "error"
    failed = report(out, "generation.failed").fields
    assert (failed["gen"], failed["reason"]) == (2, reason)
    assert f"worker {failed['worker']} (pid {failed['pid']})" in reason  # who: for its output
    targets = {a.pid for a in loop.log if isinstance(a, act.SendSignal | act.KillTree)}
    assert not targets & set(old), "the old generation must not be signalled"
    assert targets == set(loop.pids(2)), "the failed generation's live workers are stopped"
    assert loop.gen_state(1) is GenerationState.ACTIVE
    assert loop.gen_state(2) is GenerationState.FAILED
    assert loop.master_state() is MasterState.RUNNING
    assert loop.machine.last_reload is not None
    assert not loop.machine.last_reload.ok
    assert loop.machine.last_reload.reason == reason

    out = loop.exit_all(loop.pids(2))
    assert report(out, "generation.gone").fields == {"gen": 2}
    assert loop.gen_state(1) is GenerationState.ACTIVE
    assert not loop.exits
    assert not of_type(loop.log, act.KillTree)


def test_reload_failure_by_spawn_failure_keeps_the_old_generation() -> None:
    loop = started(workers=2)
    old = loop.pids(1)
    loop.fail_spawn(2, 1)

    out = loop.reload()

    assert report(out, "worker.spawn_failed").fields == {
        "gen": 2,
        "worker": 1,
        "reason": SPAWN_FAILURE,
    }
    assert report(out, "reload.failed").fields["reason"] == SPAWN_FAILURE
    assert of_type(out, act.SendSignal) == [act.SendSignal(pid=loop.pid(2, 0), signal=STOP)]
    assert loop.gen_state(1) is GenerationState.ACTIVE
    assert not {a.pid for a in of_type(loop.log, act.SendSignal)} & set(old)


@pytest.mark.parametrize("first", [True, False], ids=["first-generation", "reload"])
def test_spawn_failure_of_an_early_slot_stops_the_later_slots(first: bool) -> None:
    if first:
        loop = FakeLoop(make_policy(workers=2))
        loop.fail_spawn(1, 0)
        loop.start()
        gen = 1
    else:
        loop = started(workers=2)
        loop.fail_spawn(2, 0)
        loop.reload()
        gen = 2

    later = loop.pid(gen, 1)
    assert loop.stop_signals(later), "the worker forked after the failure is stopped"
    loop.exit(later)
    assert loop.gen_state(gen) is GenerationState.GONE
    if first:
        assert [e.code for e in loop.exits] == [EXIT_NEVER_READY]
    else:
        assert loop.gen_state(1) is GenerationState.ACTIVE


def test_rescue_comes_with_a_replaced_workers_stop_signal_not_with_the_masters_stop() -> None:
    policy = dataclasses.replace(make_policy(workers=2), rescue_keepalive=True)
    loop = serving_with(policy)
    old = loop.pids(1)
    loop.reload()
    out: list[act.Action] = []
    for pid in loop.pids(2):
        out += loop.ready(pid)
    signals = of_type(out, act.SendSignal)
    assert signals == [act.SendSignal(pid=p, signal=STOP, rescue=True) for p in old]

    out = loop.stop()
    assert {s.rescue for s in of_type(out, act.SendSignal)} == {False}
    assert of_type(out, act.SendSignal), "the serving workers were signalled"


def test_reloads_during_a_reload_coalesce_into_one() -> None:
    loop = started(workers=1)
    loop.reload()

    queued = [loop.reload(source=f"client-{n}") for n in range(5)]

    assert [report(out, "reload.queued").fields["coalesced"] for out in queued] == [
        False,
        True,
        True,
        True,
        True,
    ]
    assert not any(spawns(out) for out in queued)

    out = loop.ready(loop.pid(2, 0))
    assert "reload.succeeded" in names(out)
    assert report(out, "reload.requested").fields == {"source": "queued", "gen": 3}
    assert spawns(out) == [(3, 0)]
    assert loop.master_state() is MasterState.RELOADING

    out = loop.ready(loop.pid(3, 0))
    assert "reload.succeeded" in names(out)
    assert not spawns(out)
    assert loop.master_state() is MasterState.RUNNING
    assert sorted({gen for gen, _ in spawns(loop.log)}) == [1, 2, 3]


def test_queued_reload_runs_after_a_failed_reload() -> None:
    loop = started(workers=1)
    loop.reload()
    loop.reload()

    out = loop.exit(loop.pid(2, 0), code=1)

    assert names(out).index("reload.failed") < names(out).index("reload.requested")
    assert spawns(out) == [(3, 0)]
    assert loop.gen_state(1) is GenerationState.ACTIVE
    assert loop.gen_state(3) is GenerationState.STARTING


def test_reload_while_the_first_generation_starts_is_queued() -> None:
    loop = FakeLoop(make_policy(workers=1))
    loop.start()

    out = loop.reload()

    assert report(out, "reload.queued").fields == {"source": "SIGHUP", "coalesced": False}
    assert not spawns(out)
    assert loop.master_state() is MasterState.STARTING


def test_reload_queued_during_the_first_start_runs_once_it_is_ready() -> None:
    loop = FakeLoop(make_policy(workers=1))
    loop.start()
    loop.reload()

    out = loop.ready(loop.pid(1, 0))

    assert "master.ready" in names(out)
    assert spawns(out) == [(2, 0)]
    assert loop.master_state() is MasterState.RELOADING


# -- draining -------------------------------------------------------------------------------


def test_drain_timeout_kills_the_tree_once_and_never_resends_the_stop_signal() -> None:
    loop = started(workers=1, drain_timeout_s=30)
    (old,) = loop.pids(1)
    loop.reload()
    loop.ready(loop.pid(2, 0))
    assert len(loop.stop_signals(old)) == 1

    assert not loop.advance(29.9)
    out = loop.advance(0.1)

    assert of_type(out, act.KillTree) == [act.KillTree(pid=old)]
    killed = report(out, "worker.killed")
    assert killed.fields["reason"] == "still running 30 s after the stop signal"
    assert killed.level == "warning"
    assert not of_type(out, act.SendSignal)

    assert not loop.advance(1000), "no second kill, no second stop signal"
    out = loop.exit(old, sig=signal.SIGKILL)
    assert report(out, "worker.exited").fields["expected"] is True
    assert "generation.gone" in names(out)
    assert len(loop.stop_signals(old)) == 1
    assert len(of_type(loop.log, act.KillTree)) == 1


def test_exit_before_the_drain_timeout_cancels_it() -> None:
    loop = started(workers=1)
    (old,) = loop.pids(1)
    loop.reload()
    loop.ready(loop.pid(2, 0))

    out = loop.exit(old)

    assert act.CancelTimer(key=TimerKey(TimerKind.DRAIN, old)) in out
    assert not loop.advance(1000)


def test_unexpected_exit_of_a_draining_worker_is_not_respawned() -> None:
    loop = started(workers=1)
    (old,) = loop.pids(1)
    loop.reload()
    loop.ready(loop.pid(2, 0))

    out = loop.exit(old, code=1)

    assert report(out, "worker.exited").fields["expected"] is True
    assert not spawns(loop.advance(100))


# -- respawn --------------------------------------------------------------------------------

EXPECTED_DELAYS = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0, 30.0]


def test_crashing_worker_is_respawned_with_capped_backoff_then_reset_when_stable() -> None:
    loop = started(workers=1)
    respawn_key = TimerKey(TimerKind.RESPAWN, 1, 0)

    for crashes, delay in enumerate(EXPECTED_DELAYS, start=1):
        pid = loop.pid(1, 0)
        out = loop.exit(pid, code=1)
        event = "worker.crash_loop" if crashes >= 5 else "worker.respawn_scheduled"
        scheduled = report(out, event)
        assert scheduled.fields["crashes"] == crashes
        assert scheduled.fields["delay_s"] == pytest.approx(delay)
        assert scheduled.level == ("error" if crashes >= 5 else "warning")
        expected_ready = "after it was ready" if crashes == 1 else "before it was ready"
        assert str(scheduled.fields["reason"]).endswith(expected_ready)
        timers = of_type(out, act.StartTimer)
        assert [t.key for t in timers] == [respawn_key]
        assert timers[0].delay_s == pytest.approx(delay)

        assert not spawns(loop.advance(delay * 0.99))
        out = loop.advance(delay * 0.01)
        assert spawns(out) == [(1, 0)]
        assert loop.pid(1, 0) != pid

    assert loop.gen_state(1) is GenerationState.ACTIVE
    assert loop.master_state() is MasterState.RUNNING
    assert not loop.exits
    assert not loop.stop_signals()

    # Becoming ready is not enough: dying soon after still counts as a crash in a row.
    assert names(loop.ready(loop.pid(1, 0))) == ["worker.ready"]
    out = loop.exit(loop.pid(1, 0), code=1)
    assert report(out, "worker.crash_loop").fields["crashes"] == len(EXPECTED_DELAYS) + 1
    loop.advance(30)

    # A replacement that stays up for stable_after_s starts the backoff afresh.
    loop.ready(loop.pid(1, 0))
    loop.advance(10)
    out = loop.exit(loop.pid(1, 0), code=1)
    scheduled = report(out, "worker.respawn_scheduled")
    assert scheduled.fields["crashes"] == 1
    assert scheduled.fields["delay_s"] == pytest.approx(0.1)


def test_respawn_spawn_failure_backs_off_too() -> None:
    loop = started(workers=1)
    loop.exit(loop.pid(1, 0), code=1)
    loop.fail_spawn(1, 0, times=2)

    out = loop.advance(0.1)
    assert report(out, "worker.spawn_failed").fields["reason"] == SPAWN_FAILURE
    assert report(out, "worker.respawn_scheduled").fields["delay_s"] == pytest.approx(0.2)
    out = loop.advance(0.2)
    assert report(out, "worker.respawn_scheduled").fields["delay_s"] == pytest.approx(0.4)
    out = loop.advance(0.4)
    assert spawns(out) == [(1, 0)]
    assert loop.gen_state(1) is GenerationState.ACTIVE


def test_pending_respawn_is_cancelled_when_its_generation_drains() -> None:
    loop = started(workers=2)
    crashed, survivor = loop.pids(1)
    loop.exit(crashed, code=1)
    loop.advance(0.05)
    loop.reload()

    first, second = loop.pids(2)
    loop.ready(first)
    out = loop.ready(second)

    assert act.CancelTimer(key=TimerKey(TimerKind.RESPAWN, 1, 0)) in out
    assert of_type(out, act.SendSignal) == [act.SendSignal(pid=survivor, signal=STOP)]
    out = loop.exit(survivor)
    assert "generation.gone" in names(out)
    assert not spawns(loop.advance(100))


def test_respawned_worker_not_ready_in_time_is_stopped_and_retried() -> None:
    loop = started(workers=1, ready_timeout_s=60)
    loop.exit(loop.pid(1, 0), code=1)
    loop.advance(0.1)
    respawned = loop.pid(1, 0)

    out = loop.advance(60)

    assert report(out, "worker.not_ready").fields["pid"] == respawned
    assert of_type(out, act.SendSignal) == [act.SendSignal(pid=respawned, signal=STOP)]
    assert loop.gen_state(1) is GenerationState.ACTIVE
    assert "generation.failed" not in names(out)
    # Its slot is respawned only once it has exited: never two workers in one slot.
    assert not spawns(loop.advance(5))
    out = loop.exit(respawned)
    scheduled = report(out, "worker.respawn_scheduled")
    assert scheduled.fields["crashes"] == 2
    assert "not ready after 60 s" in str(scheduled.fields["reason"])
    assert spawns(loop.advance(0.2)) == [(1, 0)]


@pytest.mark.parametrize("then", ["stop", "reload"])
def test_worker_stopped_for_missing_its_ready_timeout_is_not_signalled_again(then: str) -> None:
    loop = started(workers=1, ready_timeout_s=60)
    loop.exit(loop.pid(1, 0), code=1)
    loop.advance(0.1)
    respawned = loop.pid(1, 0)
    loop.advance(60)
    assert len(loop.stop_signals(respawned)) == 1

    if then == "stop":
        out = loop.stop()
    else:
        loop.reload()
        out = loop.ready(loop.pid(2, 0))

    assert "generation.draining" in names(out)
    assert len(loop.stop_signals(respawned)) == 1
    out = loop.exit(respawned)
    assert "generation.gone" in names(out)
    assert not spawns(loop.advance(100))


def test_a_draining_worker_keeps_its_generation_alive() -> None:
    loop = started(workers=1, ready_timeout_s=60, drain_timeout_s=30)
    loop.exit(loop.pid(1, 0), code=1)
    loop.advance(0.1)  # respawn A
    draining = loop.pid(1, 0)
    loop.advance(60)  # A not ready: stop signal to A; no respawn while it drains
    assert loop.pid(1, 0) == draining
    loop.stop()

    assert not loop.exits, "Exit while the draining worker is still alive"
    loop.exit(draining)
    assert [e.code for e in loop.exits] == [EXIT_OK]


# -- stopping -------------------------------------------------------------------------------


def test_graceful_stop_while_running_drains_then_exits_0() -> None:
    loop = started(workers=2)
    pids = loop.pids(1)

    out = loop.stop()

    assert report(out, "master.stopping").fields == {
        "fast": False,
        "reason": "stop requested (SIGTERM)",
    }
    assert report(out, "generation.draining").fields["reason"] == "stopping"
    assert of_type(out, act.SendSignal) == [act.SendSignal(pid=p, signal=STOP) for p in pids]
    assert not of_type(out, act.KillTree)
    assert not loop.exits

    loop.exit(pids[0])
    assert not loop.exits
    out = loop.exit(pids[1])
    assert names(out)[-1] == "generation.gone"
    assert out[-1] == act.Exit(code=EXIT_OK, reason="stop requested (SIGTERM)")
    assert loop.alive_at_exit == set()


def test_graceful_stop_during_a_reload_drains_both_and_cancels_the_reload() -> None:
    loop = started(workers=2)
    loop.reload()
    loop.ready(loop.pid(2, 0))
    everyone = sorted(loop.alive)

    out = loop.stop(source="SIGTERM")

    failed = report(out, "reload.failed")
    assert "cancelled" in str(failed.fields["reason"])
    assert failed.fields["gen"] == 2
    drained = {
        r.fields["gen"] for r in of_type(out, act.Report) if r.event == "generation.draining"
    }
    assert drained == {1, 2}
    assert sorted(s.pid for s in of_type(out, act.SendSignal)) == everyone
    assert not of_type(out, act.KillTree)
    assert not spawns(out)
    assert loop.master_state() is MasterState.STOPPING

    for pid in everyone[:-1]:
        loop.exit(pid)
        assert not loop.exits
    loop.exit(everyone[-1])
    assert [e.code for e in loop.exits] == [EXIT_OK]
    assert all(len(loop.stop_signals(p)) == 1 for p in everyone)
    assert not loop.machine.generations


def test_graceful_stop_while_the_first_generation_starts() -> None:
    loop = FakeLoop(make_policy(workers=2))
    loop.start()

    out = loop.stop()

    assert "reload.failed" not in names(out)
    assert sorted(s.pid for s in of_type(out, act.SendSignal)) == loop.pids(1)
    # READY=1 from a worker already told to stop changes nothing.
    assert not loop.ready(loop.pid(1, 0))
    loop.exit_all(loop.pids(1))
    assert [e.code for e in loop.exits] == [EXIT_OK]


def test_graceful_stop_during_a_reload_with_one_queued() -> None:
    loop = started(workers=1)
    loop.reload()
    loop.reload()

    out = loop.stop()

    assert not spawns(out)
    assert "reload.failed" in names(out)
    loop.exit_all(sorted(loop.alive))
    assert [e.code for e in loop.exits] == [EXIT_OK]


def test_workers_ignoring_a_graceful_stop_are_killed_after_the_drain_timeout() -> None:
    loop = started(workers=2, drain_timeout_s=10)
    pids = loop.pids(1)
    loop.stop()

    out = loop.advance(10)

    assert of_type(out, act.KillTree) == [act.KillTree(pid=p) for p in pids]
    assert not loop.exits
    loop.exit_all(pids)
    assert [e.code for e in loop.exits] == [EXIT_OK]


def test_fast_stop_kills_every_worker_tree() -> None:
    loop = started(workers=2)
    loop.reload()  # gen 2 starting: its workers are killed too
    everyone = sorted(loop.alive)

    out = loop.stop(fast=True, source="SIGQUIT")

    assert report(out, "master.stopping").fields["fast"] is True
    assert sorted(k.pid for k in of_type(out, act.KillTree)) == everyone
    assert names(out).count("worker.killed") == len(everyone)
    draining = [r for r in of_type(out, act.Report) if r.event == "generation.draining"]
    assert {r.fields["signal"] for r in draining} == {"SIGKILL"}
    assert not loop.exits

    assert not of_type(loop.advance(1000), act.KillTree), "each tree is killed once"
    loop.exit_all(everyone)
    assert [e.code for e in loop.exits] == [EXIT_OK]


def test_second_sigint_escalates_a_graceful_stop_to_kill() -> None:
    loop = started(workers=2)
    pids = loop.pids(1)

    out = loop.stop(source="SIGINT")
    assert not of_type(out, act.KillTree)

    out = loop.stop(source="SIGINT")
    assert report(out, "master.stopping").fields == {"fast": True, "source": "SIGINT"}
    assert of_type(out, act.KillTree) == [act.KillTree(pid=p) for p in pids]
    assert not of_type(out, act.SendSignal)

    assert not loop.stop(source="SIGINT"), "a third Ctrl-C adds nothing"
    assert not of_type(loop.advance(1000), act.KillTree), "the drain timer does not kill again"
    loop.exit_all(pids)
    assert [e.code for e in loop.exits] == [EXIT_OK]


def test_second_sigterm_does_not_escalate() -> None:
    loop = started(workers=1)
    loop.stop()

    assert not loop.stop()
    assert not of_type(loop.log, act.KillTree)


def test_quit_during_a_graceful_stop_escalates() -> None:
    loop = started(workers=1)
    loop.stop()

    out = loop.stop(fast=True, source="SIGQUIT")

    assert of_type(out, act.KillTree) == [act.KillTree(pid=loop.pid(1, 0))]


def test_reload_while_stopping_is_refused() -> None:
    loop = started(workers=1)
    loop.stop()

    out = loop.reload()

    refused = report(out, "reload.refused")
    assert refused.fields == {"source": "SIGHUP", "reason": "stopping"}
    assert refused.level == "warning"
    assert not spawns(out)
    out = loop.exit_all(loop.pids(1))
    assert not spawns(out)
    assert [e.code for e in loop.exits] == [EXIT_OK]


# -- readiness modes ------------------------------------------------------------------------


def test_delay_readiness_is_a_timer() -> None:
    loop = FakeLoop(make_policy(workers=1, ready=ReadySpec(mode=ReadyMode.DELAY, delay_s=1.5)))

    out = loop.start()

    pid = loop.pid(1, 0)
    assert act.StartTimer(key=TimerKey(TimerKind.READY_DELAY, pid), delay_s=1.5) in out
    assert not names(loop.advance(1.4))
    out = loop.advance(0.1)
    assert report(out, "worker.ready").fields["via"] == "delay"
    assert "master.ready" in names(out)
    assert len(loop.timers) == 0


def test_delay_readiness_accepts_an_earlier_ready_notification() -> None:
    loop = FakeLoop(make_policy(workers=1, ready=ReadySpec(mode=ReadyMode.DELAY, delay_s=5)))
    loop.start()
    pid = loop.pid(1, 0)

    out = loop.ready(pid)

    assert "master.ready" in names(out)
    assert act.CancelTimer(key=TimerKey(TimerKind.READY_DELAY, pid)) in out
    assert not loop.advance(10)


def test_exec_readiness_retries_the_probe_with_backoff_until_it_passes() -> None:
    loop = FakeLoop(make_policy(workers=1, ready=ReadySpec(mode=ReadyMode.EXEC, command="true")))

    out = loop.start()

    pid = loop.pid(1, 0)
    assert of_type(out, act.RunProbe) == [act.RunProbe(pid=pid, gen=GenId(1), slot=0)]
    expected = [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    for delay in expected:
        out = loop.feed(ev.ProbeFinished(pid=pid, ok=False, detail="exited 7"))
        (retry,) = of_type(out, act.StartTimer)
        assert retry.key == TimerKey(TimerKind.PROBE_RETRY, pid)
        assert retry.delay_s == pytest.approx(delay)
        assert report(out, "worker.probe_failed").fields == {"pid": pid, "detail": "exited 7"}
        assert not of_type(out, act.RunProbe), "no probe before the backoff"
        assert not of_type(loop.advance(delay * 0.99), act.RunProbe)
        assert of_type(loop.advance(delay * 0.01), act.RunProbe) == [
            act.RunProbe(pid=pid, gen=GenId(1), slot=0)
        ]

    out = loop.feed(ev.ProbeFinished(pid=pid, ok=True, detail="exited 0"))

    assert report(out, "worker.ready").fields["via"] == "exec"
    assert "master.ready" in names(out)
    assert act.CancelTimer(key=TimerKey(TimerKind.READY_TIMEOUT, pid)) in out
    assert len(loop.timers) == 0
    assert not loop.feed(ev.ProbeFinished(pid=pid, ok=True)), "a late probe result is ignored"
    assert not loop.feed(ev.ProbeFinished(pid=Pid(9999), ok=True))


def test_exec_probe_of_a_stopped_worker_is_cancelled() -> None:
    loop = FakeLoop(make_policy(workers=1, ready=ReadySpec(mode=ReadyMode.EXEC, command="true")))
    loop.start()
    pid = loop.pid(1, 0)

    out = loop.stop()

    assert act.CancelProbe(pid=pid) in out
    assert not loop.feed(ev.ProbeFinished(pid=pid, ok=True))


# -- notifications and forwarding ------------------------------------------------------------


def test_ready_for_an_unknown_pid_is_ignored() -> None:
    loop = FakeLoop(make_policy(workers=1))
    loop.start()

    assert loop.feed(ev.WorkerNotified(pid=Pid(9999), ready=True)) == []
    assert loop.gen_state(1) is GenerationState.STARTING


def test_duplicate_ready_is_harmless() -> None:
    loop = FakeLoop(make_policy(workers=2))
    loop.start()
    p0, p1 = loop.pids(1)

    assert names(loop.ready(p0)) == ["worker.ready"]
    assert loop.ready(p0) == []
    assert loop.gen_state(1) is GenerationState.STARTING, "one worker counted once"
    assert "generation.active" in names(loop.ready(p1))
    assert loop.ready(p1) == []
    assert loop.ready(p0) == []


def test_status_notification_is_recorded_on_the_worker() -> None:
    loop = FakeLoop(make_policy(workers=1))
    loop.start()
    pid = loop.pid(1, 0)

    assert loop.feed(ev.WorkerNotified(pid=pid, status="warming up")) == []

    worker = loop.machine.worker(pid)
    assert worker is not None
    assert worker.status == "warming up"
    assert worker.state is WorkerState.STARTING


def test_forwarded_signal_reaches_every_live_worker() -> None:
    loop = started(workers=2)
    loop.reload()
    everyone = sorted(loop.alive)

    out = loop.feed(ev.ForwardRequested(signal=signal.SIGUSR1))

    assert sorted(s.pid for s in of_type(out, act.SendSignal)) == everyone
    assert {s.signal for s in of_type(out, act.SendSignal)} == {signal.SIGUSR1}
    assert report(out, "signal.forwarded").fields == {"signal": "SIGUSR1"}


def test_exit_of_an_unknown_pid_is_a_bug() -> None:
    loop = started(workers=1)

    with pytest.raises(AssertionError, match="not a live worker"):
        loop.feed(ev.ChildExited(pid=Pid(9999), status=ExitStatus(code=0)))


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(0, 0.1), (1, 0.1), (2, 0.2), (3, 0.4), (9, 25.6), (10, 30.0), (1000, 30.0), (10**6, 30.0)],
)
def test_backoff_is_capped_exponential(attempt: int, expected: float) -> None:
    assert backoff(attempt, 0.1, 30.0) == pytest.approx(expected)


# -- --ready auto ------------------------------------------------------------------------------

AUTO = ReadySpec(mode=ReadyMode.AUTO)


def test_auto_scans_with_backoff_until_proc_shows_the_worker_accepting() -> None:
    loop = FakeLoop(make_policy(workers=1, ready=AUTO))
    out = loop.start()
    pid = loop.pid(1, 0)
    assert of_type(out, act.RunProbe) == [act.RunProbe(pid=pid, gen=GenId(1), slot=0)]
    for delay in [0.005, 0.01, 0.02, 0.04, 0.05, 0.05]:
        out = loop.feed(ev.ProbeFinished(pid=pid, ok=False, detail="accepting in 0 of 1"))
        (retry,) = of_type(out, act.StartTimer)
        assert (retry.key, retry.delay_s) == (
            TimerKey(TimerKind.PROBE_RETRY, pid),
            pytest.approx(delay),
        )
    detail = "accepting in 2 of 3 processes (epoll)"
    out = loop.feed(ev.ProbeFinished(pid=pid, ok=True, detail=detail))
    ready = report(out, "worker.ready")
    assert (ready.fields["via"], ready.fields["detail"]) == ("auto", detail)
    assert loop.master_state() is MasterState.RUNNING


def test_auto_takes_ready_1_only_once_proc_agrees() -> None:
    loop = FakeLoop(make_policy(workers=1, ready=AUTO))
    loop.start()
    pid = loop.pid(1, 0)
    loop.feed(ev.ProbeFinished(pid=pid, ok=False))

    # gunicorn's arbiter says READY=1 before its workers accept: scan now, do not trust it.
    out = loop.ready(pid)
    assert "worker.ready" not in names(out)
    assert act.RunProbe(pid=pid, gen=GenId(1), slot=0) in out
    grace = [t for t in of_type(out, act.StartTimer) if t.key.kind is TimerKind.NOTIFY_GRACE]
    assert [t.delay_s for t in grace] == [2.0]
    out = loop.feed(
        ev.ProbeFinished(pid=pid, ok=True, detail="accepting in 1 of 3 processes (epoll)")
    )
    assert report(out, "worker.ready").fields["via"] == "auto"
    assert act.CancelTimer(key=TimerKey(TimerKind.NOTIFY_GRACE, pid)) in out
    assert not names(loop.advance(5))


def test_auto_trusts_ready_1_when_proc_never_shows_anyone_accepting() -> None:
    loop = FakeLoop(make_policy(workers=1, ready=AUTO))
    loop.start()
    pid = loop.pid(1, 0)
    loop.ready(pid)
    assert "worker.ready" not in names(loop.advance(1.9))
    out = loop.advance(0.1)
    ready = report(out, "worker.ready")
    assert ready.fields["via"] == "notify"
    assert ready.fields["detail"] == "READY=1; no process seen accepting within 2 s"


def test_under_other_modes_ready_1_counts_at_once() -> None:
    loop = FakeLoop(make_policy(workers=1, ready=ReadySpec(mode=ReadyMode.DELAY, delay_s=30)))
    loop.start()
    out = loop.ready(loop.pid(1, 0))
    assert report(out, "worker.ready").fields["via"] == "notify"


def test_old_workers_are_taken_off_the_socket_before_the_stop_signal() -> None:
    loop = FakeLoop(make_policy(workers=1, settle_s=0.25))
    loop.start()
    old = loop.pid(1, 0)
    loop.ready(old)
    loop.reload()
    out = loop.ready(loop.pid(2, 0))
    assert act.DetachListeners(pid=old) in out
    assert not loop.stop_signals(old)
    assert not of_type(loop.advance(0.2), act.SendSignal)
    out = loop.advance(0.05)
    assert of_type(out, act.SendSignal) == [act.SendSignal(pid=old, signal=STOP)]
    assert TimerKey(TimerKind.DRAIN, old) in {t.key for t in of_type(out, act.StartTimer)}


def test_a_worker_that_exits_while_it_settles_gets_no_signal() -> None:
    loop = FakeLoop(make_policy(workers=1, settle_s=0.25))
    loop.start()
    old = loop.pid(1, 0)
    loop.ready(old)
    loop.reload()
    loop.ready(loop.pid(2, 0))
    out = loop.exit(old)
    assert act.CancelTimer(key=TimerKey(TimerKind.SETTLE, old)) in out
    assert not of_type(loop.advance(1), act.SendSignal)
    assert not loop.dead_targets


# -- scale ----------------------------------------------------------------------------------


def test_scale_up_spawns_the_new_slots_into_the_serving_generation() -> None:
    loop = started(workers=2)
    out = loop.feed(ev.ScaleRequested(source="control", workers=4))
    assert report(out, "master.scaled").fields == {"workers": 4, "was": 2, "source": "control"}
    assert spawns(out) == [(1, 2), (1, 3)]
    assert loop.machine.generations[GenId(1)].size == 4
    for pid in loop.pids(1)[2:]:
        loop.ready(pid)
    loop.reload()
    assert len(loop.pids(2)) == 4  # later generations have the new size too


def test_scale_down_drains_the_highest_slots_and_does_not_respawn_them() -> None:
    loop = started(workers=3)
    keep, also_keep, highest = (loop.pid(1, slot) for slot in range(3))
    out = loop.feed(ev.ScaleRequested(source="control", workers=2))
    assert act.DetachListeners(pid=highest) in out
    assert of_type(out, act.SendSignal) == [act.SendSignal(pid=highest, signal=STOP)]
    out = loop.exit(highest)
    assert report(out, "worker.exited").fields["expected"] is True
    assert not spawns(loop.advance(60))
    assert set(loop.pids(1)) == {keep, also_keep}


def test_ttin_and_ttou_change_the_count_by_one_and_never_below_one() -> None:
    loop = started(workers=1)
    loop.feed(ev.ScaleRequested(source="SIGTTIN", delta=1))
    assert loop.machine.workers_target == 2
    loop.feed(ev.ScaleRequested(source="SIGTTOU", delta=-1))
    out = loop.feed(ev.ScaleRequested(source="SIGTTOU", delta=-1))
    assert loop.machine.workers_target == 1
    assert report(out, "master.scaled").fields["was"] == 1


def test_a_generation_scaled_while_it_starts_is_resized_when_it_becomes_active() -> None:
    loop = started(workers=2)
    loop.reload()
    loop.feed(ev.ScaleRequested(source="control", workers=3))
    for pid in loop.pids(2):
        out = loop.ready(pid)
    assert "generation.resized" in names(out)
    assert (2, 2) in spawns(out)


def test_scale_is_refused_while_stopping() -> None:
    loop = started(workers=2)
    loop.stop()
    out = loop.feed(ev.ScaleRequested(source="control", workers=5))
    assert report(out, "scale.refused").fields["reason"] == "stopping"
    assert not spawns(out)
