"""The master loop driven through its OS seam: a fake ``System`` and fd sources the test
makes readable, a fake clock, the real selector and the real machine.

No process is started and nothing sleeps: each test makes fds readable, then runs one
turn (which returns at once, because something is ready or a deadline has passed).
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from structlog.testing import capture_logs

from handoff.core.model import ExitStatus, GenerationState, Pid
from handoff.errors import EXIT_NEVER_READY
from handoff.formats.options import (
    RunConfig,
    Timeouts,
    parse_bind,
    parse_ready,
)
from handoff.master.holdings import Holdings
from handoff.master.loop import MasterLoop
from handoff.system import children
from handoff.system.sockets import Listener, close_listeners, open_listeners
from tests.unit.fake_system import FakeInbox, FakeNotify, FakeSystem, FakeWarden


@dataclass
class Rig:
    loop: MasterLoop
    system: FakeSystem
    inbox: FakeInbox
    notify: FakeNotify
    logs: list[dict[str, object]]

    def events(self) -> list[object]:
        return [entry["event"] for entry in self.logs]

    def workers(self, gen: int = 1) -> list[Pid]:
        generation = self.loop.view.generation(gen)
        assert generation is not None
        return sorted(generation.workers)

    def ready_all(self, gen: int = 1) -> None:
        for pid in self.workers(gen):
            self.notify.send(pid, READY="1")
        self.loop.turn()


def config(*, workers: int = 2, ready: str = "notify", settle_s: float = 0.0) -> RunConfig:
    return RunConfig(
        command=("true",),
        binds=(parse_bind("127.0.0.1:0"),),
        backlog=16,
        workers=workers,
        ready=parse_ready(ready),
        timeouts=Timeouts(ready_s=60.0, drain_s=30.0, settle_s=settle_s),
        stop_signal=signal.SIGTERM,
        pidfile=None,
        name="test",
    )


@pytest.fixture
def listeners() -> Iterator[list[Listener]]:
    opened = open_listeners((parse_bind("127.0.0.1:0"),), 16)
    yield opened
    close_listeners(opened)


MakeRig = Callable[..., Rig]


@pytest.fixture
def logs() -> Iterator[list[dict[str, object]]]:
    with capture_logs() as captured:
        yield captured


@pytest.fixture
def make_rig(listeners: list[Listener], logs: list[dict[str, object]]) -> Iterator[MakeRig]:
    made: list[tuple[FakeSystem, FakeInbox, FakeNotify, FakeWarden]] = []

    def make(**options: object) -> Rig:
        system, inbox, notify, warden = FakeSystem(), FakeInbox(), FakeNotify(), FakeWarden()
        made.append((system, inbox, notify, warden))
        loop = MasterLoop(
            config(**options),  # type: ignore[arg-type]
            Holdings(listeners=listeners, notify=notify, warden=warden),
            system=system,
            inbox=inbox,
            environ={"PATH": "/usr/bin:/bin"},
        )
        loop.start()
        return Rig(loop, system, inbox, notify, logs)

    yield make
    for system, inbox, notify, warden in made:
        system.close()
        inbox.close()
        notify.close()
        warden.close()


# -- the order of sources in a turn -----------------------------------------------------------


def test_a_worker_that_died_in_the_same_turn_is_never_ready(make_rig: MakeRig) -> None:
    rig = make_rig(workers=1)
    (pid,) = rig.workers()

    # READY=1 is sent first, but the exit is read first: a dead worker cannot serve.
    rig.notify.send(pid, READY="1")
    rig.system.exit(pid, ExitStatus(code=1))
    rig.loop.turn()

    assert "worker.ready" not in rig.events()
    assert "worker.exited" in rig.events()
    assert "generation.failed" in rig.events()
    assert rig.loop.exit is not None
    assert rig.loop.exit.code == EXIT_NEVER_READY


def test_signals_are_handled_before_worker_messages(make_rig: MakeRig) -> None:
    rig = make_rig(workers=1)
    (pid,) = rig.workers()

    rig.notify.send(pid, READY="1")
    rig.inbox.send(signal.SIGTERM)
    rig.loop.turn()

    events = rig.events()
    assert "master.stopping" in events
    assert "worker.ready" not in events, "a worker told to stop is not counted ready"
    assert ("send_signal", pid, signal.SIGTERM) in rig.system.calls


def test_ready_sent_by_a_descendant_counts_for_its_worker(make_rig: MakeRig) -> None:
    rig = make_rig(workers=1)
    (pid,) = rig.workers()
    rig.system.descendants[Pid(4242)] = pid

    rig.notify.send(Pid(4242), READY="1")
    rig.loop.turn()

    assert "generation.active" in rig.events()


def test_ready_from_a_stranger_is_ignored(make_rig: MakeRig) -> None:
    rig = make_rig(workers=1)

    rig.notify.send(Pid(4242), READY="1")
    rig.loop.turn()

    assert "notify.ignored" in rig.events()
    assert rig.loop.view.generation_in(GenerationState.STARTING) is not None


# -- exits ------------------------------------------------------------------------------------


def test_an_exited_workers_group_is_killed_before_it_is_reaped(make_rig: MakeRig) -> None:
    rig = make_rig(workers=2)
    rig.ready_all()
    first = rig.workers()[0]

    rig.system.exit(first, ExitStatus(code=0))
    rig.loop.turn()

    calls = rig.system.calls
    assert calls.index(("kill_group", first)) < calls.index(("reap", first, False))
    assert ("guard", first, False) in calls, "the warden forgets a reaped worker"
    assert "worker.respawn_scheduled" in rig.events()


def test_a_respawn_waits_for_its_backoff_on_the_clock(make_rig: MakeRig) -> None:
    rig = make_rig(workers=1)
    rig.ready_all()
    (pid,) = rig.workers()
    rig.system.exit(pid, ExitStatus(code=1))
    rig.loop.turn()
    spawns = rig.system.names().count("spawn")

    rig.system.now += 0.1  # the first respawn's backoff
    rig.loop.turn()

    assert rig.system.names().count("spawn") == spawns + 1


def test_a_worker_not_ready_by_its_deadline_fails_the_first_generation(make_rig: MakeRig) -> None:
    rig = make_rig(workers=1)

    rig.system.now += 60.0
    rig.loop.turn()

    assert "worker.not_ready" in rig.events()
    assert "master.never_ready" in rig.events()


# -- stopping an old worker: detach, settle, signal ---------------------------------------------


def test_an_old_worker_is_detached_then_signalled_after_the_settle(make_rig: MakeRig) -> None:
    rig = make_rig(workers=1, settle_s=0.25)
    rig.ready_all()
    (old,) = rig.workers(1)
    rig.inbox.send(signal.SIGHUP)
    rig.loop.turn()
    rig.ready_all(gen=2)

    assert ("detach", old) in rig.system.calls
    assert ("send_signal", old, signal.SIGTERM) not in rig.system.calls
    assert "worker.detached" in rig.events()

    rig.system.now += 0.25
    rig.loop.turn()

    assert ("send_signal", old, signal.SIGTERM) in rig.system.calls
    worker = rig.loop.view.generation(1).workers[old]
    assert worker.state.value == "signalled"


# -- faults through the seam and the shutdown sweep ----------------------------------------------


@pytest.mark.parametrize(
    ("call", "code"),
    [
        ("fork", errno.EAGAIN),
        ("fork", errno.ENOMEM),
        ("pipe2", errno.EMFILE),
        ("pidfd_open", errno.EMFILE),
    ],
)
def test_a_spawn_the_kernel_refuses_is_a_failed_reload_with_the_reason(
    make_rig: MakeRig, call: str, code: int
) -> None:
    rig = make_rig(workers=1)
    rig.ready_all()
    serving = rig.workers()
    rig.system.fail_next("spawn", children.refused(call, OSError(code, os.strerror(code))))

    rig.inbox.send(signal.SIGHUP)
    rig.loop.turn()

    failed = [e for e in rig.logs if e["event"] == "reload.failed"]
    assert len(failed) == 1
    assert f"{call}: {os.strerror(code)} ({errno.errorcode[code]})" in str(failed[0]["reason"])
    assert rig.loop.view.state.value == "running"
    assert rig.workers() == serving


def test_a_worker_the_selector_refuses_to_watch_is_killed_and_the_reload_fails(
    make_rig: MakeRig,
) -> None:
    rig = make_rig(workers=1)
    rig.ready_all()
    serving = rig.workers()
    rig.system.unwatchable_next = True

    rig.inbox.send(signal.SIGHUP)
    rig.loop.turn()

    failed = [e for e in rig.logs if e["event"] == "reload.failed"]
    assert len(failed) == 1
    assert "watching the worker" in str(failed[0]["reason"])
    unwatched = Pid(max(rig.system.processes))
    assert ("kill_group", unwatched) in rig.system.calls
    assert ("guard", unwatched, True) not in rig.system.calls
    assert rig.loop.view.state.value == "running"
    assert rig.workers() == serving


def test_an_internal_error_propagates_leaving_every_worker_to_the_re_exec(
    make_rig: MakeRig,
) -> None:
    rig = make_rig(workers=2)
    rig.ready_all()
    workers = rig.workers()
    rig.system.fail_next("detach", RuntimeError("a bug"))
    rig.inbox.send(signal.SIGHUP)
    rig.loop.turn()

    with pytest.raises(RuntimeError, match="a bug"):
        rig.ready_all(gen=2)  # activating generation 2 detaches generation 1: the bug strikes

    assert not [call for call in rig.system.calls if call[0] in ("kill_tree", "kill_group")]
    state = rig.loop.capture("crash", crashes=(1.0,))
    assert state.machine is not None
    listed = {w.pid for gen in state.machine.generations for w in gen.workers}
    assert listed == {*workers, *rig.workers(2)}
    assert state.crashes == (1.0,)
    assert state.counters["reexecs"] == 1


def test_status_counts_what_the_master_dropped(make_rig: MakeRig) -> None:
    rig = make_rig(workers=1)
    rig.notify.dropped = 3

    master = rig.loop.status()["master"]

    assert isinstance(master, dict)
    assert master["notify_datagrams_dropped"] == 3
    assert master["log_lines_dropped"] == 0
