"""Timers: a heap of named deadlines with replacement and lazy cancellation."""

from __future__ import annotations

from handoff.core.timers import TimerKey, TimerKind, Timers

A = TimerKey(TimerKind.READY_TIMEOUT, 100)
B = TimerKey(TimerKind.DRAIN, 100)
C = TimerKey(TimerKind.RESPAWN, 1, 2)
D = TimerKey(TimerKind.PROBE_RETRY, 101)


def test_empty() -> None:
    timers = Timers()

    assert timers.next_deadline() is None
    assert timers.pop_due(1e9) == []
    assert len(timers) == 0
    assert A not in timers


def test_keys_fire_in_deadline_order_not_start_order() -> None:
    timers = Timers()
    timers.start(A, 3.0)
    timers.start(B, 1.0)
    timers.start(C, 2.0)

    assert timers.next_deadline() == 1.0
    assert timers.pop_due(0.5) == []
    assert timers.pop_due(2.0) == [B, C]
    assert timers.next_deadline() == 3.0
    assert timers.pop_due(10.0) == [A]
    assert len(timers) == 0


def test_deadline_equal_to_now_is_due() -> None:
    timers = Timers()
    timers.start(A, 5.0)

    assert timers.pop_due(4.999) == []
    assert timers.pop_due(5.0) == [A]


def test_equal_deadlines_fire_in_start_order() -> None:
    timers = Timers()
    for key in (C, A, B):
        timers.start(key, 7.0)

    assert timers.pop_due(7.0) == [C, A, B]


def test_starting_a_key_again_replaces_its_deadline() -> None:
    timers = Timers()
    timers.start(A, 1.0)
    timers.start(B, 2.0)

    timers.start(A, 5.0)  # later: the old entry must not fire

    assert len(timers) == 2
    assert timers.next_deadline() == 2.0
    assert timers.pop_due(4.0) == [B]
    assert timers.pop_due(5.0) == [A]
    assert timers.pop_due(100.0) == []


def test_restarting_a_key_earlier_moves_it_forward() -> None:
    timers = Timers()
    timers.start(A, 10.0)
    timers.start(A, 1.0)

    assert timers.next_deadline() == 1.0
    assert timers.pop_due(1.0) == [A]
    assert timers.pop_due(10.0) == [], "the replaced entry is stale"


def test_restart_with_the_same_deadline_fires_once() -> None:
    timers = Timers()
    timers.start(A, 1.0)
    timers.start(A, 1.0)

    assert timers.pop_due(1.0) == [A]


def test_cancel() -> None:
    timers = Timers()
    timers.start(A, 1.0)
    timers.start(B, 2.0)

    timers.cancel(A)
    timers.cancel(A)  # cancelling twice, or an unknown key, is harmless
    timers.cancel(D)

    assert A not in timers
    assert B in timers
    assert len(timers) == 1
    assert timers.pop_due(10.0) == [B]


def test_cancel_then_start_again() -> None:
    timers = Timers()
    timers.start(A, 1.0)
    timers.cancel(A)
    timers.start(A, 3.0)

    assert timers.pop_due(2.0) == []
    assert timers.pop_due(3.0) == [A]


def test_next_deadline_skips_cancelled_and_replaced_entries() -> None:
    timers = Timers()
    timers.start(A, 1.0)
    timers.start(B, 2.0)
    timers.start(C, 3.0)
    timers.start(D, 4.0)

    timers.cancel(A)
    assert timers.next_deadline() == 2.0
    timers.start(B, 10.0)
    assert timers.next_deadline() == 3.0
    timers.cancel(C)
    timers.cancel(D)
    assert timers.next_deadline() == 10.0
    timers.cancel(B)
    assert timers.next_deadline() is None
    assert len(timers) == 0


def test_pop_due_removes_what_it_returns() -> None:
    timers = Timers()
    timers.start(A, 1.0)

    assert timers.pop_due(1.0) == [A]
    assert A not in timers
    timers.cancel(A)  # cancelling a fired key is harmless
    assert timers.pop_due(1.0) == []


def test_keys_differ_by_kind_ident_and_slot() -> None:
    timers = Timers()
    keys = [
        TimerKey(TimerKind.RESPAWN, 1, 0),
        TimerKey(TimerKind.RESPAWN, 1, 1),
        TimerKey(TimerKind.RESPAWN, 2, 0),
        TimerKey(TimerKind.DRAIN, 1),
    ]
    for deadline, key in enumerate(keys):
        timers.start(key, float(deadline))

    assert len(timers) == 4
    assert timers.pop_due(10.0) == keys
