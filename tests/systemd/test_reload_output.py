"""Under a real systemd, a release that raises at import: `systemctl reload` fails, and the
exception is where an operator looks, the journal and `systemctl status`.

The unit is contrib's example (units.py), with one more drop-in that runs the demo app
through a small launcher which raises at import when the version file says "broken", as
a Python release with a bug at start-up would. The master's stderr is journald's stream
here, so each line a worker writes is a journal entry of its own with handoff's fields
(journald's native protocol), and `handoff reload --wait` (ExecReload=) prints the
failing worker's last lines before its verdict.
"""

from __future__ import annotations

import json
import shlex

import pytest

from tests.integration.harness import Load
from tests.systemd.conftest import Units
from tests.systemd.sandbox import Sandbox
from tests.systemd.test_systemd import (
    assert_nothing_lost,
    explain,
    reload,
    start,
    version_served,
    wait_for_version,
)
from tests.systemd.units import AppUnit, systemd_command

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(150)]

EXCEPTION = "RuntimeError: broken release (on purpose)"
LAUNCHER = f'''
import runpy, sys
version_file = sys.argv[1]
with open(version_file) as f:
    if f.read().strip() == "broken":
        raise RuntimeError("{EXCEPTION.split(": ", 1)[1]}")
sys.argv = ["demoapp", "--version-file", version_file]
runpy.run_module("handoff.demo.app", run_name="__main__")
'''


def with_launcher(sandbox: Sandbox, unit: AppUnit) -> str:
    """Run the unit's app through LAUNCHER (written beside its version file); returns the
    command's name (handoff's default --name)."""
    assert unit.version_host is not None
    launcher_host = unit.version_host.with_name("app.py")
    launcher_host.write_text(LAUNCHER)
    launcher_host.chmod(0o644)
    launcher = unit.version_inside.rsplit("/", 1)[0] + "/app.py"
    dropin = unit.files[f"{unit.name}.d/test.conf"]
    exec_start = next(
        line.removeprefix("ExecStart=")
        for line in dropin.splitlines()
        if line.startswith("ExecStart=") and line != "ExecStart="
    )
    argv = shlex.split(exec_start)
    handoff_argv, app = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    python = next(arg for arg in app if "python" in arg.rsplit("/", 1)[-1])
    command = [*handoff_argv, "--", python, launcher, unit.version_inside]
    text = f"[Service]\nExecStart=\nExecStart={systemd_command(command)}\n"
    sandbox.install({f"{unit.name}.d/zz-launcher.conf": text})
    return python.rsplit("/", 1)[-1]


def journal_entries(sandbox: Sandbox, unit: AppUnit, *matches: str) -> list[dict[str, str]]:
    result = sandbox.run(
        "journalctl", "--no-pager", "-o", "json", "-u", unit.name, *matches, check=False
    )
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_a_release_that_raises_at_import_shows_its_exception_in_reload_journal_and_status(
    sandbox: Sandbox, units: Units
) -> None:
    unit = units.service()
    name = with_launcher(sandbox, unit)
    start(sandbox, unit)
    with Load(unit.port) as load:
        load.wait_for_requests(200)
        unit.write_version("broken")
        result = sandbox.ctl("reload", unit.name, check=False, timeout=90)
        load.wait_for_requests(200)
    assert result.returncode != 0, f"systemctl reload succeeded{explain(sandbox, unit)}"
    assert_nothing_lost(load, sandbox, unit)
    assert version_served(unit.port) == "v1"

    # ExecReload= (handoff reload --wait) printed the worker's last lines, then failed.
    journal = sandbox.journal(unit.name)
    assert "handoff: error: reload failed" in journal, journal
    assert f"| {EXCEPTION}" in journal, journal
    # `systemctl status` shows the exception among its last lines.
    status = sandbox.status(unit.name)
    assert EXCEPTION in status, status
    assert "reload failed" in status, status

    # The worker's own lines are journal entries of their own, attributed by field.
    failed = journal_entries(sandbox, unit, "HANDOFF_GENERATION=2")
    assert failed, explain(sandbox, unit)
    last = failed[-1]
    assert last["MESSAGE"] == EXCEPTION, failed
    assert last["HANDOFF_WORKER"] in ("0", "1")
    assert last["SYSLOG_IDENTIFIER"] == name
    assert int(last["SYSLOG_PID"]) > 0
    assert last["_SYSTEMD_UNIT"] == unit.name
    serving = journal_entries(sandbox, unit, "HANDOFF_GENERATION=1")
    assert any("demoapp" in entry["MESSAGE"] for entry in serving), serving

    # A fixed release reloads normally afterwards.
    unit.write_version("v2")
    reload(sandbox, unit)
    wait_for_version(sandbox, unit, "v2")
