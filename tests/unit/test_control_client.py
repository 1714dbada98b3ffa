"""Finding a master's control socket: --control, --pidfile, --name and the default paths.

`--pidfile` reads the master's sockets from /proc. No master runs: a small child Python
stands in for one (`stand_in`), listening on the unix sockets a test names. It cannot be
this test's own process, whose /proc/self/fd listing changes while it is read.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from handoff.cli.control_client import LOCATE_HINT, locate
from handoff.errors import HandoffError
from handoff.formats.options import default_control_path

UID = 1000
XDG = {"XDG_RUNTIME_DIR": "/run/user/1000"}
RUNTIME = {"RUNTIME_DIRECTORY": "/run/app"}


def locate_by(
    *,
    control: str | None = None,
    pidfile: str | Path | None = None,
    name: str | None = None,
    environ: dict[str, str] | None = None,
) -> str:
    return locate(
        control=control,
        pidfile=None if pidfile is None else str(pidfile),
        name=name,
        environ=environ or {},
        uid=UID,
    )


def refusal(**where: Any) -> HandoffError:
    """The error locate_by(**where) raises; each carries the same hint."""
    with pytest.raises(HandoffError) as caught:
        locate_by(**where)
    assert caught.value.hint == LOCATE_HINT
    return caught.value


def pidfile_with(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "master.pid"
    path.write_text(text)
    return path


@pytest.fixture
def pid_max() -> int:
    with open("/proc/sys/kernel/pid_max", encoding="ascii") as f:
        return int(f.read())


# Binds each (path, listening) of argv[1], says "ready", and holds them until stdin closes.
STAND_IN = r"""
import json, socket, sys
held = []
for path, listening in json.loads(sys.argv[1]):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    if listening:
        sock.listen()
    held.append(sock)
