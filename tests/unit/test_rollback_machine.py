"""The machine's rollback: a parked previous generation (--keep-previous), rollback by
reattach or by a restart of the previous release, automatic rollback on crashes and on
--verify failures, and a stop, a reload and a crash arriving in each of these states.

Driven through test_machine.py's ``FakeLoop`` (fake pids, a fake clock).
"""

from __future__ import annotations

import json
from dataclasses import replace

from handoff.core import actions as act
from handoff.core import events as ev
from handoff.core.machine_resume import snapshot
from handoff.core.model import GenerationState, GenId, MasterState, Pid, WorkerState
from handoff.core.snapshot import FoundWorker, MachineSnapshot
from handoff.core.timers import TimerKey, TimerKind
from tests.unit.test_machine import FakeLoop, make_policy, names, of_type, report, serving_with

KEEP_S = 30.0


def parked_loop(*, keep_s: float = KEEP_S, verify_s: float = 0.0, after: int = 3) -> FakeLoop:
    """Gen 1 parked, gen 2 serving (two workers each)."""
    policy = replace(
        make_policy(workers=2),
        keep_previous_s=keep_s,
        verify_interval_s=verify_s,
        rollback_after=after,
    )
    loop = serving_with(policy)
    loop.reload()
    for pid in loop.pids(2):
        loop.ready(pid)
    assert loop.master_state() is MasterState.RUNNING
    return loop


def workers_in(loop: FakeLoop, gen: int) -> list[WorkerState]:
    record = loop.machine.generation(GenId(gen))
    assert record is not None
    return [w.state for w in record.live_workers()]


def rollback(loop: FakeLoop) -> list[act.Action]:
    return loop.feed(ev.RollbackRequested(source="control"))


# -- parking -----------------------------------------------------------------------------


def test_a_reload_parks_the_previous_generation_off_the_socket_unsignalled() -> None:
    loop = parked_loop()

    assert loop.gen_state(1) is GenerationState.PARKED
    assert workers_in(loop, 1) == [WorkerState.PARKED, WorkerState.PARKED]
    detached = {a.pid for a in of_type(loop.log, act.DetachListeners)}
    assert detached == set(loop.pids(1))
    assert loop.stop_signals() == []
    parked = [a for a in loop.log if isinstance(a, act.Report) and a.event == "generation.parked"]
    assert parked[0].fields == {"gen": 1, "workers": 2, "keep_s": KEEP_S}
    record = loop.machine.generation(GenId(1))
    assert record is not None
    assert record.parked_until == loop.now + KEEP_S


def test_the_window_ends_the_parked_generation_drains_and_the_reload_is_confirmed() -> None:
    loop = parked_loop()
    old = loop.pids(1)

    out = loop.advance(KEEP_S)

    assert loop.gen_state(1) is GenerationState.DRAINING
    assert {s.pid for s in loop.stop_signals()} == set(old)
    confirmed = report(out, "reload.confirmed").fields
    assert confirmed["gen"] == 2
    assert confirmed["previous"] == 1
    assert confirmed["ended"] == "window"
    loop.exit_all(old)
    assert loop.gen_state(1) is GenerationState.GONE


def test_keep_previous_zero_drains_as_before() -> None:
    loop = parked_loop(keep_s=0.0)
    assert loop.gen_state(1) is GenerationState.DRAINING
    assert "generation.parked" not in names(loop.log)


def test_a_parked_worker_that_exits_is_not_respawned_and_the_generation_goes() -> None:
    loop = parked_loop()
    first, second = loop.pids(1)

    out = loop.exit(first, code=1)
    assert of_type(out, act.SpawnWorker) == []
    out = loop.exit(second, code=0)
    assert "generation.gone" in names(out)


def test_a_worker_whose_detach_failed_is_stopped_not_parked() -> None:
    loop = parked_loop()
    first, _ = loop.pids(1)

    out = loop.feed(ev.DetachFailed(pid=first, reason="signal-only detach: blocking accept"))

    assert report(out, "worker.not_parked").fields["pid"] == first
    assert [s.pid for s in loop.stop_signals()] == [first]
    assert workers_in(loop, 1) == [WorkerState.SIGNALLED, WorkerState.PARKED]


