"""The control socket (docs/control.md): ``handoff status`` against what /proc shows.

Real masters and workers; the status object, from ``handoff status --json`` and from
the raw protocol, must match what psutil and /proc say about the master and each
worker, also while a generation drains.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import psutil
import pytest

from tests.integration.control_harness import (
    alive,
    cli_status,
    demo_app,
    established,
    handoff,
    shown,
    start,
    status_of,
)
from tests.integration.harness import Master, running
from tests.integration.http import get
from tests.integration.waiting import wait_until


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for entry in f:
            key, _, value = entry.partition(":")
            fields[key] = value.strip()
    return fields


# -- status --------------------------------------------------------------------------------


@dataclass
class Sample:
    """A worker as psutil saw it just before and just after a status request."""

    proc: psutil.Process
    cpu: tuple[float, float] = (0.0, 0.0)
    rss: tuple[int, int] = (0, 0)


def sample(pids: list[int], take: Any) -> tuple[dict[int, Sample], Any]:
    """Run take() between two psutil readings of each worker."""
    samples = {pid: Sample(psutil.Process(pid)) for pid in pids}
    cpu_before = {pid: sum(s.proc.cpu_times()[:2]) for pid, s in samples.items()}
    rss_before = {pid: s.proc.memory_info().rss for pid, s in samples.items()}
    taken = take()
    for pid, s in samples.items():
        s.cpu = (cpu_before[pid], sum(s.proc.cpu_times()[:2]))
        s.rss = (rss_before[pid], s.proc.memory_info().rss)
    return samples, taken


def check_master(status: dict[str, Any], master: Master, control: Path, now: float) -> None:
    about = json.dumps(status, indent=1)
    m = status["master"]
    assert m["pid"] == master.pid
    assert m["state"] == "running"
    assert m["ready"] == "auto"
    assert m["control"] == str(control)
    created = psutil.Process(master.pid).create_time()
    assert abs(m["uptime_s"] - (now - created)) < 3, about
    bound = master.wait_for("listener.bound")
    sockets = [{k: s[k] for k in ("address", "fd", "name")} for s in m["sockets"]]
    assert sockets == [{"address": bound["address"], "fd": 3, "name": bound["name"]}], about
    # /proc: the master holds the listening socket and the control socket.
    proc = psutil.Process(master.pid)
    tcp = proc.net_connections("tcp")
    assert bound["port"] in {c.laddr.port for c in tcp if c.status == psutil.CONN_LISTEN}
    assert str(control) in {c.laddr for c in proc.net_connections("unix")}


def check_workers(
    generation: dict[str, Any], master: Master, samples: dict[int, Sample], now: float
) -> None:
    about = json.dumps(generation, indent=1)
    assert sorted(w["pid"] for w in generation["workers"]) == sorted(samples), about
    for worker in generation["workers"]:
        pid = worker["pid"]
        proc = proc_status(pid)
        assert int(proc["PPid"]) == master.pid, proc
        assert proc["State"][0] in "RSD", proc  # alive: not a zombie, not stopped
        assert worker["state"] == "ready"
        s = samples[pid]
        assert abs(worker["age_s"] - (now - s.proc.create_time())) < 3, about
        assert generation["age_s"] >= worker["age_s"] - 0.5, about
        assert worker["processes"] == 1 + len(s.proc.children(recursive=True)), about
        assert s.cpu[0] - 0.1 <= worker["cpu_s"] <= s.cpu[1] + 0.1, (s, about)
        assert 0.8 * min(s.rss) <= worker["rss_bytes"] <= 1.2 * max(s.rss), (s, about)


def check_table(text: str, master: Master, workers: list[int]) -> None:
    assert not text.lstrip().startswith("{"), text
    assert re.search(rf"\b{master.pid}\b", text), text
    for pid in workers:
        rows = [row for row in text.splitlines() if re.search(rf"\b{pid}\b", row)]
        assert rows, f"worker {pid} not in the table:\n{text}"
        assert any("ready" in row for row in rows), text
    assert "active" in text, text


@pytest.mark.timeout(90)
def test_status_matches_what_proc_shows(tmp_path: Path) -> None:
    version = tmp_path / "version"
    version.write_text("v1")
    control = tmp_path / "ctl.sock"
    command = demo_app(version)
    args = ["--workers", "2", "--name", "statusapp", "--control", str(control)]
    with running(command, args=args) as master:
        port = start(master, control)
        workers = sorted(master.worker_pids())
        assert len(workers) == 2

        # Three idle keep-alive connections, held by the workers.
        held = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(3)]
        try:
            for connection in held:
                connection.request("GET", "/")
                assert connection.getresponse().read()
            wait_until(lambda: established(workers, port) == 3, 10, "3 accepted connections")
            samples, result = sample(
                workers, lambda: handoff("status", "--json", "--control", str(control))
            )
            now = time.time()
            status = cli_status(result)
        finally:
            for connection in held:
                connection.close()

        about = json.dumps(status, indent=1)
        check_master(status, master, control, now)
        assert status["master"]["name"] == "statusapp"
        assert status["master"]["command"] == command
        assert [g["gen"] for g in status["generations"]] == [1], about
        generation = status["generations"][0]
        assert (generation["state"], generation["size"]) == ("active", 2), about
        assert sorted(w["worker"] for w in generation["workers"]) == [0, 1], about
        check_workers(generation, master, samples, now)
        assert sum(w["connections"] for w in generation["workers"]) == 3, about
        assert status["last_reload"] is None

        # The same through the protocol, and as a table.
        assert status_of(control)["master"] == {**status["master"], "uptime_s": ANY}
        table = handoff("status", "--control", str(control))
        assert table.returncode == 0, shown(table)
        check_table(table.stdout, master, workers)
        master.signal(signal.SIGTERM)
        assert master.wait_exit(30) == 0


@pytest.mark.timeout(90)
def test_status_during_a_reload_shows_the_draining_generation(tmp_path: Path) -> None:
    version = tmp_path / "version"
    version.write_text("v1")
    control = tmp_path / "ctl.sock"
    with running(demo_app(version), args=["--workers", "2", "--control", str(control)]) as m:
        port = start(m, control)
        workers = sorted(m.worker_pids())
        # A slow request holds one old worker: generation 1 drains while it runs.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(get, port, "/sleep?ms=5000", 30)
            wait_until(lambda: established(workers, port) == 1, 10, "the slow request")
            holder = next(pid for pid in workers if established([pid], port) == 1)
            mark = m.mark()
            result = handoff("reload", "--control", str(control))
            assert result.returncode == 0, shown(result)
            succeeded = m.wait_for("reload.succeeded", 10, after=mark)
            m.wait_for("generation.draining", 10, after=mark, where=lambda e: e["gen"] == 1)
            status = status_of(control)
            about = json.dumps(status, indent=1)
            by_gen = {g["gen"]: g for g in status["generations"]}
            assert sorted(by_gen) == [1, 2], about
            assert (by_gen[1]["state"], by_gen[2]["state"]) == ("draining", "active"), about
            draining = {w["pid"]: w for w in by_gen[1]["workers"]}
            assert holder in draining, about
            assert draining[holder]["state"] == "stopping", about
            assert set(draining) <= set(workers), about
            new = sorted(w["pid"] for w in by_gen[2]["workers"])
            assert new == sorted(e["pid"] for e in m.named("worker.spawned", after=mark))
            for pid in [*new, *draining]:
                assert int(proc_status(pid)["PPid"]) == m.pid
            assert status["master"]["state"] == "running"
            last = status["last_reload"]
            assert (last["gen"], last["ok"], last["reason"]) == (2, True, ""), about
            assert abs(last["duration_s"] - succeeded["duration_s"]) < 0.01, about
            assert slow.result(30)[0] == 200

        m.wait_for("generation.gone", 30, where=lambda e: e["gen"] == 1)
        status = status_of(control)
        assert [g["gen"] for g in status["generations"]] == [2], status
        assert not any(alive(pid) for pid in workers)
        m.signal(signal.SIGTERM)
        assert m.wait_exit(30) == 0
