"""handoff under a real systemd: contrib's example units, adapted to the demo app.

Each test installs the example unit as shipped (venv path substituted) plus a drop-in
that points it at handoff's demo app on a port of its own (units.py), drives it with
systemctl exactly as an operator would, and checks what systemd and the clients saw:
`start` is active only once the workers are ready; `reload` under load loses nothing,
keeps MainPID, serves the new version and fails truthfully for a broken one; `stop`
drains; socket activation; the fd store keeps the port open across `restart` and a
SIGKILLed master, and lets go of a port no longer bound; the watchdog is fed; the
example's hardening, dynamic user included, does not get in handoff's way.

Every systemctl call and every wait has a deadline, and the `units` fixture stops and
removes each test's units whatever happens; the session's sandbox is taken down last.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from handoff.demo.load import FailureClass
from tests.integration.harness import Load
from tests.integration.http import get
from tests.integration.waiting import wait_until
from tests.systemd.conftest import Units
from tests.systemd.sandbox import Sandbox
from tests.systemd.units import AppUnit, free_port, unprivileged_python

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(150)]

START_DELAY_S = 2.0


# -- helpers ---------------------------------------------------------------------------


def explain(sandbox: Sandbox, unit: AppUnit, lines: int = 60) -> str:
    """What an operator would look at: systemctl status and the unit's journal."""
    journal = "\n".join(sandbox.journal(unit.name).splitlines()[-lines:])
    return (
        f"\n--- systemctl status {unit.name}\n{sandbox.status(unit.name)}"
        f"\n--- journalctl -u {unit.name} (last {lines} lines)\n{journal}"
    )


def start(sandbox: Sandbox, unit: AppUnit) -> None:
    result = sandbox.ctl("start", unit.name, check=False, timeout=60)
    assert result.returncode == 0, f"systemctl start: {result.stderr}{explain(sandbox, unit)}"
    assert sandbox.state(unit.name) == "active", explain(sandbox, unit)


def reload(sandbox: Sandbox, unit: AppUnit) -> None:
    result = sandbox.ctl("reload", unit.name, check=False, timeout=90)
    assert result.returncode == 0, f"systemctl reload: {result.stderr}{explain(sandbox, unit)}"


def version_served(port: int) -> str:
    status, body = get(port, timeout=10)
    assert status == 200, body
    return str(body["version"])


def wait_for_version(sandbox: Sandbox, unit: AppUnit, version: str, timeout: float = 3.0) -> None:
    """Fresh requests get `version` within timeout of `systemctl reload` returning.

    Not at once: where handoff cannot take old workers off the socket (no pidfd_getfd),
    they may accept until their stop signal, after --settle. The strict check is
    test_reload_takes_the_old_generation_off_the_socket.
    """
    deadline = time.monotonic() + timeout
    while (served := version_served(unit.port)) != version:
        assert time.monotonic() < deadline, (
            f"still serving {served!r} {timeout} s after systemctl reload returned, "
            f"not {version!r}{explain(sandbox, unit)}"
        )
        time.sleep(0.05)


def host_processes(sandbox: Sandbox, unit: AppUnit) -> tuple[psutil.Process, list[psutil.Process]]:
    """The master and its workers, as host processes (the workers have HANDOFF_WORKER)."""
    master = psutil.Process(sandbox.host_pid(sandbox.main_pid(unit.name)))
    workers = []
    for child in master.children():
        with contextlib.suppress(psutil.Error):
            if "HANDOFF_WORKER" in child.environ():
                workers.append(child)
    return master, workers


def worker_sockets(sandbox: Sandbox, unit: AppUnit) -> set[tuple[str, str]]:
    """(LISTEN_FDS, LISTEN_FDNAMES) of the unit's workers."""
    _, workers = host_processes(sandbox, unit)
    assert workers, explain(sandbox, unit)
    return {(w.environ()["LISTEN_FDS"], w.environ()["LISTEN_FDNAMES"]) for w in workers}


def listening_inode(port: int) -> int | None:
    """The inode of the socket listening on 127.0.0.1:port (the same socket, or re-bound?)."""
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp", encoding="ascii") as table:
        for line in table.read().splitlines()[1:]:
            fields = line.split()
            if fields[1] == wanted and fields[3] == "0A":  # TCP_LISTEN
                return int(fields[9])
    return None


def load_report(load: Load) -> str:
    return str(load.stats.to_dict())


