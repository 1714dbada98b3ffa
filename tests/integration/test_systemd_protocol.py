"""What the master says to systemd and takes from it, against a stand-in notify socket.

(tests/systemd/ runs the same under a real systemd; these run everywhere, fast.)
"""

from __future__ import annotations

import array
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import Master
from tests.integration.http import get


class FakeSystemd:
    """A notify socket that records every message, and the fds sent with FDSTORE=1."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[dict[str, str]] = []
        self.fds: list[int] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
            except OSError:
                return
            fds: list[int] = []
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            with self._changed:
                self.messages.append(fields)
                self.fds.extend(fds)
                self._changed.notify_all()

    def wait_for(
        self, key: str, value: str = "1", *, after: int = 0, timeout: float = 30
    ) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for message in self.messages[after:]:
                    if message.get(key) == value:
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {key}={value} in {self.messages}")
                self._changed.wait(remaining)

    def mark(self) -> int:
        with self._changed:
            return len(self.messages)

    def close(self) -> None:
        self.sock.close()
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(tmp_path / "notify")
    try:
        yield fake
    finally:
        fake.close()


def demo(tmp_path: Path) -> list[str]:
    version = tmp_path / "version"
    version.write_text("v1")
    return [sys.executable, "-m", "handoff.demo.app", "--version-file", str(version)]


@pytest.mark.timeout(60)
def test_the_master_tells_systemd_ready_reloading_status_and_stopping(
    tmp_path: Path, systemd: FakeSystemd
) -> None:
    env = {"NOTIFY_SOCKET": systemd.path}
    with (
        contextlib.closing(Master(demo(tmp_path), args=["-w", "2"], env=env))
        if False
        else _master(demo(tmp_path), ["-w", "2"], env) as master
    ):
        master.wait_ready()
        ready = systemd.wait_for("READY")
        assert ready["STATUS"].startswith("generation 1 serving, 2 of 2 workers ready")
        mark = systemd.mark()
        assert master.reload()["event"] == "reload.succeeded"
        reloading = systemd.wait_for("RELOADING", after=mark)
        assert (
            int(reloading["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        )
        done = systemd.wait_for("READY", after=mark)
        assert "last reload: generation 2 ok" in done["STATUS"]
        stored = [m for m in systemd.messages if m.get("FDSTORE") == "1"]
        assert [m["FDNAME"] for m in stored] == ["handoff_127.0.0.1_0"]
        assert len(systemd.fds) == 1
        with socket.socket(fileno=os.dup(systemd.fds[0])) as stored:
            assert stored.getsockname()[1] == master.port()
        # The workers never see systemd's socket.
        worker = master.worker_pids()[-1]
        environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
        assert not any(item == f"NOTIFY_SOCKET={systemd.path}".encode() for item in environ)
        mark = systemd.mark()
        master.signal(signal.SIGTERM)
        systemd.wait_for("STOPPING", after=mark)
        assert master.wait_exit(30) == 0


@contextlib.contextmanager
def _master(
    command: list[str], args: list[str], env: dict[str, str], **kwargs: object
) -> Iterator[Master]:
    master = Master(command, args=args, env=env, **kwargs)  # type: ignore[arg-type]
    try:
        yield master
    finally:
        master.kill()


def _activated(
    command: list[str], listener: socket.socket, names: str, args: list[str]
) -> subprocess.Popen[bytes]:
    """Start `handoff run` as systemd would: the socket at fd 3, LISTEN_PID = its pid."""
    fd = listener.fileno()
    # dup2 onto fd 3 clears close-on-exec; the pid that execs is the one systemd would name.
    wrapper = (
        f"import os, sys; os.dup2({fd}, 3); os.close({fd}); "
        "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.argv[1], sys.argv[1:])"
    )
    argv = [
        sys.executable,
        "-c",
        wrapper,
        sys.executable,
        "-m",
        "handoff",
        "run",
        "--log-format",
        "json",
        *args,
        "--",
        *command,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env.update(LISTEN_FDS="1", LISTEN_FDNAMES=names)
    return subprocess.Popen(
        argv,
        env=env,
        pass_fds=(fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _wait_serving(
    port: int, process: subprocess.Popen[bytes], timeout: float = 30
) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return get(port, timeout=2)[1]
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise
            time.sleep(0.05)  # the socket exists from the start: connects queue until served


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("names", "args"),
    [
        ("http", []),
        ("http", ["--bind", "fd:http"]),
        ("handoff_127.0.0.1_PORT", ["--bind", "127.0.0.1:PORT"]),
    ],
    ids=["activated, no --bind", "activated, fd:NAME", "from the fd store"],
)
def test_sockets_systemd_passes_are_adopted_not_bound_again(
    tmp_path: Path, names: str, args: list[str]
) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    names = names.replace("PORT", str(port))
    args = [a.replace("PORT", str(port)) for a in args]
    process = _activated(demo(tmp_path), listener, names, args)
    listener.close()  # only the master holds it now: it must serve on it, not bind anew
    try:
        body = _wait_serving(port, process)
        assert body["generation"] == 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            assert process.wait(30) == 0
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
