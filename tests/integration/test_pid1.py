"""handoff as a container's entrypoint: PID 1 of its own PID namespace.

`unshare --pid --fork --mount-proc` makes the namespace a container runtime would (the
master is PID 1 inside, /proc shows only the namespace). What a container needs of its
PID 1, checked from the host by the namespace's host pids:

- every orphan that lands on it is reaped: those of a worker's children that daemonize,
  and those of a process started in the namespace from outside (`docker exec`,
  `kubectl exec`: here nsenter), whose parent is not in the namespace at all;
- SIGTERM from outside (what `docker stop` and the kubelet send) is handled: slow
  requests in flight complete with 200 and the master exits 0 within delay + drain;
- exit code 3 when the first generation never becomes ready, 4 when every worker keeps
  crashing (`--give-up-after`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil
import pytest

from tests.integration.harness import APPS
from tests.integration.http import get
from tests.integration.users import PrefixedMaster
from tests.integration.waiting import wait_until

UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc"]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a new PID namespace needs root")


class Pid1Master(PrefixedMaster):
    """A master started as PID 1 of a new PID namespace (unshare forks it).

    `self.pid` is unshare's; `init` is the master's host pid. The pids the master logs
    are the namespace's, so no worker is tracked by host pid here: teardown SIGKILLs the
    namespace's init, and the kernel kills everything left in the namespace with it.
    """

    def __init__(self, command: Sequence[str], *, args: Sequence[str] = ()) -> None:
        super().__init__(UNSHARE, command, args=args)
        self.init = 0

        def forked() -> bool:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(self.pid).children():
                    if "handoff" in child.cmdline():
                        self.init = child.pid
                        return True
            return False

        wait_until(forked, 30, "unshare's child to exec the master")
        self.ns = os.readlink(f"/proc/{self.init}/ns/pid")

    def _take(self, raw: bytes) -> None:
        super()._take(raw)
        with self._changed:
            self._workers.clear()  # namespace pids: never to be looked up on the host

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.init, sig)  # from outside the namespace, like the container runtime

    def namespace(self) -> list[psutil.Process]:
        """Every process of the master's PID namespace, by its host pid."""
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(OSError, psutil.Error):
                if os.readlink(f"/proc/{proc.pid}/ns/pid") == self.ns:
                    found.append(proc)
        return found

    def zombies(self) -> list[int]:
        found = []
        for proc in self.namespace():
            with contextlib.suppress(psutil.Error):
                if proc.status() == psutil.STATUS_ZOMBIE:
                    found.append(proc.pid)
        return found

    def kill(self) -> None:
        if self.init:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init, signal.SIGKILL)
        super().kill()


@contextlib.contextmanager
def pid1(command: Sequence[str], *, args: Sequence[str] = ()) -> Iterator[Pid1Master]:
    master = Pid1Master(command, args=args)
    try:
        yield master
    finally:
        master.kill()


def demo(version_file: Path) -> list[str]:
    return [sys.executable, "-m", "handoff.demo.app", "--version-file", str(version_file)]


# A worker that daemonizes children (a subshell backgrounds a sleep and exits, so the
# sleep is orphaned), then becomes the demo app (exec keeps its pid: LISTEN_PID holds).
DAEMONIZING = 'for i in 1 2 3 4 5; do ( sleep 0.3 & ); done; exec "$0" -m handoff.demo.app "$@"'


def sleepers(master: Pid1Master) -> list[int]:
    found = []
    for proc in master.namespace():
        with contextlib.suppress(psutil.Error):
            if proc.name() == "sleep":
                found.append(proc.pid)
    return found


