"""Each generation's --env-file values and directory, through the real loop and machine
with the fake ``System`` of tests/unit/fake_system.py (no process is started).

The files are real files in tmp_path: read at a generation's first spawn, kept for its
respawns, read again by the next generation, dropped once the generation is gone, and
handed over across a re-exec in place.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from handoff.core import events as ev
from handoff.core.model import ExitStatus, GenId, Pid
from handoff.formats.options import RunConfig, Timeouts, parse_bind, parse_ready
from handoff.master.holdings import Holdings
from handoff.master.loop import MasterLoop
from handoff.master.resume_state import ResumeState
from handoff.system.sockets import close_listeners, open_listeners
from tests.unit.fake_system import FakeInbox, FakeNotify, FakeSystem, FakeWarden

WORKDIR = "/srv/app/current"


@dataclass
class Rig:
    loop: MasterLoop
    system: FakeSystem
    inbox: FakeInbox
    notify: FakeNotify
    holdings: Holdings
    logs: list[dict[str, object]]

    def workers(self, gen: int) -> list[Pid]:
        generation = self.loop.view.generation(GenId(gen))
        assert generation is not None
        return sorted(generation.workers)

    def env(self, pid: Pid) -> dict[str, str]:
        return dict(self.system.processes[pid].request.env)

    def ready_all(self, gen: int) -> None:
        for pid in self.workers(gen):
            self.notify.send(pid, READY="1")
        self.loop.turn()

    def named(self, event: str) -> list[dict[str, object]]:
        return [entry for entry in self.logs if entry["event"] == event]


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    path = tmp_path / "app.env"
    path.write_text("COLOR=red\nexport GREETING='hello one'\n")
    return path


@contextlib.contextmanager
def rig_of(env_file: Path, directories: dict[Pid, str] | None = None) -> Iterator[Rig]:
    listeners = open_listeners((parse_bind("127.0.0.1:0"),), 16)
    system, inbox, notify, warden = FakeSystem(), FakeInbox(), FakeNotify(), FakeWarden()
    system.directories.update(directories or {})
    holdings = Holdings(listeners=listeners, notify=notify, warden=warden)
    config = RunConfig(
        command=("true",),
        binds=(parse_bind("127.0.0.1:0"),),
        backlog=16,
        workers=2,
        ready=parse_ready("notify"),
        timeouts=Timeouts(ready_s=60.0, drain_s=30.0, settle_s=0.0),
        stop_signal=signal.SIGTERM,
        pidfile=None,
        name="test",
        workdir=WORKDIR,
        env_files=(str(env_file),),
    )
    try:
        with capture_logs() as logs:
            loop = MasterLoop(
                config,
                holdings,
                system=system,
                inbox=inbox,
                environ={"PATH": "/usr/bin:/bin", "COLOR": "from the master", "KEEP": "1"},
            )
            loop.start()
            yield Rig(loop, system, inbox, notify, holdings, logs)
    finally:
        for part in (system, inbox, notify, warden):
            part.close()
        close_listeners(listeners)


@pytest.fixture
def rig(env_file: Path) -> Iterator[Rig]:
    with rig_of(env_file) as made:
        yield made


def test_workers_get_the_files_values_their_directory_and_pwd(rig: Rig) -> None:
    for pid in rig.workers(1):
        env = rig.env(pid)
        assert env["COLOR"] == "red"  # the file wins over the master's environment
        assert env["GREETING"] == "hello one"
        assert env["KEEP"] == "1"
        assert env["PWD"] == WORKDIR
        assert rig.system.processes[pid].request.cwd == WORKDIR
    (loaded,) = rig.named("env_files.loaded")
    assert loaded["gen"] == 1
    assert loaded["variables"] == 2


def test_a_respawn_keeps_its_generations_values_a_reload_reads_the_new_ones(
    rig: Rig, env_file: Path
) -> None:
    rig.ready_all(1)
    env_file.write_text("COLOR=blue\n")
    first = rig.workers(1)[0]

    rig.system.exit(first, ExitStatus(code=1))
    rig.loop.turn()
    rig.system.now += 0.1  # the respawn's backoff
    rig.loop.turn()

    respawned = max(rig.workers(1))
    assert first not in rig.workers(1)
    assert rig.env(respawned)["COLOR"] == "red"
    assert len(rig.named("env_files.loaded")) == 1, "a respawn does not read the files"

    rig.inbox.send(signal.SIGHUP)
    rig.loop.turn()

    assert [rig.env(pid)["COLOR"] for pid in rig.workers(2)] == ["blue", "blue"]
    assert "GREETING" not in rig.env(rig.workers(2)[0])
    assert [rig.env(pid)["COLOR"] for pid in rig.workers(1)] == ["red", "red"]
    assert sorted(rig.holdings.generation_env) == [1, 2]


def test_a_broken_file_fails_the_reload_with_its_line_and_the_old_generation_serves(
    rig: Rig, env_file: Path
) -> None:
    rig.ready_all(1)
    env_file.write_text("COLOR=green\nDB-URL=postgres://x\n")

    rig.inbox.send(signal.SIGHUP)
    rig.loop.turn()

    reason = f"env file {env_file}, line 2: invalid variable name 'DB-URL'"
    (failed,) = rig.named("reload.failed")
    assert str(failed["reason"]).startswith(reason)
    spawn_failures = rig.named("worker.spawn_failed")
    assert len(spawn_failures) == 2
    assert all(str(f["reason"]).startswith(reason) for f in spawn_failures)
    assert len(rig.named("env_files.loaded")) == 1  # generation 1's only
    assert rig.loop.view.generation(GenId(1)) is not None
    assert rig.loop.view.generation(GenId(2)) is None  # failed and gone: nothing started
    assert list(rig.holdings.generation_env) == [1]

    env_file.write_text("COLOR=green\n")  # fixed: the next reload works
    rig.inbox.send(signal.SIGHUP)
    rig.loop.turn()
    assert [rig.env(pid)["COLOR"] for pid in rig.workers(3)] == ["green", "green"]


def test_a_generation_gone_drops_its_values_unless_a_rollback_restarts_it(
    rig: Rig, env_file: Path
) -> None:
    rig.ready_all(1)
    rig.inbox.send(signal.SIGHUP)
    rig.loop.turn()
    rig.ready_all(2)  # generation 1 drains
    for pid in rig.workers(1):
        rig.system.exit(pid, ExitStatus(signal=signal.SIGTERM))
    rig.loop.turn()
    assert rig.loop.view.generation(GenId(1)) is None

    env_file.write_text("COLOR=blue\n")
    rig.inbox.send(signal.SIGHUP)
    rig.loop.turn()

    # 1 is what a rollback would restart (2 replaced it); once 3 replaces 2, it goes.
    assert sorted(rig.holdings.generation_env) == [1, 2, 3]
    rig.ready_all(3)
    for pid in rig.workers(2):
        rig.system.exit(pid, ExitStatus(signal=signal.SIGTERM))
    rig.loop.turn()
    rig.inbox.send(signal.SIGHUP)
    rig.loop.turn()
    assert sorted(rig.holdings.generation_env) == [2, 3, 4]


def test_a_rollback_restart_runs_the_previous_release_and_its_values(env_file: Path) -> None:
    pinned = "/srv/app/releases/41"
    with rig_of(env_file, directories={Pid(1000): pinned, Pid(1001): pinned}) as rig:
        rig.ready_all(1)
        env_file.write_text("COLOR=blue\n")  # the next release's values
        rig.inbox.send(signal.SIGHUP)
        rig.loop.turn()
        rig.ready_all(2)  # generation 1 drains (no --keep-previous)
        for pid in rig.workers(1):
            rig.system.exit(pid, ExitStatus(signal=signal.SIGTERM))
        rig.loop.turn()

        rig.loop.submit(ev.RollbackRequested(source="control"))

        restarted = rig.workers(3)
        assert len(restarted) == 2
        for pid in restarted:
            assert rig.env(pid)["COLOR"] == "red"
            assert rig.system.processes[pid].request.cwd == pinned


def test_the_values_are_handed_over_across_a_reexec(rig: Rig) -> None:
    state = rig.loop.capture("upgrade")

    again = ResumeState.from_json(state.to_json())

    assert again.generation_env == {"1": {"COLOR": "red", "GREETING": "hello one"}}
    raw = state.to_json().replace(b'"generation_env"', b'"unknown_field"')
    assert ResumeState.from_json(raw).generation_env == {}, "a state from before --env-file"


def test_respawns_enter_their_generations_release_not_the_flipped_symlink(
    env_file: Path,
) -> None:
    pinned = "/srv/app/releases/41"  # where generation 1's first workers found `current`
    with rig_of(env_file, directories={Pid(1000): pinned, Pid(1001): pinned}) as rig:
        rig.ready_all(1)
        # Both die: nothing of generation 1 runs any more, its release is still known.
        for pid in rig.workers(1):
            rig.system.exit(pid, ExitStatus(code=1))
        rig.loop.turn()
        rig.system.now += 0.1
        rig.loop.turn()

        respawned = rig.workers(1)
        assert len(respawned) == 2
        for pid in respawned:
            assert rig.system.processes[pid].request.cwd == pinned
            assert rig.env(pid)["PWD"] == pinned
        assert rig.holdings.generation_dirs == {1: pinned}

        rig.inbox.send(signal.SIGHUP)  # a new generation enters --chdir as it resolves now
        rig.loop.turn()
        for pid in rig.workers(2):
            assert rig.system.processes[pid].request.cwd == WORKDIR
            assert rig.env(pid)["PWD"] == WORKDIR
        state = rig.loop.capture("upgrade")
        assert ResumeState.from_json(state.to_json()).generation_dirs == {"1": pinned}


def test_without_a_pinned_directory_a_ready_workers_one_is_used(rig: Rig) -> None:
    # A master re-executed by a version that pinned nothing, or an exec not seen in time.
    rig.ready_all(1)
    first, second = rig.workers(1)
    rig.holdings.generation_dirs.clear()
    rig.system.directories[second] = "/srv/app/releases/40"

    rig.system.exit(first, ExitStatus(code=1))
    rig.loop.turn()
    rig.system.now += 0.1
    rig.loop.turn()

    assert rig.system.processes[max(rig.workers(1))].request.cwd == "/srv/app/releases/40"
