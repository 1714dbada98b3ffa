"""master/probes.py ``Probes``: the ``auto`` scan's per-worker latch and warnings, and
``exec:`` probes keyed by their own pid, driven through the scripted ``FakeSystem`` and a
real selector (``Sources``)."""

from __future__ import annotations

import signal
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

import pytest
from structlog.testing import capture_logs

from handoff.core import events as ev
from handoff.core.model import ExitStatus, GenId, Pid
from handoff.formats.options import ReadyMode, ReadySpec, parse_bind
from handoff.formats.procfs import WaitKind
from handoff.master.probes import UNSEEABLE_FOR_S, Probes
from handoff.master.sources import Source, Sources
from handoff.system.accepting_scan import ProcUnreadable, TreeScan
from handoff.system.sockets import Listener, close_listeners, open_listeners
from tests.unit.fake_system import FakeSystem

pytestmark = pytest.mark.timeout(30)

WORKER, OTHER = Pid(500), Pid(501)


@dataclass
class ScriptedScans(FakeSystem):
    """A FakeSystem whose scans answer per worker: a TreeScan, or an exception."""

    answers: dict[Pid, TreeScan | Exception] = field(default_factory=dict)

    def scan(
        self, pid: Pid, inodes: Collection[int], addresses: object = None, *, tables: bool = True
    ) -> TreeScan:
        self._call("scan", pid)
        answer = self.answers[pid]
        if isinstance(answer, Exception):
            raise answer
        return answer


ACCEPTING = TreeScan(processes=2, accepting=1, kinds=frozenset({WaitKind.EPOLL}))


@pytest.fixture
def listeners() -> Iterator[list[Listener]]:
    opened = open_listeners((parse_bind("127.0.0.1:0"),), 16)
    yield opened
    close_listeners(opened)


@pytest.fixture
def sources() -> Iterator[Sources]:
    made = Sources()
    yield made
    made.close()


def probes_for(
    system: FakeSystem, sources: Sources, listeners: list[Listener], ready: ReadySpec
) -> Probes:
    return Probes(system, sources, ready, listeners, {"PATH": "/usr/bin:/bin"})


AUTO = ReadySpec(mode=ReadyMode.AUTO)
EXEC = ReadySpec(mode=ReadyMode.EXEC, command="true")


def test_an_unreadable_worker_leaves_auto_working_for_the_others(
    listeners: list[Listener], sources: Sources
) -> None:
    system = ScriptedScans(
        answers={WORKER: ProcUnreadable("cannot read /proc/500/fd"), OTHER: ACCEPTING}
    )
    probes = probes_for(system, sources, listeners, AUTO)

    with capture_logs() as logs:
        first = probes.run(WORKER, GenId(1), 0)
        other = probes.run(OTHER, GenId(1), 1)
        again = probes.run(WORKER, GenId(1), 0)

    assert first == ev.ProbeFinished(pid=WORKER, ok=False, detail="cannot read /proc/500/fd")
    assert other is not None
    assert other.ok
    assert again is not None
    assert not again.ok
    # The unreadable worker is not scanned again at once: only 2 scans of it, OTHER, none.
    assert [c for c in system.calls if c[0] == "scan"] == [("scan", WORKER), ("scan", OTHER)]
    [warning] = logs
    assert warning["event"] == "readiness.unavailable"
    assert warning["log_level"] == "warning"
    assert warning["pid"] == WORKER
    assert "READY=1 still counts" in str(warning["hint"])


def test_an_unreadable_worker_is_looked_at_again_later(
    listeners: list[Listener], sources: Sources
) -> None:
    system = ScriptedScans(answers={WORKER: ProcUnreadable("cannot read /proc/500/fd")})
    probes = probes_for(system, sources, listeners, AUTO)
    with capture_logs() as logs:
        probes.run(WORKER, GenId(1), 0)
        system.answers[WORKER] = ACCEPTING  # a uid change finished, a setuid helper exited
        system.now += UNSEEABLE_FOR_S + 0.01
        found = probes.run(WORKER, GenId(1), 0)

    assert found is not None
    assert found.ok
    assert [e["event"] for e in logs] == ["readiness.unavailable"]


def test_the_unavailable_warning_is_logged_once_per_master(
    listeners: list[Listener], sources: Sources
) -> None:
    unreadable = ProcUnreadable("cannot read")
    system = ScriptedScans(answers={WORKER: unreadable, OTHER: unreadable})
    probes = probes_for(system, sources, listeners, AUTO)
    with capture_logs() as logs:
        probes.run(WORKER, GenId(1), 0)
        probes.run(OTHER, GenId(1), 1)

    assert [e["event"] for e in logs] == ["readiness.unavailable"]


def test_skipped_and_blind_processes_are_warned_about_once_each(
    listeners: list[Listener], sources: Sources
) -> None:
    partial = TreeScan(
        processes=3,
        accepting=1,
        kinds=frozenset({WaitKind.EPOLL}),
        unreadable=(Pid(502),),
        blind=(Pid(503),),
    )
    system = ScriptedScans(answers={WORKER: partial, OTHER: partial})
    probes = probes_for(system, sources, listeners, AUTO)
    with capture_logs() as logs:
        found = probes.run(WORKER, GenId(1), 0)
        probes.run(OTHER, GenId(1), 1)

    assert found is not None
    assert found.ok
    assert [e["event"] for e in logs] == ["readiness.limited", "readiness.limited"]
    skipped, blind = logs
    assert "502" in str(skipped["reason"])
    assert "503" in str(blind["reason"])
    assert "ptrace_scope" in str(blind["hint"])


def test_a_late_exit_of_a_cancelled_probe_never_finds_the_wrong_probe(
    listeners: list[Listener], sources: Sources
) -> None:
    """A cancelled probe outlives its worker; the worker's pid is reused by a new worker
    that gets a probe of its own. Each exit reaches its own probe, and only the live one
    answers."""
    system = FakeSystem()
    probes = probes_for(system, sources, listeners, EXEC)
    try:
        assert probes.run(WORKER, GenId(1), 0) is None
        old = max(system.processes)
        probes.cancel(WORKER)
        assert probes.run(WORKER, GenId(2), 0) is None  # the pid, reused
        new = max(system.processes)
        assert sorted(probes.pids()) == [old, new]

        system.exit(old, ExitStatus(signal=signal.SIGKILL))
        [wakeup] = sources.wait(0)
        assert (wakeup.watch.source, wakeup.watch.pid) == (Source.PROBE, old)
        assert probes.on_exit(wakeup.watch.pid) is None  # cancelled: no answer
        assert probes.pids() == [new]

        system.exit(new, ExitStatus(code=0))
        [wakeup] = sources.wait(0)
        finished = probes.on_exit(wakeup.watch.pid)
        assert finished is not None
        assert (finished.pid, finished.ok) == (WORKER, True)
        assert probes.pids() == []
        assert probes.on_exit(old) is None  # a late event for an unknown probe
    finally:
        system.close()


def test_cancel_kills_only_the_workers_own_probe(
    listeners: list[Listener], sources: Sources
) -> None:
    system = FakeSystem()
    probes = probes_for(system, sources, listeners, EXEC)
    try:
        probes.run(WORKER, GenId(1), 0)
        workers_probe = max(system.processes)
        probes.run(OTHER, GenId(1), 1)
        probes.cancel(WORKER)
        probes.cancel(WORKER)  # once only
        kills = [c for c in system.calls if c[0] == "kill_tree"]
        assert kills == [("kill_tree", workers_probe)]
    finally:
        probes.kill_all()
        system.close()
