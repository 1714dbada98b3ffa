"""Resuming the machine after a re-exec in place: snapshot, JSON round trip, takeover.

Each test drives a machine into a state, snapshots it (through JSON, as the master
passes it), and feeds ``Resumed`` to a fresh machine with the workers the "kernel"
still shows. The new machine must carry on as if nothing happened.
"""

from __future__ import annotations

import json

import pytest

from handoff.core import actions as act
from handoff.core import events as ev
from handoff.core.model import GenerationState, GenId, MasterState, Pid, WorkerState
from handoff.core.snapshot import (
    FoundWorker,
    MachineSnapshot,
    SnapshotError,
    snapshot_from_children,
)
from handoff.core.timers import TimerKey, TimerKind
from tests.unit.test_machine import FakeLoop, make_policy, names, of_type, spawns, started


def reexec(
    loop: FakeLoop, *, lose: set[Pid] | None = None, extra: dict[Pid, tuple[int, int]] | None = None
) -> FakeLoop:
    """The master re-executes: a fresh machine takes over from the snapshot."""
    snapshot = loop.machine.snapshot(loop.timers.deadlines())
    carried = MachineSnapshot.from_dict(json.loads(json.dumps(snapshot.to_dict())))
    assert carried == snapshot
    lose = lose or set()
    new = FakeLoop(loop.policy)
    new.now = loop.now
    new.spawned = dict(loop.spawned)
    new._next_pid = loop._next_pid
    for pid, where in (extra or {}).items():
        new.spawned[pid] = where
        new.alive.add(pid)
    new.alive |= loop.alive - lose
    found = tuple(
        FoundWorker(pid=pid, gen=GenId(new.spawned[pid][0]), slot=new.spawned[pid][1])
        for pid in sorted(new.alive)
    )
    new.feed(ev.Resumed(snapshot=carried, found=found, reason="crash"))
    return new


def states(loop: FakeLoop) -> dict[int, tuple[str, dict[int, str]]]:
    return {
        gen.id: (gen.state.value, {w.pid: w.state.value for w in gen.live_workers()})
        for gen in loop.machine.generations.values()
    }


def test_a_serving_master_resumes_with_nothing_to_do_and_reloads_afterwards() -> None:
    loop = started(2)
    before = states(loop)
    new = reexec(loop)
    resumed = new.log
    assert states(new) == before
    assert new.master_state() is MasterState.RUNNING
    assert spawns(resumed) == []
    assert of_type(resumed, act.SendSignal) == []
    assert names(resumed) == ["master.resumed"]
    new.reload()
    for pid in new.pids(2):
        new.ready(pid)
    assert new.gen_state(2) is GenerationState.ACTIVE
    assert new.gen_state(1) is GenerationState.DRAINING


def test_a_reload_in_progress_goes_on_after_the_re_exec() -> None:
    loop = started(2)
    loop.reload()
    first, second = loop.pids(2)
    loop.ready(first)
    new = reexec(loop)
    assert new.master_state() is MasterState.RELOADING
    assert new.machine.worker(first).state is WorkerState.READY  # type: ignore[union-attr]
    assert new.machine.worker(second).state is WorkerState.STARTING  # type: ignore[union-attr]
    # The ready timeout keeps its deadline: not restarted from zero.
    ready_timeout = TimerKey(TimerKind.READY_TIMEOUT, second)
    assert new.timers.deadlines()[ready_timeout] == loop.timers.deadlines()[ready_timeout]
    out = new.ready(second)
    assert "reload.succeeded" in names(out)
    assert new.gen_state(1) is GenerationState.DRAINING


def test_a_drain_keeps_its_deadline_across_the_re_exec() -> None:
    loop = started(1, drain_timeout_s=30.0)
    loop.reload()
    loop.ready(loop.pids(2)[0])
    old = loop.pids(1)[0]
    loop.advance(10)
    new = reexec(loop)
    assert new.machine.worker(old).state is WorkerState.SIGNALLED  # type: ignore[union-attr]
    assert of_type(new.log, act.SendSignal) == [], "the stop signal is never sent twice"
    assert [k.pid for k in of_type(new.advance(19.9), act.KillTree)] == []
    assert [k.pid for k in of_type(new.advance(0.2), act.KillTree)] == [old]


