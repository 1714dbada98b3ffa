"""system/runtime_files.py and the socket-file parts of system/sockets.py, on real files,
real sockets and real processes: whose socket file is removed, what counts as a stale
socket, the control directory's checks, who a client believes, and the pidfile lock.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from handoff.errors import EXIT_USAGE, BindError, ConfigError, HandoffError
from handoff.system.runtime_files import (
    PidFile,
    bound_file,
    close_unix_socket,
    file_id,
    prepare_control_directory,
    untrusted_peer,
)
from handoff.system.sockets import (
    bind_control_socket,
    peer_credentials,
    peer_groups,
    probe_unix_socket,
    remove_stale_unix_socket,
)

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")
pytestmark = pytest.mark.timeout(60)


def listening(path: Path, backlog: int = 8) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(backlog)
    return sock


def stale(path: Path) -> None:
    """A socket file nobody listens on (its process is gone)."""
    listening(path).close()


def run_python(code: str, *, user: int | None = None) -> subprocess.CompletedProcess[str]:
    prefix = (
        [] if user is None else ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    )
    return subprocess.run(
        [*prefix, sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory outside pytest's root-only tmp_path, owned by nobody."""
    path = Path(tempfile.mkdtemp(prefix="handoff-rf-"))
    path.chmod(0o755)
    os.chown(path, NOBODY, NOBODY)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False, timeout=30)


# -- socket files: ours or a successor's --------------------------------------------------


def test_our_socket_file_is_removed_at_close(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    sock = listening(path)
    close_unix_socket(sock, str(path), file_id(os.lstat(path)))
    assert not path.exists()


def test_a_successors_socket_file_survives_our_close(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    ours = listening(path)
    created = file_id(os.lstat(path))
    path.unlink()
    with listening(path) as successor:
        close_unix_socket(ours, str(path), created)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))  # still the successor's, still served
        successor.accept()[0].close()


def test_without_a_record_the_kernel_says_which_file_is_ours(tmp_path: Path) -> None:
    """A re-executed master has no record: sock_diag names the bound file."""
    path = tmp_path / "s.sock"
    ours = listening(path)
    found = bound_file(ours)
    if found is None:
        ours.close()
        pytest.skip("no unix_diag (NETLINK_SOCK_DIAG) on this kernel")
    info = os.lstat(path)
    assert found == (info.st_dev, info.st_ino & 0xFFFFFFFF)
    path.unlink()
    with listening(path):
        close_unix_socket(ours, str(path), None)
        assert path.exists(), "a successor's file was removed"
    ours2 = listening(tmp_path / "t.sock")
    close_unix_socket(ours2, str(tmp_path / "t.sock"), None)
    assert not (tmp_path / "t.sock").exists()


# -- stale or in use ----------------------------------------------------------------------


def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    stale(path)
    assert probe_unix_socket(str(path)) == errno.ECONNREFUSED
    remove_stale_unix_socket(str(path), "--bind unix:x")
    assert not path.exists()
    with listening(path):
        with pytest.raises(BindError, match="address already in use"):
            remove_stale_unix_socket(str(path), "--bind unix:x")
        assert path.exists()


def test_a_full_backlog_refuses_at_once_instead_of_hanging(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    clients: list[socket.socket] = []
    with listening(path, backlog=0) as stuck:
        try:
            while True:  # fill its queue: it never accepts
                client = socket.socket(socket.AF_UNIX)
                client.setblocking(False)
                clients.append(client)
                if client.connect_ex(str(path)) == errno.EAGAIN:
                    break
            started = time.monotonic()
            with pytest.raises(BindError, match="not accepting"):
                remove_stale_unix_socket(str(path), "--bind unix:x")
            assert time.monotonic() - started < 5
            with pytest.raises(BindError, match="already in use"):
                bind_control_socket(str(path), None, 8)
            assert path.exists()
        finally:
            for client in clients:
                client.close()
        assert stuck.fileno() >= 0


def test_permission_denied_is_not_stale(tmp_path: Path, public_dir: Path) -> None:
    """EACCES on connect says nothing about the socket: it must not be removed."""
    path = (public_dir if os.geteuid() == 0 else tmp_path) / "s.sock"
    stale(path)
    path.chmod(0o600 if os.geteuid() == 0 else 0o000)  # root: another user will look
    code = f"""
        import errno
        from handoff.errors import BindError
        from handoff.system.sockets import probe_unix_socket, remove_stale_unix_socket
        assert probe_unix_socket({str(path)!r}) == errno.EACCES, probe_unix_socket({str(path)!r})
        try:
            remove_stale_unix_socket({str(path)!r}, "--bind unix:x")
        except BindError as exc:
            print(exc.message)
            print(exc.hint)
    """
    result = run_python(code, user=NOBODY if os.geteuid() == 0 else None)
    assert result.returncode == 0, result.stderr
    message, hint = result.stdout.splitlines()
    assert "not permitted" in message, message
    assert "cannot be told" in message, message
    assert "owner" in hint, hint
    assert stat.S_ISSOCK(os.lstat(path).st_mode), "the socket file was removed"


# -- the control socket -------------------------------------------------------------------


def test_the_control_socket_is_private_and_removed_only_if_ours(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    sock, created = bind_control_socket(str(path), None, 8)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert sock.getblocking() is False
    path.unlink()
    with listening(path):
        close_unix_socket(sock, str(path), created)
        assert path.exists()


def test_a_control_group_gets_the_socket_and_peer_groups_come_from_the_kernel(
    tmp_path: Path,
) -> None:
    group = os.getgroups()[0] if os.getgroups() else os.getegid()
    path = tmp_path / "ctl.sock"
    sock, created = bind_control_socket(str(path), group, 8)
    info = os.lstat(path)
    assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, group)
    sock.setblocking(True)
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))
        server, _ = sock.accept()
        with server:
            pid, uid, gid = peer_credentials(server)
            assert (pid, uid, gid) == (os.getpid(), os.geteuid(), os.getegid())
            assert peer_groups(server, pid) == set(os.getgroups())
    close_unix_socket(sock, str(path), created)
    assert not path.exists()


