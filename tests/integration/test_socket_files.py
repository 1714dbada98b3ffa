"""The files a master leaves while it runs, against real masters: unix socket files
(systemd's fd store, a successor's socket, stale, stuck or foreign sockets), the pidfile
lock, the control directory, and whom the control client believes.

systemd's fd store is played by a notify socket of the test's (as in
test_systemd_protocol.py); tests/systemd/test_unix_fd_store.py runs the same under a
real systemd. Tests that act as other users need root (setpriv).
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from handoff.system.runtime_files import file_id
from tests.integration.control_harness import error_lines, handoff, shown, start, status_of
from tests.integration.harness import running
from tests.integration.launch import socket_at_fd3

NOBODY = 65534
STRANGER = 65533
GROUP = 4242  # a gid no group file names: setpriv gives it as a supplementary group
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")
pytestmark = pytest.mark.timeout(120)


def demo(tmp_path: Path) -> list[str]:
    version = tmp_path / "version"
    version.write_text("v1")
    return [sys.executable, "-m", "handoff.demo.app", "--version-file", str(version)]


def http_over_unix(path: Path, timeout: float = 30.0) -> dict[str, object]:
    """GET / through the unix socket; a connection queued before a worker accepts waits."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0], data
    return json.loads(body)  # type: ignore[no-any-return]


def listening(path: Path, backlog: int = 8) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.listen(backlog)
    return sock


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="handoff-sf-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False, timeout=30)


# -- systemd's fd store, played by the test -------------------------------------------------


class FdStore:
    """A NOTIFY_SOCKET that keeps the fds sent with FDSTORE=1, by name, as systemd does
    (FDSTOREREMOVE=1 drops a name)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.stored: dict[str, list[int]] = {}
        self.removed: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
            except OSError:
                return
            fds = [
                fd
                for level, kind, payload in ancillary
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                for fd in array.array("i", payload[: len(payload) - len(payload) % 4])
            ]
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            with self._changed:
                if fields.get("FDSTOREREMOVE") == "1":
                    self.removed.append(fields["FDNAME"])
                    for fd in self.stored.pop(fields["FDNAME"], []):
                        os.close(fd)
                if fields.get("FDSTORE") == "1":
                    self.stored.setdefault(fields["FDNAME"], []).extend(fds)
                else:
                    for fd in fds:
                        os.close(fd)
                self._changed.notify_all()

    def wait_stored(self, timeout: float = 30.0) -> tuple[str, int]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self.stored:
                left = deadline - time.monotonic()
                assert left > 0, "nothing was stored"
                self._changed.wait(left)
            ((name, fds),) = self.stored.items()
            return name, fds[-1]

    def wait_removed(self, name: str, times: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.removed.count(name) < times or name not in self.stored:
                left = deadline - time.monotonic()
                assert left > 0, f"FDSTOREREMOVE {name} not seen {times} times: {self.removed}"
                self._changed.wait(left)

    def empty(self) -> None:
        """systemctl stop: the store lets go of its sockets."""
        with self._changed:
            for fds in self.stored.values():
                for fd in fds:
                    os.close(fd)
            self.stored.clear()

    def close(self) -> None:
        self.sock.close()
        self.empty()


@pytest.fixture
def fd_store(tmp_path: Path) -> Iterator[FdStore]:
    store = FdStore(tmp_path / "notify")
    try:
        yield store
    finally:
        store.close()


@contextlib.contextmanager
def restarted(command: list[str], path: Path, store: FdStore) -> Iterator[subprocess.Popen[bytes]]:
    """`handoff run --bind unix:PATH` as systemd starts it again: the stored socket at
    fd 3 with LISTEN_FDS/LISTEN_FDNAMES and LISTEN_PID its own pid."""
    name, fd = store.wait_stored()
    argv = [sys.executable, "-m", "handoff", "run"]
    argv += ["--log-format", "json", "--bind", f"unix:{path}"]
    argv += ["--control", f"{path}.ctl", "--", *command]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env.update(LISTEN_FDS="1", LISTEN_FDNAMES=name, NOTIFY_SOCKET=store.path)
    with socket_at_fd3(fd, argv, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as process:
        yield process


def stop(process: subprocess.Popen[bytes]) -> None:
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(60) == 0


def test_the_fd_store_keeps_a_unix_socket_reachable_through_its_path(
    tmp_path: Path, fd_store: FdStore
) -> None:
    """Review finding #5: a restart must not leave a stored socket without its file."""
    path = tmp_path / "app.sock"
    private = ["--control", str(tmp_path / "ctl.sock")]
    env = {"NOTIFY_SOCKET": fd_store.path}
    with running(demo(tmp_path), binds=[f"unix:{path}"], args=private, env=env) as first:
        first.wait_for("master.ready", 60)
        assert http_over_unix(path)["generation"] == 1
        created = file_id(os.lstat(path))
        first.signal(signal.SIGTERM)
        assert first.wait_exit(60) == 0
    assert file_id(os.lstat(path)) == created, "the master removed the stored socket's file"

    with restarted(demo(tmp_path), path, fd_store) as second:
        # Queued in the stored socket until the new master's worker accepts it.
        assert http_over_unix(path)["generation"] == 1
        stop(second)
    assert file_id(os.lstat(path)) == created

    # systemctl stop: nobody holds the socket any more; the next start replaces the file.
    fd_store.empty()
    with running(demo(tmp_path), binds=[f"unix:{path}"], args=private) as fresh:
        fresh.wait_for("master.ready", 60)
        assert http_over_unix(path)["generation"] == 1
        fresh.signal(signal.SIGTERM)
        assert fresh.wait_exit(60) == 0
    assert not path.exists(), "a master outside systemd removes its own socket file"