# -- manual rollback: reattach -----------------------------------------------------------


def test_rollback_puts_the_parked_workers_back_before_the_new_ones_come_off() -> None:
    loop = parked_loop()
    old, new = loop.pids(1), loop.pids(2)

    out = rollback(loop)

    reattached = [a.pid for a in of_type(out, act.ReattachListeners)]
    detached = [a.pid for a in of_type(out, act.DetachListeners)]
    assert reattached == old
    assert detached == new
    first_detach = out.index(of_type(out, act.DetachListeners)[0])
    assert all(out.index(a) < first_detach for a in of_type(out, act.ReattachListeners))
    assert loop.gen_state(1) is GenerationState.ACTIVE
    assert workers_in(loop, 1) == [WorkerState.READY, WorkerState.READY]
    assert loop.gen_state(2) is GenerationState.DRAINING
    rolled = report(out, "reload.rolled_back").fields
    assert rolled["gen"] == 2
    assert rolled["to"] == 1
    assert rolled["path"] == "reattach"
    assert report(out, "rollback.finished").fields["path"] == "reattach"
    assert of_type(out, act.SpawnWorker) == []


def test_a_second_rollback_is_refused_nothing_is_left_to_go_back_to() -> None:
    loop = parked_loop()
    rollback(loop)

    out = rollback(loop)

    assert "nothing to roll back to" in str(report(out, "rollback.refused").fields["reason"])


def test_a_slot_whose_parked_worker_is_gone_is_respawned_on_rollback() -> None:
    loop = parked_loop()
    first, _ = loop.pids(1)
    loop.exit(first, code=1)

    out = rollback(loop)

    assert [(a.gen, a.slot) for a in of_type(out, act.SpawnWorker)] == [(1, 0)]
    assert loop.gen_state(1) is GenerationState.ACTIVE


def test_a_worker_that_cannot_be_put_back_is_replaced_in_its_slot() -> None:
    loop = parked_loop()
    first, _ = loop.pids(1)
    rollback(loop)

    out = loop.feed(ev.ReattachFailed(pid=first, reason="0 of 1 registrations put back"))
    assert [a.pid for a in of_type(out, act.DetachListeners)] == [first]
    loop.exit(first)
    loop.advance(1)
    assert (1, 0) in [loop.spawned[p] for p in loop.pids(1)]


def test_rollback_during_a_reload_cancels_the_reload_the_serving_one_stays() -> None:
    loop = parked_loop()
    loop.reload()  # gen 3 starting
    assert loop.master_state() is MasterState.RELOADING

    out = rollback(loop)

    assert loop.gen_state(3) is GenerationState.DRAINING
    assert loop.gen_state(2) is GenerationState.ACTIVE
    assert loop.gen_state(1) is GenerationState.PARKED  # a second rollback goes back to it
    assert loop.master_state() is MasterState.RUNNING
    assert report(out, "reload.failed").fields["reason"] == "cancelled: rollback"
    rolled = report(out, "reload.rolled_back").fields
    assert (rolled["gen"], rolled["to"], rolled["path"]) == (3, 2, "cancel")
    assert report(rollback(loop), "reload.rolled_back").fields["path"] == "reattach"


# -- manual rollback: restart ------------------------------------------------------------


def test_without_a_parked_generation_rollback_restarts_the_previous_release() -> None:
    loop = parked_loop(keep_s=0.0)
    loop.exit_all(loop.pids(1))

    out = rollback(loop)

    rolled = report(out, "reload.rolled_back").fields
    assert rolled["path"] == "restart"
    assert rolled["to"] == 3
    assert loop.master_state() is MasterState.RELOADING
    record = loop.machine.generation(GenId(3))
    assert record is not None
    assert record.release_of == 1
    for pid in loop.pids(3):
        out = loop.ready(pid)
    assert loop.gen_state(2) is GenerationState.DRAINING  # drained, not parked
    finished = report(out, "rollback.finished").fields
    assert finished["ok"] is True
    assert finished["path"] == "restart"
    assert "nothing to roll back to" in str(
        report(rollback(loop), "rollback.refused").fields["reason"]
    )


