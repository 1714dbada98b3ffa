"""The control protocol's lines (docs/control.md), spoken directly to a real master.

An unknown command, reload with and without "wait" (its progress lines and result), and
stop: each line as documented.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.control_harness import request, start
from tests.integration.harness import running

# -- the protocol lines themselves ---------------------------------------------------------


@pytest.mark.timeout(60)
def test_protocol_lines_are_as_documented(tmp_path: Path) -> None:
    control = tmp_path / "ctl.sock"
    args = ["--ready", "delay:0.5", "--workers", "2", "--control", str(control)]
    with running(["sleep", "1000"], args=args) as master:
        start(master, control)
        (error,) = request(control, {"v": 1, "cmd": "relaod"})
        assert error["error"] == "unknown command 'relaod'", error
        assert (
            error["hint"]
            == "commands: status, reload, stop, scale, upgrade, probe, rollback, promote"
        ), error

        replies = request(control, {"v": 1, "cmd": "reload", "wait": True})
        *progress, result = replies
        assert all(p["type"] == "progress" for p in progress), replies
        documented = ("generation.started", "worker.ready", "generation.draining")
        progress = [p for p in progress if p["event"] in documented]
        assert [(p["type"], p["event"], p["gen"]) for p in progress] == [
            ("progress", "generation.started", 2),
            ("progress", "worker.ready", 2),
            ("progress", "worker.ready", 2),
            ("progress", "generation.draining", 1),
        ], replies
        messages = [p["message"] for p in progress]
        assert messages[0].startswith("generation 2 started"), messages
        assert messages[1].startswith("generation 2: 1 of 2 workers ready"), messages
        assert messages[2].startswith("generation 2: 2 of 2 workers ready"), messages
        assert messages[3].startswith("generation 1 draining"), messages
        assert (result["type"], result["ok"], result["gen"]) == ("result", True, 2), result
        assert result["duration_s"] >= 0.5, result

        mark = master.mark()
        (started,) = request(control, {"v": 1, "cmd": "reload", "wait": False})
        (queued,) = request(control, {"v": 1, "cmd": "reload", "wait": False})
        assert (started["ok"], started["accepted"]) == (True, "started"), started
        assert (queued["ok"], queued["accepted"]) == (True, "queued"), queued
        master.wait_for("reload.succeeded", 10, after=mark, where=lambda e: e["gen"] == 4)

        (stopping,) = request(control, {"v": 1, "cmd": "stop"})
        assert stopping == {"v": 1, "type": "result", "ok": True, "pid": master.pid}
        assert master.wait_exit(30) == 0