def test_a_worker_reaped_before_its_exit_was_handled_gets_its_slot_back() -> None:
    loop = started(2)
    lost = loop.pid(1, 1)
    new = reexec(loop, lose={lost})
    assert spawns(new.log) == [(1, 1)]
    assert new.machine.worker(lost) is None
    resumed = next(a for a in new.log if isinstance(a, act.Report) and a.event == "master.resumed")
    assert resumed.fields["lost"] == 1


def test_a_spawn_the_crash_cut_short_is_made_at_resume() -> None:
    loop = started(2)
    # The crash came between the machine asking for the worker and the loop forking it.
    loop.machine.generations[GenId(1)].spawning.add(2)
    loop.machine.generations[GenId(1)].size = 3
    loop.machine.workers_target = 3
    new = reexec(loop)
    assert spawns(new.log) == [(1, 2)]


def test_an_unlisted_child_joins_a_free_slot_or_is_drained() -> None:
    loop = started(2)
    duplicate = Pid(900)
    stranger = Pid(901)
    new = reexec(loop, extra={duplicate: (1, 0), stranger: (7, 0)})
    assert new.machine.worker(duplicate).state.stopping  # type: ignore[union-attr]
    assert new.machine.worker(stranger).state.stopping  # type: ignore[union-attr]
    assert new.gen_state(7) is GenerationState.DRAINING
    assert new.machine.generation_in(GenerationState.ACTIVE).id == 1  # type: ignore[union-attr]
    assert new.machine.generations[GenId(1)].ready_count() == 2
    resumed = next(a for a in new.log if isinstance(a, act.Report) and a.event == "master.resumed")
    assert resumed.fields["unlisted"] == 2


def test_a_stop_in_progress_goes_on_and_exits_with_its_code() -> None:
    loop = started(2)
    loop.stop()
    new = reexec(loop)
    assert new.master_state() is MasterState.STOPPING
    assert of_type(new.log, act.SendSignal) == []
    new.exit_all(new.pids(1))
    assert [e.code for e in new.exits] == [0]


def test_a_pending_respawn_keeps_its_backoff() -> None:
    loop = started(2)
    crashed = loop.pid(1, 0)
    loop.exit(crashed, code=1)
    key = TimerKey(TimerKind.RESPAWN, 1, 0)
    due = loop.timers.deadlines()[key]
    new = reexec(loop)
    assert spawns(new.log) == []
    assert new.timers.deadlines()[key] == due
    assert spawns(new.advance(due - new.now)) == [(1, 0)]


def test_the_first_start_goes_on_after_the_re_exec() -> None:
    policy = make_policy(workers=2)
    loop = FakeLoop(policy)
    loop.start()
    new = reexec(loop)
    assert new.master_state() is MasterState.STARTING
    assert spawns(new.log) == []
    out = [*new.ready(new.pids(1)[0]), *new.ready(new.pids(1)[1])]
    assert "master.ready" in names(out)


def test_without_a_snapshot_the_newest_generation_found_serves() -> None:
    found = [
        FoundWorker(pid=Pid(10), gen=GenId(3), slot=0),
        FoundWorker(pid=Pid(11), gen=GenId(3), slot=1),
        FoundWorker(pid=Pid(5), gen=GenId(2), slot=0),
    ]
    snapshot = snapshot_from_children(found, workers_target=2)
    loop = FakeLoop(make_policy(workers=2))
    loop.alive = {Pid(10), Pid(11), Pid(5)}
    loop.feed(ev.Resumed(snapshot=snapshot, found=tuple(found), reason="crash"))
    assert loop.master_state() is MasterState.RUNNING
    assert loop.gen_state(3) is GenerationState.ACTIVE
    assert loop.machine.worker(Pid(5)).state.stopping  # type: ignore[union-attr]
    assert spawns(loop.log) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": 99}, "snapshot format 99"),
        ({"state": "dancing"}, "state 'dancing' is unknown"),
        ({"workers_target": -1}, "workers_target is not a whole number"),
        ({"deadlines": [["drain", 1]]}, "a deadline is"),
        ({"generations": "x"}, "generations is not a list"),
    ],
)
def test_a_snapshot_that_does_not_fit_is_refused_with_the_reason(
    change: dict[str, object], message: str
) -> None:
    data = started(1).machine.snapshot({}).to_dict()
    data.update(change)
    with pytest.raises(SnapshotError, match=message):
        MachineSnapshot.from_dict(json.loads(json.dumps(data)))