def assert_nothing_lost(load: Load, sandbox: Sandbox, unit: AppUnit) -> None:
    stats = load.stats
    assert stats.failures[FailureClass.REFUSED] == 0, (
        f"refused connections: {load_report(load)}{explain(sandbox, unit)}"
    )
    assert stats.total_failures() == 0, f"failed requests: {load_report(load)}" + explain(
        sandbox, unit
    )


class ConnectLoop:
    """A client looping on connect + GET /, counting what it sees (refused above all)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.outcomes: Counter[str] = Counter()
        self.pids: set[int] = set()  # worker pids (sandbox numbering) that answered
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, body = get(self.port, timeout=20)
            except ConnectionRefusedError:
                outcome = "refused"
                time.sleep(0.001)
            except (OSError, http.client.HTTPException) as exc:  # in flight at the kill
                outcome = type(exc).__name__
                with self._lock:
                    self.errors.append(repr(exc))
            else:
                outcome = "ok" if status == 200 else f"status {status}"
                with self._lock:
                    self.pids.add(int(body.get("pid", 0)))
            with self._lock:
                self.outcomes[outcome] += 1

    def count(self, outcome: str) -> int:
        with self._lock:
            return self.outcomes[outcome]

    def answered_by(self, pids: Callable[[set[int]], bool]) -> bool:
        with self._lock:
            return pids(set(self.pids))

    def __enter__(self) -> ConnectLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "connect loop did not stop"


@contextlib.contextmanager
def slow_requests(port: int, count: int, ms: int) -> Iterator[list[object]]:
    """`count` GET /sleep?ms=... in flight at once; yields their results as they come."""
    results: list[object] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            outcome: object = get(port, f"/sleep?ms={ms}", timeout=30)[0]
        except (OSError, http.client.HTTPException) as exc:
            outcome = exc
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield results
    finally:
        for thread in threads:
            thread.join(40)


def accepted_by(workers: list[psutil.Process], port: int) -> int:
    """Connections to port that a worker has accepted (not those still in the queue)."""
    count = 0
    for worker in workers:
        with contextlib.suppress(psutil.Error):
            count += sum(
                1
                for c in worker.net_connections(kind="tcp")
                if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
            )
    return count


# -- start -----------------------------------------------------------------------------


def test_start_is_active_only_once_workers_are_ready(sandbox: Sandbox, units: Units) -> None:
    # Each worker sleeps START_DELAY_S before it can accept: a READY=1 sent any earlier
    # would make systemd report "active" while nobody serves.
    unit = units.service(start_delay_s=START_DELAY_S)
    sandbox.ctl("start", "--no-block", unit.name)
    states: list[str] = []

    def settled() -> bool:
        states.append(sandbox.state(unit.name))
        return states[-1] not in ("activating", "inactive")

    wait_until(settled, 40, f"{unit.name} to leave activating")
    assert states[-1] == "active", f"states seen: {states}{explain(sandbox, unit)}"
    assert "activating" in states, states
    # Serving at once, not from the accept queue a moment later.
    started = time.monotonic()
    status, body = get(unit.port, timeout=10)
    assert status == 200
    assert body["generation"] == 1
    assert time.monotonic() - started < 1.0, "the first request waited for a worker"

    exec_started = int(sandbox.show(unit.name, "ExecMainStartTimestampMonotonic"))
    active_at = int(sandbox.show(unit.name, "ActiveEnterTimestampMonotonic"))
    assert active_at - exec_started >= START_DELAY_S * 1_000_000, (
        f"active {(active_at - exec_started) / 1e6:.3f} s after ExecStart, "
        f"before the workers could be ready ({START_DELAY_S} s){explain(sandbox, unit)}"
    )
    events = [e["event"] for e in sandbox.events(unit.name)]
    assert events.count("worker.ready") == 2, events
    assert events.index("master.ready") > max(
        i for i, e in enumerate(events) if e == "worker.ready"
    )
    assert "generation 1 serving" in sandbox.show(unit.name, "StatusText")


def test_workers_never_see_systemds_notify_socket(sandbox: Sandbox, units: Units) -> None:
    unit = units.service(extra=["WatchdogSec=30"])
    start(sandbox, unit)
    # (The master's own environment cannot be read back: setproctitle reuses its memory.)
    _, workers = host_processes(sandbox, unit)
    assert len(workers) == 2
    for worker in workers:
        env = worker.environ()
        assert env["NOTIFY_SOCKET"].startswith("@handoff/"), env
        assert "WATCHDOG_USEC" not in env
        assert "WATCHDOG_PID" not in env
        assert env["LISTEN_FDS"] == "1"


# -- reload ----------------------------------------------------------------------------


def test_reload_under_load_loses_nothing(sandbox: Sandbox, units: Units) -> None:
    unit = units.service()
    start(sandbox, unit)
    main_pid = sandbox.main_pid(unit.name)
    with Load(unit.port) as load:
        load.wait_for_requests(200)
        for number, version in enumerate(("v2", "v3"), start=2):
            unit.write_version(version)
            reload(sandbox, unit)
            wait_for_version(sandbox, unit, version)
            load.wait_for_requests(200)
            status = sandbox.show(unit.name, "StatusText")
            assert f"generation {number} serving" in status, status
    assert_nothing_lost(load, sandbox, unit)
    assert sandbox.main_pid(unit.name) == main_pid, "MainPID changed across reloads"
    assert sandbox.state(unit.name) == "active"
    assert set(load.stats.by_generation) >= {"1", "2", "3"}, load_report(load)
    assert int(sandbox.show(unit.name, "NRestarts")) == 0


def test_reload_takes_the_old_generation_off_the_socket(sandbox: Sandbox, units: Units) -> None:
    """Once `systemctl reload` returns, only the new generation accepts (epoll detach).

    Under systemd, services start with a soft RLIMIT_NOFILE of 1024; the detach must
    work there too, not fall back to signal-only (old workers accepting until SIGTERM).
    """
    unit = units.service()
    start(sandbox, unit)
    reload(sandbox, unit)
    generations = {get(unit.port, timeout=10)[1]["generation"] for _ in range(10)}
    events: list[dict[str, object]] = []

    def detached_logged() -> bool:
        events[:] = [e for e in sandbox.events(unit.name) if e["event"] == "worker.detached"]
        return len(events) >= 2

    wait_until(detached_logged, 10, "two worker.detached events in the journal")
    paths = [(e["pid"], e["path"], e.get("reason", "")) for e in events]
    assert all(path == "epoll" for _, path, _ in paths), (
        f"old workers not detached through epoll: {paths}; after the reload the answers "
        f"came from generations {sorted(generations)}"
    )
    assert generations == {2}, f"answered by generations {generations} after the reload"


def test_failed_reload_fails_and_the_old_version_keeps_serving(
    sandbox: Sandbox, units: Units
) -> None:
    unit = units.service()
    start(sandbox, unit)
    main_pid = sandbox.main_pid(unit.name)
    with Load(unit.port) as load:
        load.wait_for_requests(200)
        unit.break_version()  # the new generation's workers exit 2 at start
        result = sandbox.ctl("reload", unit.name, check=False, timeout=90)
        load.wait_for_requests(200)
    assert result.returncode != 0, f"systemctl reload succeeded{explain(sandbox, unit)}"
    assert f"Job for {unit.name} failed" in result.stderr, result.stderr
    assert_nothing_lost(load, sandbox, unit)
    assert set(load.stats.by_generation) == {"1"}, load_report(load)
    assert version_served(unit.port) == "v1"
    assert sandbox.state(unit.name) == "active"
    assert sandbox.main_pid(unit.name) == main_pid

    # What the operator sees: STATUS= says the reload failed and why, and so does
    # `systemctl status` (its Status: line and the journal lines it shows).
    status_text = sandbox.show(unit.name, "StatusText")
    assert "generation 1 serving" in status_text, status_text
    assert "reload failed" in status_text, status_text
    assert "exited 2" in status_text, status_text
    status = sandbox.status(unit.name)
    assert "reload failed" in status, status
    assert "ExecReload=" in status, status  # "(code=exited, status=1/FAILURE)"
    journal = sandbox.journal(unit.name)
    assert "demoapp: error" in journal, journal  # the worker's own output
    assert "handoff: error: reload failed" in journal, journal  # ExecReload's verdict

    # A fixed release reloads normally afterwards.
    unit.write_version("v2")
    reload(sandbox, unit)
    wait_for_version(sandbox, unit, "v2")
    assert "last reload failed" not in sandbox.show(unit.name, "StatusText")


# -- stop ------------------------------------------------------------------------------


def test_stop_drains_requests_in_flight(sandbox: Sandbox, units: Units) -> None:
    unit = units.service()
    start(sandbox, unit)
    _, workers = host_processes(sandbox, unit)
    with slow_requests(unit.port, count=4, ms=1500) as results:
        wait_until(lambda: accepted_by(workers, unit.port) >= 4, 10, "4 requests accepted")
        started = time.monotonic()
        result = sandbox.ctl("stop", unit.name, check=False, timeout=60)
        stop_took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert results == [200] * 4, f"{results}{explain(sandbox, unit)}"
    # systemctl stop waited for the drain (not a kill after a fraction of a second).
    assert stop_took > 0.8, stop_took
    assert sandbox.state(unit.name) == "inactive"
    assert sandbox.show(unit.name, "Result") == "success", explain(sandbox, unit)
    assert sandbox.show(unit.name, "ExecMainStatus") == "0"
    # A stopped service lets go of its port (the fd store is emptied too).
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", unit.port), timeout=5).close()


# -- socket activation -----------------------------------------------------------------


@pytest.mark.parametrize("bind", ["fd:http", "none"])
def test_socket_activation(sandbox: Sandbox, units: Units, bind: str) -> None:
    # "fd:http": the example as shipped; "none": no --bind, every passed socket is used.
    options: dict[str, str | None] | None = None if bind == "fd:http" else {"--bind": None}
    socket_unit, unit = units.socket_activated(handoff_options=options)
    sandbox.ctl("start", socket_unit)
    assert sandbox.state(unit.name) == "inactive"
    inode = listening_inode(unit.port)
    assert inode is not None, "the .socket unit is not listening"

    # The first connection starts the service; it waits in the queue, is not refused.
    status, body = get(unit.port, timeout=40)
    assert status == 200, body
    assert body["version"] == "v1"
    # A worker may answer from the queue before systemd has taken the master's READY=1.
    wait_until(lambda: sandbox.state(unit.name) == "active", 30, "the unit to be active")
    # handoff adopted systemd's socket (binding its own would have failed: EADDRINUSE).
    assert listening_inode(unit.port) == inode
    before = worker_sockets(sandbox, unit)

    with Load(unit.port) as load:
        load.wait_for_requests(200)
        unit.write_version("v2")
        reload(sandbox, unit)
        wait_for_version(sandbox, unit, "v2")
        load.wait_for_requests(200)
        # The socket unit holds the port while the service restarts.
        result = sandbox.ctl("restart", unit.name, check=False, timeout=90)
        assert result.returncode == 0, result.stderr + explain(sandbox, unit)
        load.wait_for_requests(200)
    assert_nothing_lost(load, sandbox, unit)
    assert listening_inode(unit.port) == inode
    # The workers get systemd's socket under systemd's name (LISTEN_FDNAMES kept); after
    # a restart, once (from the .socket unit), not twice (again from the fd store, where
    # the previous master may have put it).
    after = worker_sockets(sandbox, unit)
    assert (before, after) == ({("1", "http")}, {("1", "http")}), (
        f"(LISTEN_FDS, LISTEN_FDNAMES) of the workers: {before} after the restart {after}"
        + explain(sandbox, unit)
    )


# -- the fd store: a port that survives the master -------------------------------------


def test_restart_keeps_the_port_open(sandbox: Sandbox, units: Units) -> None:
    unit = units.service()
    start(sandbox, unit)
    assert int(sandbox.show(unit.name, "NFileDescriptorStore")) == 1, explain(sandbox, unit)
    inode = listening_inode(unit.port)
    main_pid = sandbox.main_pid(unit.name)
    with Load(unit.port, timeout_s=30) as load:
        load.wait_for_requests(200)
        result = sandbox.ctl("restart", unit.name, check=False, timeout=90)
        assert result.returncode == 0, result.stderr + explain(sandbox, unit)
        load.wait_for_requests(200)
    assert_nothing_lost(load, sandbox, unit)
    assert sandbox.main_pid(unit.name) != main_pid
    assert listening_inode(unit.port) == inode, "the socket was bound anew, not taken back"


def test_a_port_no_longer_bound_is_released(sandbox: Sandbox, units: Units) -> None:
    """After --bind changed and a restart, the old port must close, not linger in the store.

    A stored socket nobody takes back is still listening: clients connecting there would
    wait in its queue forever instead of being refused.
    """
    unit = units.service()
    start(sandbox, unit)
    old_port, new_port = unit.port, free_port()
    dropin = f"{unit.name}.d/test.conf"
    unit.files[dropin] = unit.files[dropin].replace(
        f"127.0.0.1:{old_port} ", f"127.0.0.1:{new_port} "
    )
    sandbox.install({dropin: unit.files[dropin]})
    unit.port = new_port
    result = sandbox.ctl("restart", unit.name, check=False, timeout=90)
    assert result.returncode == 0, result.stderr + explain(sandbox, unit)
    assert version_served(new_port) == "v1"
    stored = int(sandbox.show(unit.name, "NFileDescriptorStore"))
    assert stored == 1, f"the fd store holds {stored} sockets, not 1" + explain(sandbox, unit)
    assert listening_inode(old_port) is None, (
        f"127.0.0.1:{old_port} is still listening (held in the fd store, served by nobody)"
        + explain(sandbox, unit)
    )


def test_sigkilled_master_comes_back_on_the_same_port(sandbox: Sandbox, units: Units) -> None:
    unit = units.service(extra=["Restart=always"])
    start(sandbox, unit)
    assert int(sandbox.show(unit.name, "NFileDescriptorStore")) == 1, explain(sandbox, unit)
    inode = listening_inode(unit.port)
    main_pid = sandbox.main_pid(unit.name)
    master_host_pid = sandbox.host_pid(main_pid)
    with ConnectLoop(unit.port) as client:
        wait_until(lambda: client.count("ok") >= 50, 20, "50 requests before the kill")
        old_pids = set(client.pids)
        os.kill(master_host_pid, signal.SIGKILL)

        def restarted() -> bool:
            pid = sandbox.main_pid(unit.name)
            return pid not in (0, main_pid) and sandbox.state(unit.name) == "active"

        wait_until(restarted, 30, "systemd to restart the master")
        wait_until(
            lambda: client.answered_by(lambda pids: bool(pids - old_pids)),
            20,
            "an answer from a new worker",
        )
        ok_after = client.count("ok")
        wait_until(lambda: client.count("ok") >= ok_after + 50, 20, "50 more requests")
    assert client.outcomes["refused"] == 0, f"{client.outcomes}{explain(sandbox, unit)}"
    assert int(sandbox.show(unit.name, "NRestarts")) == 1
    assert listening_inode(unit.port) == inode, "the socket was bound anew, not taken back"
    # Requests in flight when the workers died with the master may be reset; nothing else.
    assert set(client.outcomes) <= {"ok", "ConnectionResetError", "RemoteDisconnected"}, (
        f"{client.outcomes} {client.errors[:5]}"
    )


# -- watchdog --------------------------------------------------------------------------


def test_watchdog_is_fed(sandbox: Sandbox, units: Units) -> None:
    unit = units.service(extra=["WatchdogSec=2"])
    start(sandbox, unit)
    main_pid = sandbox.main_pid(unit.name)
    first = int(sandbox.show(unit.name, "WatchdogTimestampMonotonic"))
    deadline = time.monotonic() + 5  # 2.5 watchdog periods
    wait_until(
        lambda: int(sandbox.show(unit.name, "WatchdogTimestampMonotonic")) > first,
        3,
        "a WATCHDOG=1 keep-alive",
    )
    while time.monotonic() < deadline:
        time.sleep(0.2)
    assert sandbox.state(unit.name) == "active", explain(sandbox, unit)
    assert sandbox.main_pid(unit.name) == main_pid, "the watchdog killed the master"
    assert int(sandbox.show(unit.name, "NRestarts")) == 0


def test_sandbox_runs_units_from_this_repository_only(sandbox: Sandbox) -> None:
    """Safety: the sandboxed systemd must not see the distribution's units."""
    units = sandbox.ctl("list-unit-files", "--no-legend", "--type=service").stdout
    assert "systemd-tmpfiles-setup.service" not in units, units
    assert Path(sandbox.host_path("/run/systemd/private")).is_socket()