@needs_root
def test_a_group_the_user_is_not_in_is_a_clear_error(public_dir: Path) -> None:
    path = public_dir / "ctl.sock"
    code = f"""
        from handoff.errors import HandoffError
        from handoff.system.sockets import bind_control_socket
        try:
            bind_control_socket({str(path)!r}, 0, 8)
        except HandoffError as exc:
            print(type(exc).__name__, exc.exit_code, exc.message, "|", exc.hint)
    """
    result = run_python(code, user=NOBODY)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ConfigError {EXIT_USAGE} --control-group 0: cannot give")
    assert "member" in result.stdout
    assert not path.exists(), "the half-made socket was left behind"


# -- the control directory ----------------------------------------------------------------


@pytest.fixture
def xdg(tmp_path: Path) -> dict[str, str]:
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    return {"XDG_RUNTIME_DIR": str(runtime)}


def control_in(environ: dict[str, str]) -> Path:
    return Path(environ["XDG_RUNTIME_DIR"]) / "handoff" / "app.handoff.sock"


def refusal(path: Path, environ: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        prepare_control_directory(str(path), environ)
    assert caught.value.exit_code == EXIT_USAGE
    assert "XDG_RUNTIME_DIR" in (caught.value.hint or "")
    assert "\n" not in caught.value.message
    return caught.value


def test_the_default_directory_is_made_0700_whatever_the_umask(xdg: dict[str, str]) -> None:
    path = control_in(xdg)
    previous = os.umask(0o777)
    try:
        prepare_control_directory(str(path), xdg)
    finally:
        os.umask(previous)
    info = os.lstat(path.parent)
    assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o700, os.geteuid())
    prepare_control_directory(str(path), xdg)  # and it is accepted next time


