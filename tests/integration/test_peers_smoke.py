"""The peers bench (bench/peers, docs/benchmarks.md) cannot rot: one healthy reload per
tool, a few seconds each, through the same command the published run uses.

Every tool must run (in CI: a tool that is not installed fails the test; elsewhere it is
reported and skipped), every reload must bring the new code, handoff must fail nothing,
the supervisors are looked at rest, and the pictures and the headline table are written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bench.peers.tools import TOOL_KEYS

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_one_healthy_reload_per_tool(tmp_path: Path) -> None:
    out = tmp_path / "peers.json"
    argv = [sys.executable, "-m", "bench.peers", "--scenario", "healthy", "--reloads", "1"]
    argv += ["--seconds-between", "1", "--keepalive-clients", "2", "--fresh-clients", "2"]
    argv += ["--idle-seconds", "1", "--json", str(out)]
    run = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=280, check=False)

    assert run.returncode == 0, run.stdout + run.stderr
    document = json.loads(out.read_text())
    not_run = document["not_run"]
    if os.environ.get("CI"):
        assert not_run == {}, f"tools .ci/run must install: {not_run}"
    pairs = document["scenarios"]["healthy"]["pairs"]
    for pair, results in pairs.items():
        summaries = results["summary"]
        assert set(summaries) | set(not_run) == set(TOOL_KEYS), pair
        for tool, summary in summaries.items():
            assert summary["reloads_ok"] == 1, (pair, tool, summary)
            assert summary["reloads_new_code_seen"] == 1, (pair, tool, summary)
        assert summaries["handoff"]["failures_total"] == 0, summaries["handoff"]
        assert summaries["restart"]["failures_by_class"]["refused"] > 0, "the load proves it"
    for pair in pairs:
        picture = tmp_path / f"peers-healthy-{pair}.png"
        assert picture.stat().st_size > 10_000, picture
    at_rest = document["at_rest"]
    assert at_rest["handoff"]["wakeups_per_s"] >= 0, at_rest
    assert "not_measured" in at_rest["restart"], at_rest
    assert document["headline"][0].startswith("| tool | failed: healthy"), document["headline"]
