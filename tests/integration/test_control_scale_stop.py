"""The control socket (docs/control.md): ``handoff stop`` and ``handoff scale``.

Real masters and workers. Stop is graceful and returns once the master has exited;
scale (and SIGTTIN/SIGTTOU) grows and shrinks the serving generation and sets the size
of later ones.
"""

from __future__ import annotations

import concurrent.futures
import signal
from pathlib import Path

import pytest

from tests.integration.control_harness import (
    Clients,
    alive,
    cli_status,
    demo_app,
    error_lines,
    established,
    finish,
    handoff,
    request,
    shown,
    spawn,
    start,
    status_of,
)
from tests.integration.harness import Event, Load, running
from tests.integration.http import get
from tests.integration.waiting import wait_until

pytest_plugins = ("tests.integration.control_fixtures",)


# -- stop and scale ------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_stop_is_graceful_and_returns_once_the_master_has_exited(
    tmp_path: Path, clients: Clients
) -> None:
    version = tmp_path / "version"
    version.write_text("v1")
    control = tmp_path / "ctl.sock"
    with running(demo_app(version), args=["--workers", "2", "--control", str(control)]) as m:
        port = start(m, control)
        workers = m.worker_pids()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(get, port, "/sleep?ms=4000", 30)
            wait_until(lambda: established(workers, port) == 1, 10, "the slow request")
            mark = m.mark()
            stopper = spawn(clients, "stop", "--control", str(control))
            m.wait_for("master.stopping", 30, after=mark)
            # While it stops (the slow request holds a worker): status says so, and a
            # reload is refused.
            assert status_of(control)["master"]["state"] == "stopping"
            refused = handoff("reload", "--control", str(control))
            assert refused.returncode == 1, shown(refused)
            assert len(error_lines(refused.stderr)) == 1, shown(refused)
            stopped = finish(stopper, 60)
            master_alive = alive(m.pid)
            assert slow.result(30)[0] == 200
        assert stopped.returncode == 0, shown(stopped)
        assert not master_alive, "handoff stop returned while the master still ran"
        assert m.wait_exit(30) == 0
        assert m.named("master.exited")[-1]["exit_code"] == 0
        assert not m.named("worker.killed")
    assert not control.exists()


@pytest.mark.timeout(120)
def test_scale_grows_and_shrinks_the_serving_generation_and_later_ones(tmp_path: Path) -> None:
    version = tmp_path / "version"
    version.write_text("v1")
    control = tmp_path / "ctl.sock"
    with running(demo_app(version), args=["--control", str(control)]) as master:
        port = start(master, control)
        with Load(port) as load:
            load.wait_for_requests(100)
            mark = master.mark()
            result = handoff("scale", "3", "--control", str(control))
            assert result.returncode == 0, shown(result)
            for slot in (1, 2):
                master.wait_for(
                    "worker.ready", 30, after=mark, where=lambda e, s=slot: e["worker"] == s
                )
            status = cli_status(handoff("status", "--json", "--control", str(control)))
            (generation,) = status["generations"]
            assert (generation["gen"], generation["state"], generation["size"]) == (
                1,
                "active",
                3,
            )
            pids = sorted(w["pid"] for w in generation["workers"])
            assert len(pids) == 3
            assert all(alive(pid) for pid in pids)
            assert all(w["state"] == "ready" for w in generation["workers"])
            load.wait_for_requests(100)

            mark = master.mark()
            result = handoff("scale", "1", "--control", str(control))
            assert result.returncode == 0, shown(result)
            exits = [
                master.wait_for(
                    "worker.exited", 30, after=mark, where=lambda e, s=slot: e["worker"] == s
                )
                for slot in (1, 2)
            ]
            assert all(e["expected"] and e["gen"] == 1 for e in exits), exits
            status = status_of(control)
            (generation,) = status["generations"]
            assert (generation["state"], generation["size"]) == ("active", 1), status
            assert [w["worker"] for w in generation["workers"]] == [0], status
            assert not master.named("worker.spawned", after=mark)
            assert not master.named("worker.respawn_scheduled", after=mark)
            assert not master.named("generation.draining", after=mark)
            # Asking for the size it has: the documented result line.
            assert request(control, {"v": 1, "cmd": "scale", "workers": 1}) == [
                {"v": 1, "type": "result", "ok": True, "workers": 1, "was": 1}
            ]
            load.wait_for_requests(100)

            # Later generations take the new size.
            mark = master.mark()
            result = handoff("reload", "--control", str(control))
            assert result.returncode == 0, shown(result)
            assert [e["workers"] for e in master.named("generation.started", after=mark)] == [1]
            load.wait_for_requests(100)
        assert load.stats.total_failures() == 0, load.stats.to_dict()

        for bad in ("0", "1025"):
            result = handoff("scale", bad, "--control", str(control))
            assert result.returncode != 0, shown(result)
            assert len(error_lines(result.stderr)) == 1, shown(result)
        master.signal(signal.SIGTERM)
        assert master.wait_exit(30) == 0


def mentions(event: Event, text: str) -> bool:
    return any(text in str(value) for value in event.values())


@pytest.mark.timeout(60)
def test_ttin_and_ttou_add_and_remove_a_worker_never_below_one(tmp_path: Path) -> None:
    control = tmp_path / "ctl.sock"
    args = ["--ready", "delay:0", "--workers", "2", "--control", str(control)]
    with running(["sleep", "1000"], args=args) as master:
        start(master, control)
        mark = master.mark()
        master.signal(signal.SIGTTOU)
        exited = master.wait_for("worker.exited", 10, after=mark)
        assert (exited["worker"], exited["expected"]) == (1, True), exited
        (generation,) = status_of(control)["generations"]
        assert generation["size"] == 1

        # At one worker, TTOU changes nothing (its handling is logged, naming the signal).
        mark = master.mark()
        master.signal(signal.SIGTTOU)
        handled = master.wait_for_any(lambda e: mentions(e, "TTOU"), 10, after=mark)
        assert not master.named("worker.exited", after=mark), handled
        (generation,) = status_of(control)["generations"]
        assert (generation["size"], len(generation["workers"])) == (1, 1)

        mark = master.mark()
        master.signal(signal.SIGTTIN)
        ready = master.wait_for("worker.ready", 10, after=mark)
        assert ready["worker"] == 1
        (generation,) = status_of(control)["generations"]
        assert (generation["size"], len(generation["workers"])) == (2, 2)
        master.signal(signal.SIGTERM)
        assert master.wait_exit(30) == 0
