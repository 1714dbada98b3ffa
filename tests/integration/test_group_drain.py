"""A worker whose leader exits first (a ``sh -c`` wrapper, a cluster primary) does not
cost the requests its children are still answering: the group gets the stop signal and
the drain timeout, not an immediate SIGKILL (review finding #12)."""

from __future__ import annotations

import concurrent.futures
import sys
from pathlib import Path

import pytest

from tests.integration.harness import running
from tests.integration.http import get


@pytest.mark.timeout(120)
def test_children_of_a_wrapper_that_exits_on_sigterm_finish_their_requests(
    tmp_path: Path,
) -> None:
    version = tmp_path / "version"
    version.write_text("v1")
    # '; true' keeps any shell from exec'ing the app: sh stays the worker's leader, and
    # SIGTERM ends sh alone. The inner sh makes the app's LISTEN_PID its own pid.
    inner = (
        f"export LISTEN_PID=$$; exec {sys.executable} -m handoff.demo.app --version-file {version}"
    )
    app = f"sh -c '{inner}'; true"
    with running(["sh", "-c", app], args=["--workers", "1", "--drain-timeout", "20"]) as master:
        port = master.wait_ready()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            slow = [pool.submit(get, port, "/sleep?ms=2500", 30) for _ in range(4)]
            master.wait_for("worker.ready", 10)  # the requests are in by the time a reload starts
            outcome = master.reload(60)
            assert outcome["event"] == "reload.succeeded", outcome
            leader = master.wait_for("worker.exited", 30, where=lambda e: e["gen"] == 1)
            assert leader["signal"] == "SIGTERM", leader  # sh died of the stop signal ...
            statuses = [future.result(30)[0] for future in slow]
        assert statuses == [200, 200, 200, 200]  # ... and its child finished every request
        assert not master.named("worker.killed")
