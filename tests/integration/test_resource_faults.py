"""The kernel refusing a resource costs a failed spawn or reload, never the master or a
serving worker (docs/reliability.md). Real masters, real workers (the demo app), real load.

The faults are real too: a master under a low RLIMIT_NOFILE runs out of file descriptors
during a reload; a master run as another user under a low RLIMIT_NPROC cannot fork a
worker; another user floods the workers' notify socket during a reload. Limits are set
with prlimit and the user is switched with setpriv (util-linux), so the master's command
line gets a prefix: `PrefixedMaster` (tests/integration/users.py).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from handoff.master.control_server import MAX_CLIENTS
from tests.integration.control_harness import (
    alive,
    cli_status,
    client_env,
    connect,
    demo_app,
    handoff,
    reload_result,
    request,
    serving,
    start,
    status_of,
)
from tests.integration.harness import Event, Load, Master
from tests.integration.http import get
from tests.integration.users import prefixed, python_for
from tests.integration.waiting import wait_until

NOBODY = 65534
SRC = Path(__file__).resolve().parents[2] / "src"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="handoff-faults-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- what the kernel shows -----------------------------------------------------------------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def nofile_limits(pid: int) -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE of a process, from /proc/PID/limits."""
    for text in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if text.startswith("Max open files"):
            soft, hard = text.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no 'Max open files' line in /proc/{pid}/limits")


def tasks_of(uid: int) -> int:
    """The tasks (threads) a real uid has: what RLIMIT_NPROC counts."""
    count = 0
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.uids().real == uid:
                count += proc.num_threads()
    return count


def notify_address(pid: int) -> str:
    """A worker's NOTIFY_SOCKET: an abstract address, '@' standing for the leading NUL."""
    for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if entry.startswith(b"NOTIFY_SOCKET="):
            address = entry.removeprefix(b"NOTIFY_SOCKET=")
            assert address.startswith(b"@"), address
            return address.decode()
    raise AssertionError(f"worker {pid} has no NOTIFY_SOCKET")


# -- the control socket --------------------------------------------------------------------


def scale(control: Path, workers: int) -> None:
    replies = request(control, {"v": 1, "cmd": "scale", "workers": workers})
    assert replies[-1]["type"] == "result", replies
    assert replies[-1]["ok"] is True, replies


def ready_workers(control: Path) -> int:
    """Ready workers of the active generation, as `status` shows them."""
    return sum(
        worker["state"] == "ready"
        for gen in status_of(control)["generations"]
        if gen["state"] == "active"
        for worker in gen["workers"]
    )


# -- 1. out of file descriptors ------------------------------------------------------------

WORKER_SOFT = 48  # the soft limit the master starts with: what its workers get back
MASTER_HARD = 64  # its hard limit, which the master raises its soft limit to
SCALED = 8
ROOM = 1  # free fds left when the reload starts: a spawn needs 2 (its pipe), then a pidfd


def settled_fds(pid: int, control: Path) -> int:
    """The master's open fds once no control client is left: after one exchange read to
    the end (the master closes its side once it has sent the result)."""
    with connect(control) as sock:
        sock.sendall(b'{"v": 1, "cmd": "status"}\n')
        while sock.recv(65536):
            pass
    return open_fds(pid)


def reload_out_of_fds(master: Master, control: Path, idle: int) -> Event:
    """Reload (SIGHUP, which costs no fd) while idle control clients hold all but ROOM
    of the master's fds; the reload's outcome event.

    Every fd the master holds is below its limit (it inherited none of the test's: Popen
    closes them), so what is left is the limit minus the count.
    """
    held = MASTER_HARD - ROOM - idle
    assert 0 < held <= MAX_CLIENTS, f"the master holds {idle} fds: pick other numbers"
    connections: list[socket.socket] = []
    try:
        for _ in range(held):
            connections.append(connect(control))
        # Each accepted client costs the master one fd; it cuts idle ones after 5 s,
        # long after the reload below has failed.
        wait_until(
            lambda: open_fds(master.pid) == MASTER_HARD - ROOM,
            10,
            f"the master to accept {held} control clients",
        )
        return master.reload(30)
    finally:
        for connection in connections:
            connection.close()


