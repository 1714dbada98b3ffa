"""Records: exit statuses and their descriptions, generation views.

(How the kernel's wait results become ``ExitStatus`` is tested on real processes in
test_children.py.)
"""

from __future__ import annotations

import signal

import pytest

from handoff.core.model import (
    ExitStatus,
    Generation,
    GenerationState,
    GenId,
    Pid,
    Worker,
    WorkerState,
)


@pytest.mark.parametrize(
    ("status", "success"),
    [
        (ExitStatus(code=0), True),
        (ExitStatus(code=1), False),
        (ExitStatus(signal=signal.SIGTERM), False),
    ],
)
def test_success(status: ExitStatus, success: bool) -> None:
    assert status.success is success


@pytest.mark.parametrize(
    ("status", "text"),
    [
        (ExitStatus(code=0), "exited 0"),
        (ExitStatus(code=1), "exited 1"),
        (ExitStatus(code=3), "exited 3"),
        (ExitStatus(code=126), "exited 126 (command not executable?)"),
        (ExitStatus(code=127), "exited 127 (command not found?)"),
        (ExitStatus(signal=signal.SIGTERM), "killed by SIGTERM"),
        (ExitStatus(signal=signal.SIGSEGV), "killed by SIGSEGV"),
        (ExitStatus(signal=signal.SIGKILL), "killed by SIGKILL (out of memory?)"),
        (ExitStatus(signal=200), "killed by signal 200"),
    ],
)
def test_describe(status: ExitStatus, text: str) -> None:
    assert status.describe() == text


@pytest.mark.parametrize(
    ("status", "fields"),
    [
        (ExitStatus(code=0), {"exit_code": 0}),
        (ExitStatus(code=127), {"exit_code": 127}),
        (ExitStatus(signal=signal.SIGKILL), {"signal": "SIGKILL"}),
        (ExitStatus(signal=200), {"signal": 200}),
    ],
)
def test_as_fields(status: ExitStatus, fields: dict[str, object]) -> None:
    assert status.as_fields() == fields


def _worker(slot: int, pid: int, state: WorkerState) -> Worker:
    return Worker(gen=GenId(1), slot=slot, pid=Pid(pid), state=state, started_at=0.0)


def test_generation_views() -> None:
    gen = Generation(id=GenId(1), state=GenerationState.STARTING, size=3, started_at=0.0)
    gen.workers = {
        Pid(10): _worker(0, 10, WorkerState.READY),
        Pid(11): _worker(1, 11, WorkerState.STARTING),
        Pid(12): _worker(2, 12, WorkerState.SIGNALLED),
    }

    assert [w.pid for w in gen.live_workers()] == [10, 11, 12]
    assert gen.ready_count() == 1


def test_generation_records_do_not_share_state() -> None:
    one = Generation(id=GenId(1), state=GenerationState.STARTING, size=1, started_at=0.0)
    two = Generation(id=GenId(2), state=GenerationState.STARTING, size=1, started_at=0.0)

    one.workers[Pid(10)] = _worker(0, 10, WorkerState.READY)
    one.spawning.add(0)

    assert two.workers == {}
    assert two.spawning == set()