print("ready", flush=True)
sys.stdin.read()
"""

Sockets = Callable[[dict[str, bool]], Path]


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[Sockets]:
    """stand_in({name: listening, ...}): a process holding those sockets; its pidfile."""
    started: list[subprocess.Popen[str]] = []

    def start(sockets: dict[str, bool]) -> Path:
        order = [(str(tmp_path / name), listening) for name, listening in sockets.items()]
        child = subprocess.Popen(
            [sys.executable, "-c", STAND_IN, json.dumps(order)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(child)
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n", "the stand-in did not start"
        pidfile = tmp_path / f"stand-in-{len(started)}.pid"
        pidfile.write_text(f"{child.pid}\n")
        return pidfile

    yield start
    for child in started:
        assert child.stdin is not None
        child.stdin.close()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(10)
        assert child.stdout is not None
        child.stdout.close()


# -- default_control_path -------------------------------------------------------------------


def test_runtime_directory_holds_handoff_sock_whatever_the_name() -> None:
    assert default_control_path(RUNTIME, UID, "app") == "/run/app/handoff.sock"
    assert default_control_path(RUNTIME, UID, "") == "/run/app/handoff.sock"


@pytest.mark.parametrize(
    "directories", ["/run/app:/run/app-cache", "/run/app:/run/b:/run/c", "/run/app:"]
)
def test_of_several_runtime_directories_the_first_is_used(directories: str) -> None:
    environ = {"RUNTIME_DIRECTORY": directories}
    assert default_control_path(environ, UID, "app") == "/run/app/handoff.sock"


def test_runtime_directory_comes_before_xdg_runtime_dir() -> None:
    assert default_control_path({**XDG, **RUNTIME}, UID, "app") == "/run/app/handoff.sock"


def test_xdg_runtime_dir_holds_a_handoff_directory_with_one_socket_per_name() -> None:
    assert default_control_path(XDG, UID, "app") == "/run/user/1000/handoff/app.handoff.sock"
    assert default_control_path(XDG, UID, "web") == "/run/user/1000/handoff/web.handoff.sock"


def test_an_empty_runtime_directory_is_as_if_unset() -> None:
    environ = {"RUNTIME_DIRECTORY": "", **XDG}
    assert default_control_path(environ, UID, "app") == "/run/user/1000/handoff/app.handoff.sock"


def test_without_a_runtime_dir_the_socket_is_under_tmp_per_uid() -> None:
    assert default_control_path({}, UID, "app") == "/tmp/handoff-1000/app.handoff.sock"
    assert default_control_path({}, 0, "app") == "/tmp/handoff-0/app.handoff.sock"


def test_an_empty_xdg_runtime_dir_is_as_if_unset() -> None:
    environ = {"XDG_RUNTIME_DIR": ""}
    assert default_control_path(environ, UID, "app") == "/tmp/handoff-1000/app.handoff.sock"


def test_other_variables_do_not_move_the_socket() -> None:
    environ = {"HOME": "/home/u", "TMPDIR": "/var/tmp", "RUNTIME_DIR": "/x"}
    assert default_control_path(environ, UID, "app") == "/tmp/handoff-1000/app.handoff.sock"


# -- locate: --control and --name -----------------------------------------------------------


def test_control_is_taken_as_given() -> None:
    assert locate_by(control="relative/ctl.sock") == "relative/ctl.sock"
    assert locate_by(control="/nowhere/ctl.sock") == "/nowhere/ctl.sock"


def test_control_comes_before_pidfile_and_name(tmp_path: Path) -> None:
    missing = tmp_path / "no.pid"
    chosen = locate_by(control="/x/ctl.sock", pidfile=missing, name="app", environ=XDG)
    assert chosen == "/x/ctl.sock"


def test_name_gives_the_default_path_for_that_name() -> None:
    assert locate_by(name="app", environ=XDG) == "/run/user/1000/handoff/app.handoff.sock"
    assert locate_by(name="app") == "/tmp/handoff-1000/app.handoff.sock"
    assert locate_by(name="app", environ=RUNTIME) == "/run/app/handoff.sock"


def test_with_runtime_directory_set_no_option_is_needed() -> None:
    assert locate_by(environ=RUNTIME) == "/run/app/handoff.sock"


@pytest.mark.parametrize("environ", [{}, XDG, {"RUNTIME_DIRECTORY": ""}])
def test_without_an_option_or_runtime_directory_the_user_must_say_which_master(
    environ: dict[str, str],
) -> None:
    refused = refusal(environ=environ)
    assert refused.message == "which master? no --control, --pidfile or --name given"


def test_empty_options_count_as_not_given() -> None:
    refused = refusal(control="", pidfile="", name="")
    assert refused.message == "which master? no --control, --pidfile or --name given"


# -- locate: --pidfile ----------------------------------------------------------------------


def test_pidfile_finds_the_control_socket_the_process_listens_on(
    tmp_path: Path, stand_in: Sockets
) -> None:
    pidfile = stand_in({"app.handoff.sock": True})
    assert locate_by(pidfile=pidfile) == str(tmp_path / "app.handoff.sock")


@pytest.mark.parametrize("layout", ["{pid}", "{pid}\n", "  {pid}  \n", "{pid} extra\nmore\n"])
def test_pidfile_takes_the_first_word_as_the_pid(
    tmp_path: Path, stand_in: Sockets, layout: str
) -> None:
    pid = int(stand_in({"app.handoff.sock": True}).read_text())
    pidfile = pidfile_with(tmp_path, layout.format(pid=pid))
    assert locate_by(pidfile=pidfile) == str(tmp_path / "app.handoff.sock")


def test_pidfile_comes_before_name(tmp_path: Path, stand_in: Sockets) -> None:
    pidfile = stand_in({"app.handoff.sock": True})
    found = locate_by(pidfile=pidfile, name="other", environ=XDG)
    assert found == str(tmp_path / "app.handoff.sock")


def test_of_several_listening_sockets_the_control_socket_is_found(
    tmp_path: Path, stand_in: Sockets
) -> None:
    pidfile = stand_in(
        {"web.sock": True, "idle.handoff.sock": False, "handoff.sock": True, "x.sock": True}
    )
    assert locate_by(pidfile=pidfile) == str(tmp_path / "handoff.sock")


def test_a_pidfile_that_does_not_exist_is_an_error_naming_it(tmp_path: Path) -> None:
    pidfile = tmp_path / "absent.pid"
    refused = refusal(pidfile=pidfile)
    assert refused.message == f"cannot read a pid from {pidfile}"


def test_a_directory_given_as_pidfile_is_an_error_naming_it(tmp_path: Path) -> None:
    refused = refusal(pidfile=tmp_path)
    assert refused.message == f"cannot read a pid from {tmp_path}"


@pytest.mark.parametrize("content", ["", "\n", "   ", "pid\n", "12a\n", "1.5\n", "0x10\n"])
def test_a_pidfile_without_a_pid_is_an_error_naming_it(tmp_path: Path, content: str) -> None:
    pidfile = pidfile_with(tmp_path, content)
    refused = refusal(pidfile=pidfile)
    assert refused.message == f"cannot read a pid from {pidfile}"


def test_a_pidfile_that_is_not_text_is_an_error_naming_it(tmp_path: Path) -> None:
    pidfile = tmp_path / "master.pid"
    pidfile.write_bytes(b"\xff\xfe1234\n")
    refused = refusal(pidfile=pidfile)
    assert refused.message == f"cannot read a pid from {pidfile}"


def test_a_pid_no_process_has_is_an_error_naming_pid_and_pidfile(
    tmp_path: Path, pid_max: int
) -> None:
    pid = pid_max + 1  # above the kernel's limit: never a process
    pidfile = pidfile_with(tmp_path, f"{pid}\n")
    refused = refusal(pidfile=pidfile)
    assert refused.message == f"no handoff master with pid {pid} (from {pidfile})"


def test_a_process_without_sockets_is_an_error_naming_pid_and_pidfile(
    stand_in: Sockets,
) -> None:
    pidfile = stand_in({})
    pid = int(pidfile.read_text())
    refused = refusal(pidfile=pidfile)
    assert refused.message == f"pid {pid} (from {pidfile}) has no handoff control socket"


def test_a_control_socket_name_that_is_bound_but_not_listening_is_not_taken(
    stand_in: Sockets,
) -> None:
    refused = refusal(pidfile=stand_in({"app.handoff.sock": False}))
    assert refused.message.endswith("has no handoff control socket")


def test_a_listening_socket_not_named_like_a_control_socket_is_not_taken(
    stand_in: Sockets,
) -> None:
    refused = refusal(pidfile=stand_in({"app.sock": True, "handoff.sock.old": True}))
    assert refused.message.endswith("has no handoff control socket")


def test_a_control_socket_another_process_listens_on_is_not_taken(
    tmp_path: Path, stand_in: Sockets
) -> None:
    stand_in({"app.handoff.sock": True})
    refused = refusal(pidfile=stand_in({"web.sock": True}))
    assert refused.message.endswith("has no handoff control socket")
