"""A release-directory deploy under a real systemd (docs/systemd.md): the example unit's
``--chdir /opt/myapp/current`` and ``--env-file``, pointed at releases in the sandbox's
/run, and what ``WorkingDirectory=current`` alone does instead.

systemd resolves ``WorkingDirectory=`` once, when the master starts, and sets ``PWD`` to
the resolved path (systemd 252): handoff's default then is that release, for good. With
``--chdir`` in ExecStart= each generation runs the release ``current`` names at its
start, and reads the env file again; a broken env file fails ``systemctl reload``, with
the line, in ``systemctl status``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.harness import Load
from tests.systemd.conftest import Units
from tests.systemd.sandbox import Sandbox
from tests.systemd.test_systemd import (
    assert_nothing_lost,
    explain,
    host_processes,
    reload,
    start,
    version_served,
)
from tests.systemd.units import AppUnit, adapt_service, free_port

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(150)]


@dataclass
class Releases:
    inside: str  # the deploy's root as the service sees it
    host: Path  # the same directory from the host

    def flip(self, number: int) -> None:
        staged = self.host / "current.new"
        staged.symlink_to(f"releases/{number}")
        os.replace(staged, self.host / "current")

    def write_env(self, text: str) -> None:
        staged = self.host / "shared" / "app.env.new"
        staged.write_text(text)
        staged.chmod(0o644)
        os.replace(staged, self.host / "shared" / "app.env")

    def inode(self, number: int) -> tuple[int, int]:
        info = (self.host / "releases" / str(number)).stat()
        return info.st_dev, info.st_ino


@pytest.fixture
def releases(sandbox: Sandbox, units: Units) -> Iterator[Releases]:
    """releases/1 and 2, each with its VERSION; current -> releases/1; shared/app.env."""
    inside = f"/run/handoff-tests/{units.prefix}-deploy"
    host = sandbox.host_path(inside)
    for number in (1, 2):
        release = host / "releases" / str(number)
        release.mkdir(parents=True)
        (release / "VERSION").write_text(f"release-{number}\n")
    (host / "shared").mkdir()
    for directory in (host, host.parent, host / "releases", host / "shared", *host.glob("*/*")):
        directory.chmod(0o755)  # readable by the unit's (dynamic) user
    for path in host.glob("releases/*/VERSION"):
        path.chmod(0o644)
    found = Releases(inside, host)
    found.write_env("COLOR=red\n")
    found.flip(1)
    try:
        yield found
    finally:
        shutil.rmtree(host, ignore_errors=True)


def install(
    sandbox: Sandbox, units: Units, options: dict[str, str | None], extra: list[str]
) -> AppUnit:
    """The example unit, its demo app reading a relative VERSION (the release's own)."""
    name = f"hx-{units.prefix}.service"
    unit = AppUnit(name=name, port=free_port(), version_inside="VERSION")
    unit.files = adapt_service(
        "handoff-example.service",
        name,
        port=unit.port,
        version_inside="VERSION",
        handoff_options=options,
        extra=extra,
    )
    units.names.append(name)
    sandbox.install(unit.files)
    return unit


def workers_of(sandbox: Sandbox, unit: AppUnit) -> list[tuple[int, dict[str, str]]]:
    """(host pid, environment) of each worker."""
    _, workers = host_processes(sandbox, unit)
    return [(worker.pid, worker.environ()) for worker in workers]


def cwd_inode(pid: int) -> tuple[int, int]:
    info = os.stat(f"/proc/{pid}/cwd")
    return info.st_dev, info.st_ino


def test_chdir_and_env_file_in_execstart_follow_each_deploy(
    sandbox: Sandbox, units: Units, releases: Releases
) -> None:
    options = {
        "--chdir": f"{releases.inside}/current",
        "--env-file": f"{releases.inside}/shared/app.env",
    }
    unit = install(sandbox, units, options, [])
    start(sandbox, unit)
    assert version_served(unit.port) == "release-1"
    for pid, env in workers_of(sandbox, unit):
        assert cwd_inode(pid) == releases.inode(1)
        assert env["COLOR"] == "red"
        assert env["PWD"] == f"{releases.inside}/current"

    with Load(unit.port) as load:
        load.wait_for_requests(100)
        releases.flip(2)
        releases.write_env("COLOR=blue\n")
        reload(sandbox, unit)
        assert version_served(unit.port) == "release-2", explain(sandbox, unit)
        load.wait_for_requests(100)
    assert_nothing_lost(load, sandbox, unit)
    current = [
        (pid, env) for pid, env in workers_of(sandbox, unit) if env["HANDOFF_GENERATION"] == "2"
    ]
    assert len(current) == 2, explain(sandbox, unit)
    for pid, env in current:
        assert cwd_inode(pid) == releases.inode(2)
        assert env["COLOR"] == "blue"

    releases.write_env("COLOR=green\nnot an assignment\n")
    result = sandbox.ctl("reload", unit.name, check=False, timeout=90)
    assert result.returncode != 0, explain(sandbox, unit)
    reason = f"env file {releases.inside}/shared/app.env, line 2: expected NAME=VALUE"
    assert reason in sandbox.show(unit.name, "StatusText"), explain(sandbox, unit)
    assert reason in sandbox.journal(unit.name)
    assert sandbox.state(unit.name) == "active"
    assert version_served(unit.port) == "release-2"


def test_working_directory_alone_pins_the_release_it_was_started_in(
    sandbox: Sandbox, units: Units, releases: Releases
) -> None:
    # What docs/systemd.md warns about: WorkingDirectory= is resolved once, and PWD is
    # the resolved path, so handoff's default (PWD) cannot follow a flip.
    unit = install(sandbox, units, {}, [f"WorkingDirectory={releases.inside}/current"])
    start(sandbox, unit)
    for _, env in workers_of(sandbox, unit):
        assert env["PWD"] == f"{releases.inside}/releases/1"

    releases.flip(2)
    reload(sandbox, unit)

    assert version_served(unit.port) == "release-1"
    for pid, env in workers_of(sandbox, unit):
        assert cwd_inode(pid) == releases.inode(1)
        assert env["PWD"] == f"{releases.inside}/releases/1"