def test_the_window_over_rollback_restarts_and_does_not_park_the_bad_one() -> None:
    loop = parked_loop()
    loop.advance(KEEP_S)
    loop.exit_all(loop.pids(1))

    rollback(loop)
    out: list[act.Action] = []
    for pid in loop.pids(3):
        out += loop.ready(pid)

    assert loop.gen_state(2) is GenerationState.DRAINING
    assert "generation.parked" not in names(out)


def test_a_failed_restart_leaves_the_serving_generation_serving() -> None:
    loop = parked_loop(keep_s=0.0)
    rollback(loop)
    first, _ = loop.pids(3)

    out = loop.exit(first, code=1)

    assert loop.gen_state(2) is GenerationState.ACTIVE
    assert loop.gen_state(3) is GenerationState.FAILED
    finished = report(out, "rollback.finished").fields
    assert finished["ok"] is False
    assert "rollback.refused" not in names(rollback(loop))  # the release is still there


def test_refusals_before_any_reload_while_restarting_and_while_stopping() -> None:
    loop = serving_with(replace(make_policy(), keep_previous_s=KEEP_S))
    assert "nothing to roll back to" in str(report(rollback(loop), "rollback.refused").fields)

    loop = parked_loop(keep_s=0.0)
    rollback(loop)
    assert "already in progress" in str(report(rollback(loop), "rollback.refused").fields)

    loop = parked_loop()
    loop.stop()
    assert "stopping" in str(report(rollback(loop), "rollback.refused").fields)


# -- automatic rollback ------------------------------------------------------------------


def test_crashes_of_the_new_generation_in_the_window_roll_back() -> None:
    loop = parked_loop(after=2)
    first, second = loop.pids(2)

    loop.exit(first, code=1)
    assert loop.gen_state(2) is GenerationState.ACTIVE
    out = loop.exit(second, code=1)

    rolled = report(out, "reload.rolled_back").fields
    assert rolled["source"] == "automatic"
    assert "2 worker crashes in the window" in str(rolled["reason"])
    assert loop.gen_state(1) is GenerationState.ACTIVE
    assert loop.gen_state(2) is GenerationState.GONE  # both crashed; no respawn now
    assert all(spawn.gen != 2 for spawn in of_type(loop.advance(5.0), act.SpawnWorker))


def test_crashes_in_the_window_during_a_new_reload_cancel_it_and_go_back() -> None:
    loop = parked_loop(after=2)
    loop.reload()  # gen 3 starting on top of gen 2, which then crash-loops
    first, second = loop.pids(2)
    loop.exit(first, code=1)

    out = loop.exit(second, code=1)

    assert report(out, "reload.failed").fields["reason"] == "cancelled: rollback"
    rolled = report(out, "reload.rolled_back").fields
    assert (rolled["gen"], rolled["to"], rolled["path"]) == (2, 1, "reattach")
    assert loop.gen_state(1) is GenerationState.ACTIVE
    assert loop.gen_state(3) is GenerationState.DRAINING


def test_crashes_after_the_window_only_respawn() -> None:
    loop = parked_loop(after=1)
    loop.advance(KEEP_S)

    out = loop.exit(loop.pids(2)[0], code=1)

    assert "reload.rolled_back" not in names(out)
    assert "worker.respawn_scheduled" in names(out)


def test_failed_verifications_in_a_row_roll_back_a_pass_resets_the_count() -> None:
    loop = parked_loop(verify_s=1.0, after=2)

    out = loop.advance(1.0)
    assert of_type(out, act.RunVerify) == [act.RunVerify(gen=GenId(2))]
    loop.feed(ev.VerifyFinished(gen=GenId(2), ok=False, detail="HTTP 500"))
    loop.advance(1.0)
    loop.feed(ev.VerifyFinished(gen=GenId(2), ok=True, detail="HTTP 200"))
    loop.advance(1.0)
    out = loop.feed(ev.VerifyFinished(gen=GenId(2), ok=False, detail="HTTP 500"))
    assert report(out, "verify.failed").fields["failures"] == 1
    loop.advance(1.0)
    out = loop.feed(ev.VerifyFinished(gen=GenId(2), ok=False, detail="HTTP 503"))

    rolled = report(out, "reload.rolled_back").fields
    assert "--verify failed 2 times in a row: HTTP 503" in str(rolled["reason"])
    assert loop.gen_state(1) is GenerationState.ACTIVE
    assert of_type(loop.advance(5.0), act.RunVerify) == []


