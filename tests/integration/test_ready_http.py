"""--ready http:PATH: a new generation is ready when its own workers answer in range.

Real masters, uvicorn workers running tests/integration/apps/warming_app.py (it accepts
at once but answers /healthz 503 until it is warm, and logs its first 200), real load.
Answers from the old generation, which shares the listening socket and is warm, must
not count: the timestamps of each new worker's first 200 and of its worker.ready event
prove it. The load opens a fresh connection per request: uvicorn closes idle keep-alive
connections at its stop signal, a race no readiness mode can remove (docs/servers.md).
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import pytest

from tests.integration.harness import APPS, Event, Load, Master
from tests.integration.http import get

UVICORN = str(Path(sys.executable).parent / "uvicorn")
COMMAND = [UVICORN, "warming_app:app", "--fd", "{fd}", "--log-level", "warning"]


def _at(event: Event) -> float:
    """An event's timestamp (UTC, ISO) as seconds since the epoch, like time.time()."""
    stamp = datetime.datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))
    return stamp.timestamp()


def _first_200s(log: Path) -> dict[int, float]:
    """pid -> when that process first answered /healthz with 200 (its own log)."""
    if not log.exists():
        return {}
    lines = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    return {int(line["pid"]): float(line["t"]) for line in lines}


def _start(tmp_path: Path, warm: str, *args: str) -> tuple[Master, Path, Path]:
    warm_file, ready_log = tmp_path / "warm", tmp_path / "ready.log"
    warm_file.write_text(warm)
    env = {"WARM_FILE": str(warm_file), "READY_LOG": str(ready_log), "PYTHONPATH": str(APPS)}
    master = Master(
        COMMAND,
        args=["--ready", "http:/healthz", "--workers", "2", "--log-level", "debug", *args],
        env=env,
    )
    return master, warm_file, ready_log


@pytest.mark.timeout(120)
def test_a_new_worker_is_ready_only_once_it_answers_200_itself(tmp_path: Path) -> None:
    master, _, ready_log = _start(tmp_path, "1.5", "--ready-timeout", "20")
    with _keep(master):
        port = master.wait_ready(60)
        with Load(port, keepalive=0, fresh=6) as load:
            load.wait_for_requests(50)
            for _ in range(3):
                mark = master.mark()
                outcome = master.reload(60)
                assert outcome["event"] == "reload.succeeded", master.diagnose(str(outcome))
                gen = outcome["gen"]
                spawned = {
                    e["pid"]: e for e in master.named("worker.spawned", mark) if e["gen"] == gen
                }
                ready = [e for e in master.named("worker.ready", mark) if e["gen"] == gen]
                assert len(ready) == 2, ready
                first_200 = _first_200s(ready_log)
                for event in ready:
                    assert event["via"] == "http", event
                    assert event["detail"].startswith("HTTP 200 OK from pid "), event
                    # Its own first 200 came before handoff called it ready, and that was
                    # not before the app's 1.5 s warm-up (old, warm workers answered
                    # meanwhile and were not counted).
                    pid = event["pid"]
                    owner = int(event["detail"].split("from pid ")[1].split()[0])
                    assert owner in first_200, (event, first_200)
                    assert first_200[owner] <= _at(event), (event, first_200[owner])
                    assert _at(event) - _at(spawned[pid]) >= 1.5, (event, spawned[pid])
                    tries = [
                        e
                        for e in master.named("worker.probe_failed", mark)
                        if e["pid"] == pid and "503" in e["detail"]
                    ]
                    assert tries, _history(master, mark, pid)
                load.wait_for_requests(50)
        stats = load.stats
        assert stats.total_failures() == 0, (stats.failures, list(stats.recent_errors))
        # The old generation shares the socket: some connections of the tries reached
        # it, and its (warm) answers were not counted.
        details = [str(e.get("detail")) for e in master.events if e["event"].startswith("worker.")]
        assert any("outside the worker's tree" in d for d in details), "nothing proved"


@pytest.mark.timeout(120)
def test_an_app_that_never_answers_2xx_fails_the_reload_with_its_last_answer(
    tmp_path: Path,
) -> None:
    master, warm_file, _ = _start(tmp_path, "0", "--ready-timeout", "4")
    with _keep(master):
        port = master.wait_ready(60)
        with Load(port, keepalive=0, fresh=6) as load:
            load.wait_for_requests(50)
            warm_file.write_text("never")
            outcome = master.reload(60)
            assert outcome["event"] == "reload.failed", outcome
            assert "not ready after 4 s" in outcome["reason"], outcome
            assert "last answer: HTTP 503 Service Unavailable" in outcome["reason"], outcome
            # The old generation serves on, and a fixed release reloads fine.
            status, body = get(port)
            assert (status, body.get("generation")) == (200, "1"), body
            warm_file.write_text("0")
            assert master.reload(60)["event"] == "reload.succeeded"
            load.wait_for_requests(50)
        stats = load.stats
        assert stats.total_failures() == 0, (stats.failures, list(stats.recent_errors))


@pytest.mark.timeout(60)
def test_other_statuses_count_when_asked_for(tmp_path: Path) -> None:
    master, _, _ = _start(
        tmp_path, "never", "--ready-status", "200-299,503", "--ready-try-timeout", "1"
    )
    with _keep(master):
        master.wait_ready(60)
        ready = master.named("worker.ready")
        assert {e["detail"].split(" from ")[0] for e in ready} == {
            "HTTP 503 Service Unavailable"
        }, ready


def _history(master: Master, mark: int, pid: int) -> str:
    """What the tries of one worker saw, for a failure message."""
    lines = [
        f"{e['timestamp']} {e['detail']}"
        for e in master.named("worker.probe_failed", mark)
        if e["pid"] == pid
    ]
    return "\n".join(lines)


class _keep:
    """Kill the master (and its workers) when the block ends, like harness.running."""

    def __init__(self, master: Master) -> None:
        self.master = master

    def __enter__(self) -> Master:
        return self.master

    def __exit__(self, *exc: object) -> None:
        self.master.kill()
