"""The machine's progressive reloads: --rollout batches (with and without --keep-previous),
a failing batch that puts the old generation back whole, reload --canary K with promote
and rollback, and a stop, a reload and a crash arriving in each of these states.

Driven through test_machine.py's ``FakeLoop`` (fake pids, a fake clock).
"""

from __future__ import annotations

import json
from dataclasses import replace

from handoff.core import actions as act
from handoff.core import events as ev
from handoff.core.machine_resume import snapshot
from handoff.core.model import GenerationState, GenId, MasterState, Pid, WorkerState
from handoff.core.policy import Policy
from handoff.core.snapshot import FoundWorker, MachineSnapshot
from tests.unit.test_machine import FakeLoop, make_policy, names, of_type, report, serving_with

WORKERS = 4


def policy(*, count: int = 1, percent: int = 0, keep_s: float = 0.0) -> Policy:
    return replace(
        make_policy(workers=WORKERS),
        rollout_count=count,
        rollout_percent=percent,
        keep_previous_s=keep_s,
    )


class CountingLoop(FakeLoop):
    """Records the most workers alive at once."""

    def __init__(self, policy: Policy) -> None:
        super().__init__(policy)
        self.most_alive = 0

    def _execute(self, action: act.Action) -> None:
        super()._execute(action)
        self.most_alive = max(self.most_alive, len(self.alive))


def serving(p: Policy) -> CountingLoop:
    loop = CountingLoop(p)
    loop.start()
    for pid in loop.pids(1):
        loop.ready(pid)
    loop.most_alive = len(loop.alive)
    return loop


def states(loop: FakeLoop, gen: int) -> list[WorkerState]:
    record = loop.machine.generation(GenId(gen))
    assert record is not None
    return sorted((w.state for w in record.live_workers()), key=str)


def ready_new(loop: FakeLoop, gen: int = 2) -> list[act.Action]:
    """Make every starting worker of gen ready; return what followed."""
    out: list[act.Action] = []
    for pid in loop.pids(gen):
        worker = loop.machine.worker(pid)
        if worker is not None and worker.state is WorkerState.STARTING:
            out += loop.ready(pid)
    return out


def exit_stopped(loop: FakeLoop, gen: int = 1) -> list[act.Action]:
    """The old generation's workers told to stop exit."""
    out: list[act.Action] = []
    for pid in loop.pids(gen):
        worker = loop.machine.worker(pid)
        if worker is not None and worker.state.stopping:
            out += loop.exit(pid)
    return out


# -- --rollout -------------------------------------------------------------------------------


def test_rollout_one_at_a_time_never_runs_more_than_workers_plus_one() -> None:
    loop = serving(policy(count=1))

    out = loop.reload()
    assert [a.slot for a in of_type(out, act.SpawnWorker)] == [0]
    assert report(out, "generation.started").fields["batch"] == 1
    for batch in range(WORKERS):
        out = ready_new(loop)
        if batch < WORKERS - 1:
            assert len(of_type(out, act.SpawnWorker)) == 0  # not before an old one exited
            out = exit_stopped(loop)
            assert "rollout.batch" in names(out)
    assert loop.gen_state(2) is GenerationState.ACTIVE
    exit_stopped(loop)

    assert loop.most_alive == WORKERS + 1
    assert loop.gen_state(1) is GenerationState.GONE
    assert report(loop.log, "reload.succeeded").fields["gen"] == 2


def test_rollout_takes_the_highest_old_slots_first() -> None:
    loop = serving(policy(count=1))
    old = {loop.spawned[p][1]: p for p in loop.pids(1)}
    loop.reload()

    out = ready_new(loop)

    assert [a.pid for a in of_type(out, act.DetachListeners)] == [old[WORKERS - 1]]


def test_a_percentage_batch_rounds_up() -> None:
    loop = serving(policy(count=0, percent=30))  # 30 % of 4: 2

    out = loop.reload()

    assert [a.slot for a in of_type(out, act.SpawnWorker)] == [0, 1]