def test_a_stored_socket_whose_file_is_gone_is_bound_anew(
    tmp_path: Path, fd_store: FdStore
) -> None:
    """RuntimeDirectory= without RuntimeDirectoryPreserve=: systemd removes the file."""
    path = tmp_path / "app.sock"
    private = ["--control", str(tmp_path / "ctl.sock")]
    env = {"NOTIFY_SOCKET": fd_store.path}
    with running(demo(tmp_path), binds=[f"unix:{path}"], args=private, env=env) as m:
        m.wait_for("master.ready", 60)
        m.signal(signal.SIGTERM)
        assert m.wait_exit(60) == 0
    name, _ = fd_store.wait_stored()
    path.unlink()
    with restarted(demo(tmp_path), path, fd_store) as second:
        read_event(second, "master.ready")
        assert http_over_unix(path)["generation"] == 1
        fd_store.wait_removed(name, times=2)  # once by each master, before it stored
        assert len(fd_store.stored[name]) == 1, "the pathless socket was left in the store"
        stop(second)


# -- a successor's files, stale and stuck sockets ---------------------------------------


def test_a_successors_socket_files_survive_the_master(tmp_path: Path) -> None:
    """Review finding #13 (a): the path was taken over while the master ran."""
    path, control = tmp_path / "app.sock", tmp_path / "ctl.sock"
    args = ["--ready", "delay:0", "--control", str(control)]
    with running(["sleep", "1000"], binds=[f"unix:{path}"], args=args) as m:
        start(m, control)
        path.unlink()
        control.unlink()
        with listening(path) as successor, listening(control) as other:
            m.signal(signal.SIGTERM)
            assert m.wait_exit(60) == 0
            for sock, where in ((successor, path), (other, control)):
                assert stat.S_ISSOCK(os.lstat(where).st_mode), f"{where} was removed"
                with socket.socket(socket.AF_UNIX) as client:
                    client.connect(str(where))
                sock.accept()[0].close()


@pytest.mark.parametrize("option", ["--bind", "--control"])
def test_a_stuck_listener_refuses_the_start_at_once(tmp_path: Path, option: str) -> None:
    """Review finding #13 (c): a live socket whose queue is full must not hang a start."""
    path = tmp_path / "stuck.sock"
    clients = []
    with listening(path, backlog=0):
        try:
            while True:
                client = socket.socket(socket.AF_UNIX)
                client.setblocking(False)
                clients.append(client)
                if client.connect_ex(str(path)) == errno.EAGAIN:
                    break
            args = ["--bind", f"unix:{path}"] if option == "--bind" else ["--control", str(path)]
            started = time.monotonic()
            result = handoff("run", *args, "--", "sleep", "1000", timeout=60)
            assert result.returncode == 1, shown(result)
            assert time.monotonic() - started < 30
            (error,) = error_lines(result.stderr)
            assert "address already in use (its listener is not accepting)" in error, error
            assert path.exists()
        finally:
            for client in clients:
                client.close()