# -- the example's hardening, user included --------------------------------------------


def test_example_hardening_as_shipped(sandbox: Sandbox, units: Units) -> None:
    """DynamicUser=yes, ProtectHome=yes, ProtectProc=invisible, the syscall filter ...:
    handoff starts, reloads under load and stops as an unprivileged dynamic user.

    The other tests run as root when the test venv is not readable by other users.
    """
    runtime = unprivileged_python()
    if isinstance(runtime, str):
        pytest.skip(f"no python an unprivileged user can run here: {runtime}")
    unit = units.service(unprivileged=runtime)
    start(sandbox, unit)
    master, workers = host_processes(sandbox, unit)
    assert master.uids().real != 0, "not running as the dynamic user"
    assert {w.uids().real for w in workers} == {master.uids().real}
    with Load(unit.port) as load:
        load.wait_for_requests(200)
        unit.write_version("v2")
        reload(sandbox, unit)
        wait_for_version(sandbox, unit, "v2")
        load.wait_for_requests(200)
    assert_nothing_lost(load, sandbox, unit)
    status = sandbox.ctl("status", unit.name, check=False).stdout
    assert "handoff: master" in status
    result = sandbox.ctl("stop", unit.name, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert sandbox.show(unit.name, "Result") == "success", explain(sandbox, unit)
