"""What the master tells systemd (master/systemd.py), and what reload --wait clients read
(master/reload_progress.py): pure functions of a report and the machine's state.

The machine is driven to each state with test_machine.py's ``FakeLoop``, so the state the
messages read is the state the real machine is in.
"""

from __future__ import annotations

import pytest

from handoff.core import actions as act
from handoff.core.model import GenId
from handoff.formats.log_events import EventName
from handoff.master.reload_progress import PROGRESS_EVENTS, progress_message
from handoff.master.systemd import messages_for, status_text
from tests.unit.test_machine import FakeLoop, make_policy


def serving_loop(workers: int = 2) -> FakeLoop:
    loop = FakeLoop(make_policy(workers=workers))
    loop.start()
    for pid in loop.pids(1):
        loop.ready(pid)
    return loop


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (EventName.MASTER_READY, {"READY": "1"}),
        (EventName.RELOAD_SUCCEEDED, {"READY": "1"}),
        (EventName.RELOAD_FAILED, {"READY": "1"}),  # a failed reload closes the cycle too
        (EventName.RELOAD_REQUESTED, {"RELOADING": "1", "MONOTONIC_USEC": "123456"}),
        (EventName.MASTER_STOPPING, {"STOPPING": "1"}),
        (EventName.GENERATION_ACTIVE, {}),
        (EventName.GENERATION_GONE, {}),
        (EventName.WORKER_EXITED, {}),
        (EventName.WORKER_READY, {}),
        (EventName.MASTER_SCALED, {}),
        (EventName.WORKER_SPAWNED, None),
        (EventName.RELOAD_QUEUED, None),
    ],
)
def test_each_report_announces_its_state_change(
    event: EventName, expected: dict[str, str] | None
) -> None:
    assert messages_for(event, 123456) == expected


def test_status_text_before_anything_serves() -> None:
    loop = FakeLoop(make_policy(workers=2))
    loop.start()

    assert status_text(loop.machine) == "no generation serving"


def test_status_text_counts_the_ready_workers_of_the_serving_generation() -> None:
    loop = serving_loop(workers=2)

    assert status_text(loop.machine) == "generation 1 serving, 2 of 2 workers ready"


def test_status_text_after_a_good_and_a_failed_reload() -> None:
    loop = serving_loop(workers=1)
    loop.reload()
    loop.advance(0.5)
    loop.ready(loop.pid(2, 0))

    assert status_text(loop.machine) == (
        "generation 2 serving, 1 of 1 workers ready; last reload: generation 2 ok in 0.5 s"
    )

    loop.reload()
    loop.exit(loop.pid(3, 0), code=1)

    text = status_text(loop.machine)
    assert text.startswith("generation 2 serving, 1 of 1 workers ready; last reload failed: ")
    assert "exited 1 before it was ready" in text


def test_reload_progress_counts_ready_workers_from_the_generation() -> None:
    loop = serving_loop(workers=1)
    loop.reload()
    out = loop.ready(loop.pid(2, 0))
    (ready,) = [a for a in out if isinstance(a, act.Report) and a.event is EventName.WORKER_READY]

    # Read after the handle that activated generation 2: its state, not a count of reports.
    assert progress_message(ready, loop.machine.generation(GenId(2))) == (
        "generation 2: 1 of 1 workers ready (notify)"
    )


def test_reload_progress_lines_for_each_event() -> None:
    loop = FakeLoop(make_policy(workers=2))
    out = loop.start()
    gen = loop.machine.generation(GenId(1))
    started = next(a for a in out if isinstance(a, act.Report))

    assert progress_message(started, gen) == "generation 1 started: 2 workers"

    out = loop.ready(loop.pid(1, 0))
    ready = next(a for a in out if isinstance(a, act.Report))
    assert progress_message(ready, gen) == "generation 1: 1 of 2 workers ready (notify)"

    out = loop.exit(loop.pid(1, 1), code=3)
    lines = [
        progress_message(a, gen)
        for a in out
        if isinstance(a, act.Report) and a.event in PROGRESS_EVENTS
    ]
    assert lines[0] == "generation 1: worker 1 exited 3"
    assert lines[1] == (
        f"generation 1 failed: worker 1 (pid {loop.pid(1, 1)}) exited 3 before it was ready"
    )


def test_reload_progress_ignores_other_events() -> None:
    report = act.Report(event=EventName.RELOAD_QUEUED, fields={"gen": 1})

    assert progress_message(report, None) is None


def test_a_ready_count_for_a_generation_already_gone_is_unknown() -> None:
    report = act.Report(
        event=EventName.WORKER_READY, fields={"gen": 9, "via": "auto", "detail": "epoll"}
    )

    assert progress_message(report, None) == "generation 9: ? of ? workers ready (auto: epoll)"