def test_a_check_that_does_not_answer_counts_as_failed_and_its_late_answer_is_ignored() -> None:
    loop = parked_loop(verify_s=1.0, after=3)
    loop.advance(1.0)  # the first check starts

    out = loop.advance(loop.policy.verify_timeout_s)

    failed = report(out, "verify.failed").fields
    assert failed["detail"] == "the check gave no answer within 10 s"
    assert failed["failures"] == 1
    assert names(loop.feed(ev.VerifyFinished(gen=GenId(2), ok=True, detail="late"))) == []
    out = loop.advance(1.0)
    assert of_type(out, act.RunVerify) == [act.RunVerify(gen=GenId(2))]  # kills the hung one


def test_verification_stops_with_the_window() -> None:
    loop = parked_loop(verify_s=1.0)
    loop.advance(KEEP_S)
    checks = len(of_type(loop.log, act.RunVerify))

    loop.advance(10.0)

    assert len(of_type(loop.log, act.RunVerify)) == checks
    stale = loop.feed(ev.VerifyFinished(gen=GenId(2), ok=False, detail="late"))
    assert names(stale) == []


# -- other requests in each state ----------------------------------------------------------


def test_a_stop_in_the_window_signals_the_parked_workers_and_exits() -> None:
    loop = parked_loop()

    loop.stop()
    assert {s.pid for s in loop.stop_signals()} >= set(loop.pids(1))
    loop.exit_all(sorted(loop.alive))

    assert loop.exits
    assert loop.exits[0].code == 0


def test_a_reload_in_the_window_supersedes_the_parked_generation() -> None:
    loop = parked_loop()
    loop.reload()
    out: list[act.Action] = []
    for pid in loop.pids(3):
        out += loop.ready(pid)

    assert loop.gen_state(1) is GenerationState.DRAINING
    assert loop.gen_state(2) is GenerationState.PARKED
    assert loop.gen_state(3) is GenerationState.ACTIVE
    confirmed = report(out, "reload.confirmed").fields
    assert confirmed["ended"] == "superseded by generation 3"
    assert report(rollback(loop), "reload.rolled_back").fields["to"] == 2


def test_a_crash_while_restarting_counts_for_the_old_generation_only() -> None:
    loop = parked_loop(keep_s=0.0)
    rollback(loop)

    out = loop.exit(loop.pids(2)[0], code=1)  # the one we are rolling back from

    assert "worker.respawn_scheduled" in names(out)
    assert loop.master_state() is MasterState.RELOADING


# -- across a re-exec -----------------------------------------------------------------------


def test_a_re_exec_drains_the_parked_generation_and_keeps_the_release_to_restart() -> None:
    loop = parked_loop()
    written = json.dumps(snapshot(loop.machine, loop.timers.deadlines()).to_dict())
    snap = MachineSnapshot.from_dict(json.loads(written))
    assert snap.previous_release == 1
    found = tuple(
        FoundWorker(pid=pid, gen=loop.spawned[pid][0], slot=loop.spawned[pid][1])
        for pid in sorted(loop.alive)
    )
    resumed = FakeLoop(loop.policy)
    resumed.alive = set(loop.alive)
    resumed.spawned = dict(loop.spawned)

    out = resumed.feed(ev.Resumed(snapshot=snap, found=found, reason="crash"))

    assert resumed.gen_state(1) is GenerationState.DRAINING
    assert {s.pid for s in of_type(out, act.SendSignal)} == set(loop.pids(1))
    restart = report(resumed.feed(ev.RollbackRequested(source="control")), "reload.rolled_back")
    assert restart.fields["path"] == "restart"
    record = resumed.machine.generation(GenId(3))
    assert record is not None
    assert record.release_of == 1
    assert TimerKey(TimerKind.KEEP_PREVIOUS, 1) not in resumed.timers
    assert Pid(0) not in resumed.alive