@pytest.mark.timeout(180)
def test_a_reload_out_of_file_descriptors_fails_with_the_reason_and_nothing_else_changes(
    tmp_path: Path,
) -> None:
    version = tmp_path / "version"
    version.write_text("v1")
    control = tmp_path / "ctl.sock"
    limit = ["prlimit", f"--nofile={WORKER_SOFT}:{MASTER_HARD}", "--"]
    args = ["--workers", "2", "--control", str(control)]
    with prefixed(limit, demo_app(version), args=args) as master:
        port = start(master, control)
        assert nofile_limits(master.pid) == (MASTER_HARD, MASTER_HARD), "soft not raised"
        first = master.worker_pids()[0]
        assert nofile_limits(first) == (WORKER_SOFT, MASTER_HARD), "the worker's soft limit"
        with Load(port) as load:
            load.wait_for_requests(100)
            mark = master.mark()
            scale(control, SCALED)
            wait_until(lambda: ready_workers(control) == SCALED, 60, f"{SCALED} ready workers")
            before = serving(control)
            assert len(before) == SCALED
            scaled_worker = next(iter(before - set(master.worker_pids()[:2])))
            assert nofile_limits(scaled_worker) == (WORKER_SOFT, MASTER_HARD)
            load.wait_for_requests(50)

            idle = settled_fds(master.pid, control)
            outcome = reload_out_of_fds(master, control, idle)
            assert outcome["event"] == "reload.failed", outcome
            reason = str(outcome["reason"])
            assert "EMFILE" in reason or "Too many open files" in reason, outcome
            failed = master.named("worker.spawn_failed", after=mark)
            assert failed, "no worker.spawn_failed"
            assert all("EMFILE" in str(e["reason"]) for e in failed), failed

            wait_until(lambda: open_fds(master.pid) == idle, 10, "the control clients to go")
            assert master.process.poll() is None, "the master died"
            assert serving(control) == before, "a serving worker was replaced"
            assert all(alive(pid) for pid in before)
            load.wait_for_requests(100)

            scale(control, 2)
            result = reload_result(control)
            assert result["ok"] is True, result
            after = serving(control)
            assert len(after) == 2
            assert after.isdisjoint(before)
            load.wait_for_requests(100)
        assert load.stats.total_failures() == 0, load.stats.to_dict()
        assert status_of(control)["master"]["pid"] == master.pid
        assert not master.named("master.crashed")
        assert not master.named("worker.killed")


@pytest.mark.timeout(60)
def test_a_control_socket_out_of_file_descriptors_waits_instead_of_spinning(
    tmp_path: Path,
) -> None:
    """accept() failing with EMFILE leaves the listener readable: the master sets it
    aside (ACCEPT_PAUSE_S, or until a client leaves) instead of retrying at full speed,
    and answers the queued clients once fds are free."""
    version = tmp_path / "version"
    version.write_text("v1")
    control = tmp_path / "ctl.sock"
    limit = ["prlimit", f"--nofile={MASTER_HARD}:{MASTER_HARD}", "--"]
    args = ["--workers", "1", "--control", str(control)]
    with prefixed(limit, demo_app(version), args=args) as master:
        port = start(master, control)
        idle = settled_fds(master.pid, control)
        held = MASTER_HARD - idle
        assert 0 < held <= MAX_CLIENTS, f"the master holds {idle} fds: pick other numbers"
        mark = master.mark()
        connections = [connect(control) for _ in range(held + 2)]  # 2 wait in the queue
        try:
            first = master.wait_for("control.refused", 10, after=mark)
            assert "accept" in str(first["reason"]), first
            cpu = psutil.Process(master.pid).cpu_times()
            index = master.events.index(first)
            # Retried once the pause is over: the second refusal a pause later.
            master.wait_for(
                "control.refused", 10, after=index + 1, where=lambda e: "accept" in e["reason"]
            )
            spent = sum(psutil.Process(master.pid).cpu_times()[:2]) - sum(cpu[:2])
            assert spent < 0.5, f"the master spent {spent:.2f} s of CPU in one pause"
            code, _ = get(port)
            assert code == 200, "the workers stopped serving"
        finally:
            for connection in connections:
                connection.close()
        assert status_of(control)["master"]["pid"] == master.pid
        assert master.process.poll() is None, "the master died"
        assert not master.named("master.crashed")


# -- 2. fork refused (RLIMIT_NPROC) --------------------------------------------------------


