"""The master upgrades itself in place under a real systemd: MainPID stays, the workers
stay, nothing is lost, and ``systemctl reload`` works afterwards.

systemctl has no verb for it: ``systemctl kill -s USR2 --kill-whom=main`` (the signal to
the master only; the default sends it to every process of the unit) or ``handoff
upgrade``.
"""

from __future__ import annotations

import pytest

from tests.integration.harness import Load
from tests.integration.waiting import wait_until
from tests.systemd.conftest import Units
from tests.systemd.sandbox import Sandbox
from tests.systemd.test_systemd import (
    assert_nothing_lost,
    explain,
    host_processes,
    reload,
    start,
    wait_for_version,
)

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(150)]


def test_upgrade_keeps_main_pid_and_workers_and_reload_works_after(
    sandbox: Sandbox, units: Units
) -> None:
    unit = units.service()
    start(sandbox, unit)
    main_pid = sandbox.main_pid(unit.name)
    _, workers = host_processes(sandbox, unit)
    with Load(unit.port) as load:
        load.wait_for_requests(200)
        for count in (1, 2):
            sandbox.ctl("kill", "-s", "USR2", "--kill-whom=main", unit.name)

            def upgraded(count: int = count) -> bool:
                done = [e for e in sandbox.events(unit.name) if e["event"] == "upgrade.succeeded"]
                return len(done) >= count

            wait_until(upgraded, 30, f"upgrade {count} in the journal")
            load.wait_for_requests(200)
        assert sandbox.main_pid(unit.name) == main_pid, "MainPID changed" + explain(sandbox, unit)
        _, after = host_processes(sandbox, unit)
        assert {p.pid for p in after} == {p.pid for p in workers}, "a worker was replaced"
        unit.write_version("v2")
        reload(sandbox, unit)
        wait_for_version(sandbox, unit, "v2")
        load.wait_for_requests(200)
    assert_nothing_lost(load, sandbox, unit)
    assert sandbox.main_pid(unit.name) == main_pid
    assert sandbox.state(unit.name) == "active"
    assert int(sandbox.show(unit.name, "NRestarts")) == 0