def test_a_symlinked_default_directory_is_refused(xdg: dict[str, str], tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    path = control_in(xdg)
    path.parent.symlink_to(elsewhere)
    assert "symlink" in refusal(path, xdg).message


def test_an_open_default_directory_is_refused(xdg: dict[str, str]) -> None:
    path = control_in(xdg)
    path.parent.mkdir()
    path.parent.chmod(0o777)
    assert "mode 0777" in refusal(path, xdg).message


@needs_root
def test_a_default_directory_of_another_user_is_refused(xdg: dict[str, str]) -> None:
    path = control_in(xdg)
    path.parent.mkdir(mode=0o700)
    os.chown(path.parent, NOBODY, NOBODY)
    assert f"belongs to uid {NOBODY}" in refusal(path, xdg).message


def test_a_chosen_directory_is_the_operators_choice(tmp_path: Path) -> None:
    chosen = tmp_path / "run"
    chosen.mkdir(mode=0o755)
    prepare_control_directory(str(chosen / "ctl.sock"), {})
    prepare_control_directory(str(tmp_path / "new" / "ctl.sock"), {})
    assert stat.S_IMODE(os.lstat(tmp_path / "new").st_mode) == 0o700


# -- who a client believes ----------------------------------------------------------------


def test_ourselves_and_root_are_believed_anywhere(tmp_path: Path) -> None:
    assert untrusted_peer("/tmp/anything.sock", os.geteuid(), os.geteuid()) is None
    assert untrusted_peer("/tmp/anything.sock", 0, 1234) is None


@needs_root
def test_another_uid_only_where_no_one_else_could_have_put_its_socket() -> None:
    """A --control-group master runs as another uid: believed in its own directory, not
    in one anyone can write to (a squatted /tmp/handoff-UID is in /tmp)."""
    if os.stat("/run").st_uid != 0 or os.stat("/run").st_mode & 0o022:
        pytest.skip("/run is not a root-only directory here")
    own = Path(tempfile.mkdtemp(prefix="handoff-rf-", dir="/run"))
    squat = Path(tempfile.mkdtemp(prefix="handoff-rf-"))  # under /tmp
    try:
        for directory in (own, squat):
            directory.chmod(0o755)
            os.chown(directory, NOBODY, NOBODY)
            stale(directory / "ctl.sock")
            os.chown(directory / "ctl.sock", NOBODY, NOBODY)
        me = 4242
        assert untrusted_peer(str(own / "ctl.sock"), NOBODY, me) is None
        assert "/tmp is writable by others" in str(
            untrusted_peer(str(squat / "ctl.sock"), NOBODY, me)
        )
        link = squat / "link"
        link.symlink_to(own)  # the literal path leads through /tmp too
        assert "writable by others" in str(untrusted_peer(str(link / "ctl.sock"), NOBODY, me))
        assert "belongs to uid" in str(untrusted_peer(str(own / "ctl.sock"), 4343, me))
        own.chmod(0o777)
        assert "writable by others" in str(untrusted_peer(str(own / "ctl.sock"), NOBODY, me))
    finally:
        subprocess.run(["rm", "-rf", str(own), str(squat)], check=False, timeout=30)


# -- the pidfile --------------------------------------------------------------------------

TAKE = """
    import sys
    from handoff.errors import HandoffError
    from handoff.system.runtime_files import PidFile
    try:
        PidFile.take(sys.argv[1] if len(sys.argv) > 1 else {path!r})
    except HandoffError as exc:
        print(exc.message, "|", exc.hint)
        sys.exit(1)
    print("taken")
"""


def take_elsewhere(path: Path) -> subprocess.CompletedProcess[str]:
    """Another master's attempt, from another process."""
    return run_python(TAKE.format(path=str(path)))


def test_the_pidfile_is_locked_and_a_second_master_never_touches_it(tmp_path: Path) -> None:
    path = tmp_path / "app.pid"
    held = PidFile.take(str(path))
    try:
        assert path.read_text() == f"{os.getpid()}\n"
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o644
        before = file_id(os.lstat(path))
        result = take_elsewhere(path)
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"held by another running master (pid {os.getpid()})" in result.stdout
        assert file_id(os.lstat(path)) == before
        assert path.read_text() == f"{os.getpid()}\n"
        assert sorted(os.listdir(tmp_path)) == ["app.pid"], "a temporary file was left"
    finally:
        held.release()
    assert not path.exists()
    assert take_elsewhere(path).stdout.strip() == "taken"  # free once released


def test_a_stale_pidfile_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "app.pid"
    path.write_text("999999\n")
    held = PidFile.take(str(path))
    assert path.read_text() == f"{os.getpid()}\n"
    held.release()


def test_a_successors_pidfile_is_not_removed(tmp_path: Path) -> None:
    path = tmp_path / "app.pid"
    held = PidFile.take(str(path))
    path.unlink()
    path.write_text("4242\n")  # someone else's now
    held.release()
    assert path.read_text() == "4242\n"


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_a_pidfile_path_that_is_not_a_regular_file_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "app.pid"
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    if kind == "symlink":
        path.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(path)  # an open that waits for a writer would hang the start
    else:
        path.mkdir()
    with pytest.raises(HandoffError, match="--pidfile"):
        PidFile.take(str(path))
    assert target.read_text() == "keep me\n"
    assert os.path.lexists(path)


REEXEC = """
    import os, sys
    from handoff.system import runtime_files
    path = sys.argv[1]
    if sys.argv[2] == "first":
        runtime_files.hold_pidfile(path)
        keep = sys.argv[3] == "keep"
        for fd in runtime_files.pidfile_lock_fds():
            os.set_inheritable(fd, keep)  # what a re-exec does with the fds it keeps
        os.execv(sys.executable, [sys.executable, "-c", sys.argv[4], path, "second"])
    held = runtime_files.hold_pidfile(path)
    print(os.getpid(), held.fd, flush=True)
    sys.stdin.readline()
    runtime_files.release_pidfile(path)
"""


@pytest.mark.parametrize("keep", ["keep", "close"])
def test_a_master_reexecuted_in_place_takes_its_pidfile_back(tmp_path: Path, keep: str) -> None:
    """Same pid after execve: with the lock fd kept it is found again (the lock never
    lapses); with it closed, the free lock is taken again. Others stay refused."""
    path = tmp_path / "app.pid"
    code = textwrap.dedent(REEXEC)
    with subprocess.Popen(
        [sys.executable, "-c", code, str(path), "first", keep, code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as master:
        try:
            assert master.stdout is not None
            assert master.stdin is not None
            pid, _ = master.stdout.readline().split()
            assert int(pid) == master.pid
            assert path.read_text() == f"{master.pid}\n"
            result = take_elsewhere(path)
            assert result.returncode == 1, result.stdout + result.stderr
            assert f"(pid {master.pid})" in result.stdout
            master.stdin.write("\n")
            master.stdin.flush()
            assert master.wait(30) == 0
            assert not path.exists()
        finally:
            master.kill()
            master.wait(30)
