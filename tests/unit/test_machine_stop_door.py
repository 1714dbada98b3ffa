"""A stop's listener steps in the supervisor machine: no new connection first, the workers
take what is queued through the settle, and the listeners close once nobody accepts.

Driven by ``FakeLoop`` (tests/unit/test_machine.py): fake pids, a fake clock.
"""

from __future__ import annotations

from collections.abc import Sequence

from handoff.core import actions as act
from tests.unit.test_machine import STOP, FakeLoop, make_policy, of_type, serving_with

SETTLE = 0.25


def serving(*, settle_s: float = SETTLE, workers: int = 2) -> FakeLoop:
    return serving_with(make_policy(workers=workers, settle_s=settle_s))


def steps(actions: Sequence[act.Action]) -> list[str]:
    """The listener and worker steps, in order, as short names."""
    named = []
    for action in actions:
        match action:
            case act.StopTakingConnections():
                named.append("door")
            case act.CloseListeners():
                named.append("close")
            case act.DetachListeners(pid=pid):
                named.append(f"detach {pid}")
            case act.SendSignal(pid=pid, signal=sig) if sig is STOP:
                named.append(f"signal {pid}")
    return named


def test_a_stop_shuts_the_door_keeps_the_workers_on_through_the_settle_then_closes() -> None:
    loop = serving()
    a, b = loop.pids(1)

    out = loop.stop()

    assert steps(out) == ["door"]  # nobody detached yet: the queue is still served
    out = loop.advance(SETTLE)
    assert steps(out) == [f"detach {a}", f"signal {a}", f"detach {b}", f"signal {b}", "close"]
    loop.exit_all([a, b])
    assert [e.code for e in loop.exits] == [0]
    assert len(of_type(loop.log, act.CloseListeners)) == 1


def test_a_reload_still_detaches_the_old_workers_at_once() -> None:
    loop = serving()
    old = loop.pids(1)
    loop.reload()

    out: list[act.Action] = []
    for pid in loop.pids(2):
        out += loop.ready(pid)

    assert steps(out) == [f"detach {pid}" for pid in old]
    assert steps(loop.advance(SETTLE)) == [f"signal {pid}" for pid in old]


def test_a_stop_during_a_reload_drain_closes_once_the_new_workers_are_off_too() -> None:
    loop = serving()
    loop.reload()
    for pid in loop.pids(2):
        loop.ready(pid)
    new = loop.pids(2)

    out = loop.stop()  # the old workers are settling, already off the socket

    assert steps(out) == ["door"]
    out = loop.advance(SETTLE)
    assert "close" in steps(out)
    assert steps(out).index("close") > max(steps(out).index(f"detach {pid}") for pid in new)


def test_without_a_settle_the_workers_leave_at_once_and_the_listeners_close() -> None:
    loop = serving(settle_s=0.0)
    a, b = loop.pids(1)

    out = loop.stop()

    assert steps(out) == [
        "door",
        f"detach {a}",
        f"signal {a}",
        f"detach {b}",
        f"signal {b}",
        "close",
    ]


def test_a_fast_stop_closes_the_listeners_as_it_kills() -> None:
    loop = serving()

    out = loop.stop(fast=True, source="SIGQUIT")

    assert steps(out)[0] == "door"
    assert steps(out)[-1] == "close"
    assert len(of_type(out, act.KillTree)) == 2


def test_a_worker_that_exits_during_the_settle_is_no_longer_waited_for() -> None:
    loop = serving(workers=1)
    (only,) = loop.pids(1)
    loop.stop()

    out = loop.exit(only, code=0)

    assert "close" in steps(out)
    assert not of_type(loop.advance(SETTLE), act.DetachListeners)
