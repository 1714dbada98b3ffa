"""Spawning never freezes the master (review #14): the child looks the command up in PATH,
and the wait for its execve is bounded.

A hung NFS or FUSE mount is what makes execve block in real life. Here a fanotify
permission mark (FAN_OPEN_EXEC_PERM) does the same for real: the kernel holds every
execve of the marked file until the test answers, exactly as a mount that does not
answer would. That needs CAP_SYS_ADMIN; without it those tests are skipped, and the
bounded read itself is still checked on a pipe whose writer never closes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import shutil
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from handoff.core.model import ExitStatus
from handoff.errors import SpawnError
from handoff.system import children

pytestmark = pytest.mark.timeout(30)

_FAN_CLOEXEC = 0x1
_FAN_CLASS_CONTENT = 0x4
_FAN_MARK_ADD = 0x1
_FAN_OPEN_EXEC_PERM = 0x40000
_FAN_ALLOW = 0x1
_FAN_DENY = 0x2
_AT_FDCWD = -100
_METADATA = struct.Struct("IBBHQii")  # struct fanotify_event_metadata


class ExecGate:
    """Every execve of one file waits until the test lets it through or refuses it."""

    def __init__(self, path: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fanotify_mark.argtypes = [
            ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p,
        ]  # fmt: skip
        fd = libc.fanotify_init(_FAN_CLOEXEC | _FAN_CLASS_CONTENT, os.O_RDONLY)
        if fd < 0:
            code = ctypes.get_errno()
            pytest.skip(f"fanotify permission events need CAP_SYS_ADMIN ({os.strerror(code)})")
        if libc.fanotify_mark(fd, _FAN_MARK_ADD, _FAN_OPEN_EXEC_PERM, _AT_FDCWD, bytes(path)):
            code = ctypes.get_errno()
            os.close(fd)
            pytest.skip(f"fanotify_mark: {os.strerror(code)}")
        self.fd = fd

    def held(self, timeout_s: float) -> tuple[int, int]:
        """The next execve being held: (the event's fd, the pid in execve)."""
        assert select.select([self.fd], [], [], timeout_s)[0], "no execve was held"
        _, _, _, _, _, event_fd, pid = _METADATA.unpack_from(os.read(self.fd, 4096))
        return event_fd, pid

    def answer(self, event_fd: int, *, allow: bool) -> None:
        os.write(self.fd, struct.pack("iI", event_fd, _FAN_ALLOW if allow else _FAN_DENY))
        os.close(event_fd)

    def close(self) -> None:
        os.close(self.fd)  # every execve still held goes on (the kernel allows it)


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[tuple[Path, ExecGate]]:
    """A copy of /bin/true in its own directory, whose every execve is held."""
    directory = tmp_path / "hung-mount"
    directory.mkdir()
    program = directory / "app"
    shutil.copy("/bin/true", program)
    gate = ExecGate(program)
    try:
        yield program, gate
    finally:
        gate.close()


@contextlib.contextmanager
def owned(child: children.Child) -> Iterator[children.Child]:
    """The child is killed and reaped whatever the test's outcome."""
    try:
        yield child
    finally:
        if child.pidfd >= 0:
            children.send_signal(child, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):  # the test reaped it already
                children.wait(child, block=True)
            child.close()


def request(executable: str, search_path: str | None = None) -> children.SpawnRequest:
    return children.SpawnRequest(
        executable=executable, argv=[executable], env={}, search_path=search_path
    )


def test_an_execve_that_hangs_returns_the_child_as_started_after_the_deadline(
    gated: tuple[Path, ExecGate],
) -> None:
    program, gate = gated
    started = time.monotonic()

    spawned = children.spawn(request("app", search_path=str(program.parent)))

    elapsed = time.monotonic() - started
    with owned(spawned) as child:
        assert children.EXEC_RESULT_WAIT_S <= elapsed < children.EXEC_RESULT_WAIT_S + 2
        event_fd, pid = gate.held(5)
        assert pid == child.pid
        assert children.wait(child) is None  # still in execve
        # The exec fails after the master stopped waiting: it is an exit like any other
        # (127), not a death by SIGPIPE on the closed pipe.
        gate.answer(event_fd, allow=False)
        assert children.wait(child, block=True) == ExitStatus(code=127)


def test_an_execve_that_goes_on_after_the_deadline_is_a_running_child(
    gated: tuple[Path, ExecGate],
) -> None:
    program, gate = gated

    with owned(children.spawn(request(str(program)), exec_wait_s=0.2)) as child:
        event_fd, pid = gate.held(5)
        assert pid == child.pid
        gate.answer(event_fd, allow=True)
        assert children.wait(child, block=True) == ExitStatus(code=0)  # it ran: /bin/true


def test_the_bounded_read_gives_up_on_a_writer_that_never_closes() -> None:
    reader, writer = os.pipe2(os.O_CLOEXEC)
    try:
        started = time.monotonic()
        assert children.read_until_closed(reader, 0.2) is None
        assert 0.2 <= time.monotonic() - started < 2
        os.write(writer, b"abcd")
        os.close(writer)
        writer = -1
        assert children.read_until_closed(reader, 5) == b"abcd"
    finally:
        os.close(reader)
        if writer >= 0:
            os.close(writer)


# -- the child searches PATH, with the errors the master used to give -------------------------


def executable(path: Path, text: str, mode: int = 0o755) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def run(spawn: children.SpawnRequest) -> ExitStatus:
    with owned(children.spawn(spawn)) as child:
        status = children.wait(child, block=True)
    assert status is not None
    return status


def test_a_command_in_no_path_directory_is_command_not_found(tmp_path: Path) -> None:
    with pytest.raises(SpawnError) as raised:
        children.spawn(request("handoff-no-such-app", search_path=f"{tmp_path}:/usr/bin:/bin"))

    assert raised.value.message == "command not found: 'handoff-no-such-app'"


def test_an_empty_path_finds_nothing() -> None:
    with pytest.raises(SpawnError) as raised:
        children.spawn(request("true", search_path=""))

    assert raised.value.message == "command not found: 'true'"


def test_a_missing_path_with_a_slash_is_command_not_found(tmp_path: Path) -> None:
    with pytest.raises(SpawnError) as raised:
        children.spawn(request(str(tmp_path / "gone"), search_path="/bin"))

    assert raised.value.message == f"command not found: '{tmp_path}/gone'"


def test_the_first_executable_in_path_order_runs(tmp_path: Path) -> None:
    first, second, third = (tmp_path / name for name in ("first", "second", "third"))
    for directory in (first, second, third):
        directory.mkdir()
    (first / "app").mkdir()  # a directory is passed over
    executable(second / "app", "#!/bin/sh\nexit 7\n", mode=0o644)  # not executable: passed over
    executable(third / "app", "#!/bin/sh\nexit 9\n")
    path = os.pathsep.join(map(str, (tmp_path / "missing", first, second, third)))

    assert run(request("app", search_path=path)) == ExitStatus(code=9)
    assert shutil.which("app", path=path) == str(third / "app")


def test_a_found_file_that_cannot_run_names_its_path(tmp_path: Path) -> None:
    executable(tmp_path / "app", "\x7fELF but not really\n")  # executable, not a program

    with pytest.raises(SpawnError) as raised:
        children.spawn(request("app", search_path=f"/nonexistent:{tmp_path}"))

    assert raised.value.message == f"cannot execute '{tmp_path}/app': Exec format error"


def test_without_a_search_path_the_executable_runs_as_given(tmp_path: Path) -> None:
    with pytest.raises(SpawnError) as raised:
        children.spawn(request(str(tmp_path / "gone")))

    assert raised.value.message == (
        f"cannot execute '{tmp_path}/gone': {os.strerror(errno.ENOENT)}"
    )


@pytest.mark.parametrize(
    ("command", "path"),
    [
        ("app", "/usr/local/bin:/usr/bin:/usr/local/bin:/bin"),
        ("app", ":/bin"),
        ("app", "/bin::"),
        ("./app", "/bin"),
        ("bin/app", "/usr"),
        ("app", "relative/dir:/bin"),
    ],
)
def test_the_candidates_are_which_s_in_which_s_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, path: str
) -> None:
    """Each candidate in turn made the only executable one: which finds exactly it; with
    all of them there, which finds the first."""
    monkeypatch.chdir(tmp_path)  # relative directories and names are looked up from here
    rooted = os.pathsep.join(
        str(tmp_path / "root" / d.lstrip("/")) if d.startswith("/") else d
        for d in path.split(os.pathsep)
    )
    candidates = children.exec_candidates(command, rooted)
    assert candidates
    assert len(candidates) == len(set(candidates))
    for candidate in candidates:
        file = Path(candidate)
        file.parent.mkdir(parents=True, exist_ok=True)
        executable(file, "#!/bin/sh\n")
        assert shutil.which(command, path=rooted) == candidate
        file.chmod(0o644)
    for candidate in candidates:
        Path(candidate).chmod(0o755)
    assert shutil.which(command, path=rooted) == candidates[0]