@needs_root
@pytest.mark.timeout(120)
def test_a_fork_the_kernel_refuses_fails_that_worker_not_the_master(public_dir: Path) -> None:
    version = public_dir / "version"
    version.write_text("v1")
    version.chmod(0o644)
    control_dir = public_dir / "control"
    control_dir.mkdir(mode=0o700)
    os.chown(control_dir, NOBODY, NOBODY)
    control = control_dir / "ctl.sock"
    app = [python_for(NOBODY), "-m", "handoff.demo.app", "--version-file", str(version)]
    # The master, its warden, its output relay and 2 workers, and room for one more.
    nproc = tasks_of(NOBODY) + 5 + 1
    prefix = [
        "prlimit", f"--nproc={nproc}", "--",
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
    ]  # fmt: skip
    args = ["--workers", "2", "--control", str(control)]
    env = {"PYTHONPATH": str(SRC)}
    with prefixed(prefix, app, args=args, env=env, cwd=public_dir) as master:
        port = start(master, control)
        assert psutil.Process(master.pid).uids().real == NOBODY
        first = set(master.worker_pids())
        assert len(first) == 2
        mark = master.mark()
        scale(control, 5)
        refused = master.wait_for("worker.spawn_failed", 30, after=mark)
        reason = str(refused["reason"])
        assert "fork" in reason, refused
        assert "EAGAIN" in reason, refused
        for _ in range(5):
            code, body = get(port)
            assert code == 200, body
            assert body.get("pid") in first | set(master.worker_pids()), body
        assert master.process.poll() is None, "the master died"
        assert all(alive(pid) for pid in first), "a serving worker was lost"
        status = cli_status(handoff("status", "--json", "--control", str(control), user=NOBODY))
        assert status["master"]["pid"] == master.pid
        assert not master.named("master.crashed")


# -- 3. a notify flood from another user during a reload -----------------------------------

FLOODER = r"""
import socket, sys, time
address = b"\0" + sys.argv[1].removeprefix("@").encode()
end = time.monotonic() + float(sys.argv[2])
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
sent = 0
while time.monotonic() < end:
    try:
        sock.sendto(b"READY=1", address)
    except BlockingIOError:
        continue
    sent += 1
    if sent == 1:
        print("flooding", flush=True)
print(f"sent {sent}", flush=True)
"""


@contextlib.contextmanager
def flooding(address: str, seconds: float) -> Iterator[subprocess.Popen[str]]:
    """Another user (nobody) sends READY=1 to address as fast as it can, for `seconds`."""
    argv = [
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
        python_for(NOBODY), "-c", FLOODER, address, str(seconds),
    ]  # fmt: skip
    flooder = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=client_env(),
        start_new_session=True,
    )
    try:
        assert flooder.stdout is not None
        readable, _, _ = select.select([flooder.stdout], [], [], 30)
        assert readable, "the flooder did not start within 30 s"
        first = flooder.stdout.readline()
        assert first == "flooding\n", first + flooder.stdout.read()
        yield flooder
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(flooder.pid, signal.SIGKILL)
        flooder.communicate(timeout=10)


@needs_root
@pytest.mark.timeout(180)
def test_a_notify_flood_from_another_user_does_not_slow_a_reload(tmp_path: Path) -> None:
    version = tmp_path / "version"
    version.write_text("v1")
    control = tmp_path / "ctl.sock"
    args = ["--workers", "2", "--control", str(control)]
    master = Master(demo_app(version), args=args)
    try:
        port = start(master, control)
        with Load(port) as load:
            load.wait_for_requests(100)
            normal = reload_result(control)
            assert normal["ok"] is True, normal
            normal_s = float(str(normal["duration_s"]))
            load.wait_for_requests(100)
            address = notify_address(next(iter(serving(control))))
            assert status_of(control)["master"]["notify_datagrams_dropped"] == 0
            with flooding(address, 60) as flooder:
                flooded = reload_result(control)
                assert flooder.poll() is None, "the flood ended before the reload did"
                dropped = status_of(control)["master"]["notify_datagrams_dropped"]
            assert flooded["ok"] is True, flooded
            flooded_s = float(str(flooded["duration_s"]))
            assert flooded_s <= 3 * normal_s + 1, (normal_s, flooded_s)
            assert dropped > 0
            load.wait_for_requests(100)
        assert load.stats.total_failures() == 0, load.stats.to_dict()
        assert master.process.poll() is None
        assert not master.named("master.crashed")
    finally:
        master.kill()
