"""The rescue CPU bench (bench/rescue_cpu.py) cannot rot: 2 reloads of each kind with 16
keep-alive connections, through the same command a full run uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
if os.geteuid() != 0:
    pytestmark = [pytestmark, pytest.mark.skip(reason="pidfd_getfd needs root (ptrace)")]

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(150)
def test_two_reloads_with_and_without_rescue(tmp_path: Path) -> None:
    out = tmp_path / "rescue_cpu.json"
    argv = [sys.executable, "-m", "bench.rescue_cpu", "--reloads", "2", "--connections", "16"]
    argv += ["--json", str(out)]
    run = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)

    assert run.returncode == 0, run.stdout + run.stderr
    assert "bench.rescue_cpu --reloads 2 --connections 16" in run.stdout  # the command line
    assert "| N | rescue |" in run.stdout
    document = json.loads(out.read_text())
    assert {"command_line", "reloads", "connections", "runs", "comparisons", "warnings"} <= set(
        document
    )
    assert document["reloads"] == 2
    assert document["connections"] == [16]
    runs = {run["rescue"]: run for run in document["runs"]}
    assert set(runs) == {False, True}
    for each in runs.values():
        assert each["master_exit_code"] == 0
        assert len(each["reloads"]) == 4  # 2 quiet, 2 pinged
        summary = each["summary"]
        for key in (
            "master_cpu_ms_median",
            "rescue_cpu_ms_median",
            "copied_median",
            "handed_median",
            "released_total",
            "failed_keepalive_total",
            "status_ms_rest",
            "status_ms_reload",
            "status_ms_stop_window",
            "settle_lateness_ms_quiet",
        ):
            assert key in summary, key
        assert summary["master_cpu_ms_median"] > 0, summary
        assert summary["status_ms_reload"]["count"] > 0, summary
        assert summary["settle_lateness_ms_quiet"]["count"] == 4, summary  # 2 workers x 2
    rescued = runs[True]["summary"]
    assert rescued["handed_total"] > 0, rescued
    assert rescued["rescue_cpu_ms_median"] > 0, rescued
    assert runs[False]["summary"]["handed_total"] == 0
    (comparison,) = document["comparisons"]
    assert comparison["connections"] == 16
    assert "master_cpu_ms_extra_per_reload" in comparison
    # The bench's own checks: the counters agree with rescue.finished, and the master is
    # idle between reloads (a rescued connection left behind once made it spin).
    assert document["warnings"] == [], document["warnings"]