def test_a_failing_third_batch_puts_the_parked_old_workers_back() -> None:
    loop = serving(policy(count=1, keep_s=60.0))
    old = loop.pids(1)
    loop.reload()
    ready_new(loop)  # batch 1 ready: one old parked, batch 2 at once (parked hold no slot)
    ready_new(loop)  # batch 2 ready: a second one parked, batch 3 asked for
    assert states(loop, 1).count(WorkerState.PARKED) == 2
    third = loop.pid(2, 2)

    out = loop.exit(third, code=1)  # the third batch fails

    assert "reload.failed" in names(out)
    assert sorted(a.pid for a in of_type(out, act.ReattachListeners)) == sorted(
        p for p in old if loop.spawned[p][1] >= WORKERS - 2
    )
    assert states(loop, 1) == [WorkerState.READY] * WORKERS
    assert report(out, "generation.restored").fields == {"gen": 1, "workers": 2}
    assert loop.gen_state(2) is GenerationState.FAILED
    assert loop.master_state() is MasterState.RUNNING


def test_a_failing_batch_without_parking_starts_the_old_slots_again() -> None:
    loop = serving(policy(count=1))
    loop.reload()
    ready_new(loop)
    exit_stopped(loop)  # one old worker drained and gone

    out = loop.exit(loop.pid(2, 1), code=1)

    assert [(a.gen, a.slot) for a in of_type(out, act.SpawnWorker)] == [(1, WORKERS - 1)]
    assert report(out, "generation.restored").fields == {"gen": 1, "workers": 1}


def test_rollback_during_a_rollout_undoes_it() -> None:
    loop = serving(policy(count=1, keep_s=60.0))
    loop.reload()
    ready_new(loop)

    out = loop.feed(ev.RollbackRequested(source="control"))

    assert report(out, "reload.rolled_back").fields["path"] == "cancel"
    assert states(loop, 1) == [WorkerState.READY] * WORKERS
    assert loop.gen_state(2) is GenerationState.DRAINING


def test_a_stop_during_a_rollout_drains_everything() -> None:
    loop = serving(policy(count=1, keep_s=60.0))
    loop.reload()
    ready_new(loop)

    loop.stop()
    loop.exit_all(sorted(loop.alive))

    assert loop.exits
    assert loop.exits[0].code == 0


def test_a_reload_during_a_rollout_is_queued_then_runs() -> None:
    loop = serving(policy(count=2))
    loop.reload()

    out = loop.reload()
    assert report(out, "reload.queued").fields["coalesced"] is False
    ready_new(loop)
    exit_stopped(loop)
    ready_new(loop)  # gen 2 complete: the queued reload starts gen 3
    assert loop.gen_state(3) is GenerationState.STARTING


def test_an_old_worker_crashing_during_a_rollout_is_respawned() -> None:
    loop = serving(policy(count=1))
    loop.reload()
    ready_new(loop)
    survivor = next(
        p for p in loop.pids(1) if (w := loop.machine.worker(p)) and w.state is WorkerState.READY
    )

    out = loop.exit(survivor, code=1)

    assert "worker.respawn_scheduled" in names(out)
    assert loop.master_state() is MasterState.RELOADING


# -- reload --canary --------------------------------------------------------------------------


def canary_loop(k: int = 1, **kwargs: float) -> CountingLoop:
    loop = serving(replace(policy(count=0), **kwargs))
    out = loop.feed(ev.ReloadRequested(source="control", canary=k))
    assert report(out, "generation.started").fields == {"gen": 2, "workers": k, "canary": True}
    return loop


def test_a_canary_serves_beside_the_old_generation_until_promoted() -> None:
    loop = canary_loop(1)

    out = ready_new(loop)

    assert report(out, "canary.ready").fields == {"gen": 2, "workers": 1, "beside": 1}
    assert loop.gen_state(1) is GenerationState.ACTIVE
    assert states(loop, 1) == [WorkerState.READY] * WORKERS  # nothing taken off
    assert loop.master_state() is MasterState.RELOADING
    assert of_type(out, act.DetachListeners) == []