@needs_root
def test_a_socket_we_may_not_connect_to_is_not_taken_for_stale(public_dir: Path) -> None:
    """Review finding #13 (b): EACCES says nothing about whether it is in use."""
    os.chown(public_dir, NOBODY, NOBODY)
    path = public_dir / "app.sock"
    listening(path).close()  # root's socket file, 0600 under root's umask here
    path.chmod(0o600)
    control = public_dir / "ctl.sock"
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    argv += [sys.executable, "-m", "handoff", "run", "--bind", f"unix:{path}"]
    argv += ["--control", str(control), "--", "sleep", "1000"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, shown(result)
    (error,) = error_lines(result.stderr)
    assert "connecting to it is not permitted" in error, error
    assert "hint:" in result.stderr
    assert stat.S_ISSOCK(os.lstat(path).st_mode), "another user's socket file was removed"


# -- the pidfile -------------------------------------------------------------------------


def test_a_second_master_never_touches_a_running_masters_pidfile(tmp_path: Path) -> None:
    """Review finding #15, also after the first master re-executed itself (upgrade)."""
    pidfile, control = tmp_path / "app.pid", tmp_path / "ctl.sock"
    args = ["--ready", "delay:0", "--pidfile", str(pidfile), "--control", str(control)]
    with running(["sleep", "1000"], args=args) as first:
        start(first, control)
        assert pidfile.read_text() == f"{first.pid}\n"
        for moment in ("running", "after an upgrade"):
            if moment == "after an upgrade":
                upgraded = handoff("upgrade", "--control", str(control))
                assert upgraded.returncode == 0, shown(upgraded)
                first.wait_for("upgrade.succeeded", 30)
            ident = file_id(os.lstat(pidfile))
            other = tmp_path / f"other-{len(moment)}.sock"
            second = handoff(
                "run", "--bind", "127.0.0.1:0", "--pidfile", str(pidfile),
                "--control", str(other), "--", "sleep", "1000",
            )  # fmt: skip
            assert second.returncode == 1, shown(second)
            (error,) = error_lines(second.stderr)
            assert f"is held by another running master (pid {first.pid})" in error, moment
            assert file_id(os.lstat(pidfile)) == ident, moment
            assert pidfile.read_text() == f"{first.pid}\n", moment
            assert not other.exists()
        assert status_of(control)["master"]["pid"] == first.pid
        first.signal(signal.SIGTERM)
        assert first.wait_exit(60) == 0
    assert not pidfile.exists()


# -- the control directory and whom a client believes -----------------------------------


@pytest.mark.parametrize("squat", ["symlink", "open", "other user"])
def test_a_squatted_default_control_directory_is_refused(tmp_path: Path, squat: str) -> None:
    """Review finding #10: the default directory's name is predictable."""
    if squat == "other user" and os.geteuid() != 0:
        pytest.skip("chown needs root")
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    directory = xdg / "handoff"
    if squat == "symlink":
        (tmp_path / "attacker").mkdir()
        directory.symlink_to(tmp_path / "attacker")
    else:
        directory.mkdir(mode=0o700)
        directory.chmod(0o777 if squat == "open" else 0o700)
        if squat == "other user":
            os.chown(directory, NOBODY, NOBODY)
    env = {"XDG_RUNTIME_DIR": str(xdg)}
    result = handoff("run", "--bind", "127.0.0.1:0", "--name", "app", "--", "sleep", "1", env=env)
    assert result.returncode == 2, shown(result)
    (error,) = error_lines(result.stderr)
    assert f"the control socket directory {directory} " in error, error
    assert "XDG_RUNTIME_DIR" in result.stderr.split("hint:", 1)[1]
    assert "Traceback" not in result.stderr
    assert not (directory / "app.handoff.sock").exists()


IMPOSTOR = r"""
import socket, sys
server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
server.listen(8)
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    conn.settimeout(5)
    try:
        got = conn.recv(65536)
    except OSError:
        got = b""
    print("got", len(got), flush=True)
    try:
        conn.sendall(b'{"v": 1, "type": "result", "ok": true, "pid": 1, "accepted": "started"}\n')
    except OSError:
        pass
    conn.close()
"""


@needs_root
def test_a_client_does_not_believe_a_socket_someone_else_planted(public_dir: Path) -> None:
    """A squatted directory in /tmp, a socket of another user answering ok: every command
    fails with one line, and the impostor gets no request."""
    os.chown(public_dir, NOBODY, NOBODY)
    path = public_dir / "app.handoff.sock"
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    with subprocess.Popen(
        [*argv, sys.executable, "-c", IMPOSTOR, str(path)], stdout=subprocess.PIPE, text=True
    ) as impostor:
        try:
            assert impostor.stdout is not None
            assert impostor.stdout.readline() == "listening\n"
            for command in (["reload"], ["stop"], ["status"], ["scale", "2"]):
                result = handoff(*command, "--control", str(path))
                assert result.returncode == 1, shown(result)
                (error,) = error_lines(result.stderr)
                assert f"not trusting the process at {path}: it runs as uid {NOBODY}" in error
                assert "hint:" in result.stderr
                line = impostor.stdout.readline()
                assert line == "got 0\n", f"the impostor was sent a request: {line}"
        finally:
            impostor.kill()


def read_event(process: subprocess.Popen[bytes], name: str, timeout: float = 30.0) -> None:
    """Read the master's JSON lines (unbuffered, from its stdout pipe) until `name`."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    pending = b""
    seen: list[bytes] = []
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 65536)
        assert chunk, f"the master exited before {name}: {seen[-20:]}"
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            seen.append(line[:300])
            if line.startswith(b"{") and json.loads(line).get("event") == name:
                return
    raise AssertionError(f"no {name} within {timeout} s; last lines: {seen[-20:]}")


@needs_root
def test_a_control_group_member_reaches_a_master_of_another_user() -> None:
    """The master runs as nobody with --control-group; a client of another uid in that
    (supplementary) group is served, and believes the master; a non-member is refused."""
    if os.stat("/run").st_uid != 0 or os.stat("/run").st_mode & 0o022:
        pytest.skip("/run is not a root-only directory here")
    directory = Path(tempfile.mkdtemp(prefix="handoff-sf-", dir="/run"))
    try:
        directory.chmod(0o755)
        os.chown(directory, NOBODY, NOBODY)
        control = directory / "ctl.sock"
        argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", f"--groups={GROUP}"]
        argv += [sys.executable, "-m", "handoff", "run", "--log-format", "json"]
        argv += ["--bind", "127.0.0.1:0", "--ready", "delay:0", "--control", str(control)]
        argv += ["--control-group", str(GROUP), "--", "sleep", "1000"]
        with subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        ) as master:
            try:
                read_event(master, "master.ready")
                member = ["setpriv", f"--reuid={STRANGER}", f"--regid={STRANGER}"]
                member += [f"--groups={GROUP}", sys.executable, "-m", "handoff"]
                result = subprocess.run(
                    [*member, "status", "--json", "--control", str(control)],
                    capture_output=True, text=True, timeout=60, check=False,
                )  # fmt: skip
                assert result.returncode == 0, shown(result)
                assert json.loads(result.stdout)["master"]["pid"] == master.pid
                outsider = handoff("status", "--control", str(control), user=STRANGER)
                assert outsider.returncode == 1, shown(outsider)
                assert "permission denied" in error_lines(outsider.stderr)[0]
                master.send_signal(signal.SIGTERM)
                assert master.wait(60) == 0
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(master.pid, signal.SIGKILL)
    finally:
        subprocess.run(["rm", "-rf", str(directory)], check=False, timeout=30)


@needs_root
def test_a_control_group_the_master_is_not_in_is_a_usage_error(public_dir: Path) -> None:
    os.chown(public_dir, NOBODY, NOBODY)
    control = public_dir / "ctl.sock"
    result = handoff(
        "run", "--bind", "127.0.0.1:0", "--control", str(control), "--control-group", "0",
        "--", "sleep", "1000",
        user=NOBODY,
    )  # fmt: skip
    assert result.returncode == 2, shown(result)
    (error,) = error_lines(result.stderr)
    assert "--control-group 0: cannot give the control socket to group 0" in error
    assert "member" in result.stderr.split("hint:", 1)[1]
    assert "Traceback" not in result.stderr
    assert not control.exists()
