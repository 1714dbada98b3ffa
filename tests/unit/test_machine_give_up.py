"""--give-up-after in the supervisor machine: when every worker keeps crashing, exit 4.

Driven by ``FakeLoop`` (tests/unit/test_machine.py): fake pids, a fake clock.
"""

from __future__ import annotations

import dataclasses

from handoff.core.model import GenerationState, MasterState
from handoff.errors import EXIT_GAVE_UP
from handoff.formats.log_events import EventName
from handoff.master.health_server import not_ready
from tests.unit.test_machine import FakeLoop, make_policy, names, report, serving_with, spawns

LONG = 60.0  # past any respawn backoff


def serving(give_up_after: int, workers: int = 2) -> FakeLoop:
    """A loop with --give-up-after whose first generation (gen 1) serves."""
    return serving_with(
        dataclasses.replace(make_policy(workers=workers), give_up_after=give_up_after)
    )


def crash_slot(loop: FakeLoop, slot: int, times: int) -> list[str]:
    """The slot's worker dies `times` times in a row, each respawn never ready."""
    seen: list[str] = []
    for _ in range(times):
        if loop.master_state() is not MasterState.RUNNING:
            break
        seen += names(loop.exit(loop.pid(1, slot), code=1))
        seen += names(loop.advance(LONG))
    return seen


def test_every_worker_crashing_n_times_in_a_row_gives_up_with_exit_4() -> None:
    loop = serving(give_up_after=3)

    crash_slot(loop, 0, 3)
    assert loop.master_state() is MasterState.RUNNING  # slot 1 still serves
    crash_slot(loop, 1, 2)
    assert loop.master_state() is MasterState.RUNNING  # slot 1 crashed only twice
    out = loop.exit(loop.pid(1, 1), code=1)

    gave_up = report(out, EventName.MASTER_GAVE_UP)
    assert gave_up.level == "error"
    assert gave_up.fields["gen"] == 1
    assert str(gave_up.fields["reason"]).startswith("every worker crashed 3 times in a row")
    assert loop.master_state() is MasterState.STOPPING
    assert str(not_ready(loop.machine)).startswith("stopping: every worker crashed 3 times")
    loop.exit_all(loop.pids(1))
    loop.advance(LONG)
    assert [e.code for e in loop.exits] == [EXIT_GAVE_UP]


def test_a_ready_worker_keeps_the_master_from_giving_up() -> None:
    loop = serving(give_up_after=2, workers=2)

    crash_slot(loop, 0, 5)

    assert loop.master_state() is MasterState.RUNNING
    assert loop.gen_state(1) is GenerationState.ACTIVE
    assert not loop.exits


def test_off_by_default_the_crashing_workers_are_respawned_for_ever() -> None:
    loop = serving(give_up_after=0, workers=1)

    seen = crash_slot(loop, 0, 12)

    assert EventName.MASTER_GAVE_UP not in seen
    assert loop.master_state() is MasterState.RUNNING
    assert spawns(loop.log)[-1] == (1, 0)


def test_no_give_up_while_a_reload_may_bring_the_fix() -> None:
    loop = serving(give_up_after=2, workers=1)
    crash_slot(loop, 0, 1)
    loop.reload()
    assert loop.master_state() is MasterState.RELOADING

    loop.exit(loop.pid(1, 0), code=1)  # the second crash in a row, during the reload

    assert loop.master_state() is MasterState.RELOADING
    for pid in loop.pids(2):
        loop.ready(pid)
    assert loop.master_state() is MasterState.RUNNING
    assert loop.gen_state(2) is GenerationState.ACTIVE
    assert not loop.exits


def test_readyz_says_why_the_master_stops_when_the_first_generation_failed() -> None:
    loop = FakeLoop(make_policy(workers=1))
    loop.start()

    loop.exit(loop.pid(1, 0), code=1)

    assert loop.master_state() is MasterState.STOPPING
    reason = str(not_ready(loop.machine))
    assert reason.startswith("stopping: the first generation failed: worker 0 (pid "), reason
