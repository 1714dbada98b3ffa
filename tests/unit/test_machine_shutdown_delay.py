"""--shutdown-delay in the supervisor machine: LEAVING, its timer, a second stop, reloads.

Driven by ``FakeLoop`` (tests/unit/test_machine.py): fake pids, a fake clock.
"""

from __future__ import annotations

import dataclasses

import pytest

from handoff.core import actions as act
from handoff.core import events as ev
from handoff.core.model import GenerationState, MasterState
from handoff.core.timers import TimerKey, TimerKind
from handoff.errors import EXIT_OK
from handoff.formats.log_events import EventName
from handoff.master.health_server import not_ready
from handoff.master.systemd import messages_for, status_text
from tests.unit.test_machine import (
    STOP,
    FakeLoop,
    make_policy,
    names,
    of_type,
    report,
    serving_with,
    spawns,
)
from tests.unit.test_resume import reexec

DELAY = TimerKey(TimerKind.SHUTDOWN_DELAY, 0)


def serving(delay_s: float = 2.0, workers: int = 2) -> FakeLoop:
    """A loop with --shutdown-delay whose first generation (gen 1) serves."""
    policy = dataclasses.replace(make_policy(workers=workers), shutdown_delay_s=delay_s)
    return serving_with(policy)


def test_a_stop_leaves_first_and_the_workers_serve_for_the_delay() -> None:
    loop = serving(delay_s=2.0)
    pids = loop.pids(1)

    out = loop.stop()

    assert loop.master_state() is MasterState.LEAVING
    assert report(out, "master.leaving").fields == {
        "delay_s": 2.0,
        "reason": "stop requested (SIGTERM)",
    }
    assert "master.stopping" not in names(out)
    assert not of_type(out, act.SendSignal)
    assert loop.gen_state(1) is GenerationState.ACTIVE

    out = loop.advance(1.9)
    assert "master.stopping" not in names(out)
    assert loop.master_state() is MasterState.LEAVING

    out = loop.advance(0.1)
    assert report(out, "master.stopping").fields == {
        "fast": False,
        "reason": "stop requested (SIGTERM)",
    }
    assert loop.master_state() is MasterState.STOPPING
    assert of_type(out, act.SendSignal) == [act.SendSignal(pid=p, signal=STOP) for p in pids]
    loop.exit_all(pids)
    assert loop.exits == [act.Exit(code=EXIT_OK, reason="stop requested (SIGTERM)")]


@pytest.mark.parametrize(("source", "fast"), [("SIGTERM", False), ("control", False)])
def test_a_second_stop_skips_the_rest_of_the_delay(source: str, fast: bool) -> None:
    loop = serving(delay_s=30.0)
    loop.stop()
    loop.advance(1.0)

    out = loop.stop(source=source, fast=fast)

    assert act.CancelTimer(key=DELAY) in out
    assert report(out, "master.stopping").fields["reason"] == "stop requested (SIGTERM)"
    assert loop.master_state() is MasterState.STOPPING
    assert DELAY not in loop.timers
    loop.exit_all(loop.pids(1))
    assert [e.code for e in loop.exits] == [EXIT_OK]


def test_quit_during_the_delay_is_a_fast_stop() -> None:
    loop = serving(delay_s=30.0)
    pids = loop.pids(1)
    loop.stop()

    out = loop.stop(fast=True, source="SIGQUIT")

    assert of_type(out, act.KillTree) == [act.KillTree(pid=p) for p in pids]


def test_a_reload_during_the_delay_is_refused() -> None:
    loop = serving(delay_s=5.0)
    loop.stop()

    out = loop.reload()

    refused = report(out, "reload.refused")
    assert refused.fields == {
        "source": "SIGHUP",
        "reason": "leaving: the master stops after --shutdown-delay",
    }
    assert not spawns(out)
    assert loop.master_state() is MasterState.LEAVING
    out = loop.feed(ev.ScaleRequested(source="control", workers=4))
    assert report(out, "scale.refused").fields["reason"] == "leaving"


def test_a_stop_during_a_reload_cancels_it_and_the_old_generation_serves_on() -> None:
    loop = serving(delay_s=5.0)
    loop.reload()
    starting = loop.pids(2)

    out = loop.stop()

    assert "cancelled" in str(report(out, "reload.failed").fields["reason"])
    assert sorted(s.pid for s in of_type(out, act.SendSignal)) == starting
    assert loop.gen_state(1) is GenerationState.ACTIVE
    assert loop.master_state() is MasterState.LEAVING


def test_a_crashed_worker_is_still_respawned_during_the_delay() -> None:
    loop = serving(delay_s=60.0)
    loop.stop()
    crashed = loop.pid(1, 0)

    loop.exit(crashed, code=1)
    out = loop.advance(1.0)

    assert spawns(out) == [(1, 0)]


def test_without_a_serving_generation_the_stop_is_at_once() -> None:
    policy = dataclasses.replace(make_policy(workers=1), shutdown_delay_s=5.0)
    loop = FakeLoop(policy)
    loop.start()

    out = loop.stop()

    assert "master.leaving" not in names(out)
    assert loop.master_state() is MasterState.STOPPING


def test_a_fast_stop_skips_the_delay() -> None:
    loop = serving(delay_s=5.0)

    out = loop.stop(fast=True, source="SIGQUIT")

    assert "master.leaving" not in names(out)
    assert loop.master_state() is MasterState.STOPPING


def test_a_delay_of_0_stops_at_once() -> None:
    loop = serving(delay_s=0.0)

    out = loop.stop()

    assert "master.leaving" not in names(out)
    assert loop.master_state() is MasterState.STOPPING


def test_the_delay_goes_on_across_a_reexec() -> None:
    loop = serving(delay_s=4.0)
    loop.stop()
    loop.advance(1.5)

    new = reexec(loop)

    assert new.master_state() is MasterState.LEAVING
    assert new.timers.deadline(DELAY) == pytest.approx(4.0)
    out = new.advance(2.5)
    assert report(out, "master.stopping").fields["reason"] == "stop requested (SIGTERM)"
    new.exit_all(new.pids(1))
    assert [e.code for e in new.exits] == [EXIT_OK]


def test_leaving_is_shown_to_systemd_and_the_health_endpoint() -> None:
    loop = serving(delay_s=5.0)
    loop.stop()

    assert messages_for(EventName.MASTER_LEAVING, 1) == {"STOPPING": "1"}
    assert status_text(loop.machine) == (
        "leaving (shutdown delay, then drain): generation 1 serving, 2 of 2 workers ready"
    )
    assert not_ready(loop.machine) == "leaving: shutdown delay, the master stops soon"