def test_promote_completes_the_reload() -> None:
    loop = canary_loop(1)
    ready_new(loop)

    out = loop.feed(ev.PromoteRequested(source="control"))
    assert sorted(a.slot for a in of_type(out, act.SpawnWorker)) == [1, 2, 3]
    out = ready_new(loop)

    assert report(out, "reload.succeeded").fields["gen"] == 2
    assert loop.gen_state(1) is GenerationState.DRAINING


def test_promote_with_a_rollout_continues_in_batches() -> None:
    loop = canary_loop(1, rollout_count=1)
    ready_new(loop)

    out = loop.feed(ev.PromoteRequested(source="control"))

    assert [a.slot for a in of_type(out, act.SpawnWorker)] == [1]


def test_rollback_removes_the_canary() -> None:
    loop = canary_loop(1)
    ready_new(loop)
    canary = loop.pids(2)

    out = loop.feed(ev.RollbackRequested(source="control"))

    assert [a.pid for a in of_type(out, act.DetachListeners)] == canary
    assert loop.gen_state(2) is GenerationState.DRAINING
    assert loop.gen_state(1) is GenerationState.ACTIVE
    assert loop.master_state() is MasterState.RUNNING


def test_a_canary_that_crashes_fails_the_reload_the_old_one_serves_on() -> None:
    loop = canary_loop(1)
    ready_new(loop)

    out = loop.exit(loop.pids(2)[0], code=1)

    assert "reload.failed" in names(out)
    assert loop.gen_state(1) is GenerationState.ACTIVE


def test_promote_without_a_canary_and_a_canary_during_a_reload_are_refused() -> None:
    loop = serving(policy(count=0))
    refused = report(loop.feed(ev.PromoteRequested(source="control")), "promote.refused")
    assert "no canary" in str(refused.fields["reason"])

    loop.reload()
    out = loop.feed(ev.ReloadRequested(source="control", canary=1))
    assert "a reload is in progress" in str(report(out, "reload.refused").fields["reason"])


def test_a_reload_while_a_canary_waits_is_refused() -> None:
    loop = canary_loop(1)
    ready_new(loop)

    out = loop.reload()

    assert "a canary is waiting" in str(report(out, "reload.refused").fields["reason"])
    assert loop.gen_state(2) is GenerationState.STARTING


def test_a_stop_during_a_canary_drains_both() -> None:
    loop = canary_loop(2)
    ready_new(loop)

    loop.stop()
    loop.exit_all(sorted(loop.alive))

    assert loop.exits
    assert Pid(0) not in loop.alive


def test_a_canary_survives_a_re_exec_as_a_canary() -> None:

    loop = canary_loop(1)
    ready_new(loop)

    snap = MachineSnapshot.from_dict(
        json.loads(json.dumps(snapshot(loop.machine, loop.timers.deadlines()).to_dict()))
    )
    found = tuple(
        FoundWorker(pid=p, gen=loop.spawned[p][0], slot=loop.spawned[p][1]) for p in loop.alive
    )
    resumed = FakeLoop(loop.policy)
    resumed.alive, resumed.spawned = set(loop.alive), dict(loop.spawned)

    out = resumed.feed(ev.Resumed(snapshot=snap, found=found, reason="crash"))

    assert of_type(out, act.SpawnWorker) == []
    assert resumed.master_state() is MasterState.RELOADING
    record = resumed.machine.generation(GenId(2))
    assert record is not None
    assert record.canary
    assert "reload.succeeded" not in names(out)


def test_serving_with_is_unchanged_by_rollout_settings() -> None:
    loop = serving_with(policy(count=1))
    assert loop.master_state() is MasterState.RUNNING