@needs_root
@pytest.mark.timeout(120)
def test_pid1_reaps_every_orphan(tmp_path: Path) -> None:
    version = tmp_path / "version"
    version.write_text("v1")
    command = ["sh", "-c", DAEMONIZING, sys.executable, "--version-file", str(version)]
    with pid1(command, args=["--workers", "2"]) as master:
        port = master.wait_ready()
        assert master.wait_for("master.started")["pid"] == 1
        # the workers' orphans: adopted by the master (subreaper and init), then reaped
        wait_until(lambda: not sleepers(master), 30, "the workers' orphans to exit")
        wait_until(lambda: not master.zombies(), 10, "no zombie in the namespace")
        # a reload: new workers, new orphans
        assert master.reload()["event"] == "reload.succeeded"
        wait_until(lambda: not sleepers(master), 30, "the new workers' orphans to exit")
        wait_until(lambda: not master.zombies(), 10, "no zombie after the reload")
        # orphans of a process exec'd into the namespace from outside (docker exec):
        # its parent (nsenter) is on the host, so they land on the namespace's init
        subprocess.run(
            ["nsenter", "--target", str(master.init), "--pid", "--mount", "--",
             "sh", "-c", "for i in 1 2 3 4 5 6 7 8; do ( sleep 0.3 & ); done"],
            timeout=30,
            check=True,
        )  # fmt: skip
        wait_until(lambda: not sleepers(master), 30, "the exec'd orphans to exit")
        wait_until(lambda: not master.zombies(), 10, "no zombie after docker-exec orphans")
        assert get(port)[0] == 200
        master.signal(signal.SIGTERM)
        assert master.wait_exit(60) == 0


@needs_root
@pytest.mark.timeout(120)
def test_pid1_sigterm_completes_slow_requests(tmp_path: Path) -> None:
    version = tmp_path / "version"
    version.write_text("v1")
    delay_s = 1
    drain_s = 10
    args = ["--workers", "2", "--drain-timeout", str(drain_s), "--shutdown-delay", str(delay_s)]
    with pid1(demo(version), args=args) as master:
        port = master.wait_ready()
        results: list[int | str] = []
        lock = threading.Lock()

        def slow() -> None:
            status: int | str
            try:
                status = get(port, "/sleep?ms=1500", timeout=30)[0]
            except OSError as exc:
                status = repr(exc)
            with lock:
                results.append(status)

        clients = [threading.Thread(target=slow) for _ in range(8)]
        for client in clients:
            client.start()
        # every request is in a worker's hands before the stop
        wait_until(lambda: _accepted(master, port) >= 8, 20, "8 slow requests accepted")
        started = time.monotonic()
        master.signal(signal.SIGTERM)
        code = master.wait_exit(60)
        took = time.monotonic() - started
        for client in clients:
            client.join(30)
        assert code == 0, master.diagnose(f"exit code {code}")
        assert results == [200] * 8, results
        budget = delay_s + drain_s
        assert took < budget, f"stop took {took:.2f} s, above delay + drain ({budget} s)"
        assert not master.namespace(), "processes left in the namespace"


def _accepted(master: Pid1Master, port: int) -> int:
    """Established connections to `port` held by processes of the namespace."""
    count = 0
    for proc in master.namespace():
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == port:
                    count += 1
    return count


@needs_root
@pytest.mark.timeout(120)
def test_pid1_exit_code_3_when_first_generation_never_ready() -> None:
    never_ready = [sys.executable, str(APPS / "misbehave.py"), "hang-at-start"]
    args = ["--ready-timeout", "2", "--ready", "notify"]
    with pid1(never_ready, args=args) as master:
        assert master.wait_exit(60) == 3, master.diagnose("expected exit code 3")


# The demo app, unless the flag file exists: then the worker crashes at once.
CRASH_IF_FLAGGED = 'test -e "$FLAG" && exit 1; exec "$0" -m handoff.demo.app "$@"'


@needs_root
@pytest.mark.timeout(120)
def test_pid1_exit_code_4_when_every_worker_keeps_crashing(tmp_path: Path) -> None:
    flag, version = tmp_path / "crash", tmp_path / "version"
    version.write_text("v1")
    command = ["env", f"FLAG={flag}", "sh", "-c", CRASH_IF_FLAGGED, sys.executable]
    command += ["--version-file", str(version)]
    with pid1(command, args=["--workers", "2", "--give-up-after", "3"]) as master:
        port = master.wait_ready()
        assert get(port, "/")[0] == 200
        flag.write_text("")
        for proc in master.namespace():  # the workers die; their respawns crash at once
            with contextlib.suppress(psutil.Error):
                if "handoff.demo.app" in proc.cmdline():
                    proc.kill()
        gave_up = master.wait_for("master.gave_up", 60)
        assert str(gave_up["reason"]).startswith("every worker crashed 3 times in a row")
        assert master.wait_exit(60) == 4, master.diagnose("expected exit code 4")
        assert not master.namespace(), "processes left in the namespace"
