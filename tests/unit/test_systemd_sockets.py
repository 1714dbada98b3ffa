"""The sockets systemd passes to the master: which are taken, adopted, or closed.

`resolve` and `store_name` are pure. `passed_sockets` works on fds 3.. of the process
itself, which in pytest's process belong to pytest: its cases with sockets run in a
child Python (the `CHILD` script), which puts real sockets on 3.. as systemd would.
`close_unused` closes real fds made here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from handoff.errors import ConfigError
from handoff.formats.options import DEFAULT_BIND, BindKind, BindSpec, parse_bind
from handoff.formats.worker_contract import FDSTORE_PREFIX
from handoff.system.systemd_sockets import close_unused, passed_sockets, resolve, store_name

# Puts `sockets` unix sockets (abstract names "hx-PID-I") on fds 3.., inheritable as
# systemd leaves them, then calls passed_sockets on `environ` ("{pid}" is its own pid).
CHILD = r"""
import fcntl, json, os, socket, sys
from handoff.errors import ConfigError
from handoff.system.systemd_sockets import passed_sockets

order = json.loads(sys.argv[1])
pid = os.getpid()

def is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True

high = []
for i in range(order["sockets"]):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(f"\0hx-{pid}-{i}")
        high.append(fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 100))
for i, fd in enumerate(high):
    assert not is_open(3 + i), f"fd {3 + i} is already open in the child"
    os.dup2(fd, 3 + i)  # inheritable, as systemd passes it
    os.close(fd)
assert not is_open(3 + len(high)), "the fd after the sockets is open in the child"

environ = {k: v.replace("{pid}", str(pid)) for k, v in order["environ"].items()}
try:
    passed = passed_sockets(environ, pid)
except ConfigError as exc:
    print(json.dumps({"error": exc.message, "hint": exc.hint, "environ": environ}))
    sys.exit(0)

def bound_to(fd):
    with socket.socket(fileno=os.dup(fd)) as s:
        return s.getsockname()[1:].decode().replace(f"hx-{pid}-", "socket ")

print(json.dumps({
    "passed": passed,
    "environ": environ,
    "sockets": {name: bound_to(fd) for name, fd in passed.items()},
    "inheritable": [os.get_inheritable(3 + i) for i in range(len(high))],
}))
"""

OTHER = {"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": "/run/systemd/notify"}


def in_child(sockets: int, environ: dict[str, str]) -> dict[str, Any]:
    """passed_sockets as a child with `sockets` sockets on fds 3.. sees them."""
    order = json.dumps({"sockets": sockets, "environ": environ})
    result = subprocess.run(
        [sys.executable, "-c", CHILD, order],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def activation(count: str, names: str | None = None, pid: str = "{pid}") -> dict[str, str]:
    environ = {**OTHER, "LISTEN_FDS": count, "LISTEN_PID": pid}
    if names is not None:
        environ["LISTEN_FDNAMES"] = names
    return environ


def fd_spec(name: str, fd: int) -> BindSpec:
    return BindSpec(kind=BindKind.FD, text=f"fd:{name}", fd=fd, name=name)


# -- passed_sockets: sockets that are ours --------------------------------------------------


def test_sockets_passed_to_us_are_named_after_listen_fdnames_and_kept_from_workers() -> None:
    seen = in_child(2, activation("2", "web:admin"))
    assert seen["passed"] == {"web": 3, "admin": 4}
    assert seen["sockets"] == {"web": "socket 0", "admin": "socket 1"}
    assert seen["inheritable"] == [False, False]
    assert seen["environ"] == OTHER


def test_sockets_without_listen_fdnames_are_named_after_their_fd() -> None:
    seen = in_child(2, activation("2"))
    assert seen["passed"] == {"fd3": 3, "fd4": 4}
    assert seen["inheritable"] == [False, False]
    assert seen["environ"] == OTHER


def test_sockets_with_an_empty_or_missing_name_are_named_after_their_fd() -> None:
    seen = in_child(4, activation("4", "web::admin"))
    assert seen["passed"] == {"web": 3, "fd4": 4, "admin": 5, "fd6": 6}
    assert seen["sockets"] == {
        "web": "socket 0",
        "fd4": "socket 1",
        "admin": "socket 2",
        "fd6": "socket 3",
    }


def test_sockets_passed_under_one_name_are_all_kept() -> None:
    # A .socket unit with three ListenStream= passes all three as "app".
    seen = in_child(3, activation("3", "app:app:app"))
    assert seen["passed"] == {"app": 3, "app.2": 4, "app.3": 5}
    assert seen["sockets"] == {"app": "socket 0", "app.2": "socket 1", "app.3": "socket 2"}
    assert resolve((), seen["passed"]) == (
        fd_spec("app", 3),
        fd_spec("app.2", 4),
        fd_spec("app.3", 5),
    )


def test_fewer_sockets_than_announced_is_a_configuration_error_naming_the_fd() -> None:
    seen = in_child(2, activation("3", "a:b:c"))
    assert seen["error"] == "LISTEN_FDS=3 but file descriptor 5 is not open"
    assert seen["hint"] == "whatever started handoff passed fewer sockets than it announced"
    assert seen["environ"] == OTHER


def test_listen_fds_0_passes_nothing() -> None:
    seen = in_child(0, activation("0"))
    assert seen["passed"] == {}
    assert seen["environ"] == OTHER


# -- passed_sockets: nothing for us ---------------------------------------------------------


@pytest.mark.parametrize("listen_pid", ["1", "", "0", "-1", "abc"])
def test_sockets_announced_for_another_pid_are_not_ours(listen_pid: str) -> None:
    environ = activation("2", "web:admin", pid=listen_pid)
    assert passed_sockets(environ, os.getpid()) == {}
    assert environ == OTHER


@pytest.mark.parametrize("count", ["", "x", "-1", "+1", " 1", "1 ", "1.0", "0x1"])
def test_a_listen_fds_that_is_not_a_count_passes_nothing(count: str) -> None:
    environ = activation(count, "web", pid=str(os.getpid()))
    assert passed_sockets(environ, os.getpid()) == {}
    assert environ == OTHER


def test_without_listen_variables_nothing_is_passed_and_the_environment_is_kept() -> None:
    environ = dict(OTHER)
    assert passed_sockets(environ, os.getpid()) == {}
    assert environ == OTHER


def test_a_listen_pid_without_listen_fds_passes_nothing_and_is_removed() -> None:
    environ = {**OTHER, "LISTEN_PID": str(os.getpid()), "LISTEN_FDNAMES": "web"}
    assert passed_sockets(environ, os.getpid()) == {}
    assert environ == OTHER


@pytest.mark.parametrize("count", ["²", "-1", " 1", "1.0"])
def test_a_listen_fds_that_is_not_a_plain_number_passes_nothing(count: str) -> None:
    environ = {**OTHER, "LISTEN_FDS": count, "LISTEN_PID": str(os.getpid())}
    assert passed_sockets(environ, os.getpid()) == {}
    assert environ == OTHER


# -- store_name -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bind", "name"),
    [
        ("127.0.0.1:8000", "handoff_127.0.0.1_8000"),
        (":8000", "handoff__8000"),
        ("localhost:80", "handoff_localhost_80"),
        ("unix:/run/app/web.sock", "handoff_unix_/run/app/web.sock"),
        # Brackets become '_' as in every earlier release, so stored sockets are found again.
        ("[::1]:8000", "handoff____1__8000"),
    ],
)
def test_the_store_name_is_the_prefix_and_the_bind_text_without_colons(
    bind: str, name: str
) -> None:
    assert store_name(parse_bind(bind)) == name


@pytest.mark.parametrize(
    "bind", ["[::1]:8000", "[::]:443", "unix:/tmp/a b:c", "unix:/tmp/é", "localhost:80"]
)
def test_a_store_name_is_one_systemd_accepts(bind: str) -> None:
    name = store_name(parse_bind(bind))
    assert name.startswith(FDSTORE_PREFIX)
    assert ":" not in name
    assert name.isascii()
    assert name.isprintable()
    assert " " not in name
    assert len(name) <= 255


def test_a_long_bind_text_gives_a_store_name_of_255_characters() -> None:
    name = store_name(parse_bind("unix:/" + "d" * 400))
    assert len(name) == 255
    assert name.startswith(FDSTORE_PREFIX + "unix_/ddd")


def test_different_addresses_get_different_store_names() -> None:
    binds = ["127.0.0.1:8000", "127.0.0.1:8001", "0.0.0.0:8000", "[::1]:8000", "unix:/a"]
    names = {store_name(parse_bind(bind)) for bind in binds}
    assert len(names) == len(binds)


# -- resolve --------------------------------------------------------------------------------


def test_without_binds_the_activated_sockets_are_used_in_their_order() -> None:
    assert resolve((), {"web": 3, "admin": 4}) == (fd_spec("web", 3), fd_spec("admin", 4))


def test_without_binds_or_passed_sockets_the_default_address_is_bound() -> None:
    assert resolve((), {}) == (parse_bind(DEFAULT_BIND),)


def test_without_binds_stored_sockets_are_not_taken_for_activated_ones() -> None:
    stray = FDSTORE_PREFIX + "127.0.0.1_9999"  # stored by a run with other --bind
    assert resolve((), {stray: 3}) == (parse_bind(DEFAULT_BIND),)


def test_without_binds_the_stored_default_listener_is_adopted() -> None:
    default = parse_bind(DEFAULT_BIND)
    assert resolve((), {store_name(default): 5}) == (
        BindSpec(kind=BindKind.FD, text=DEFAULT_BIND, fd=5, name=store_name(default)),
    )


def test_without_binds_activated_sockets_win_over_a_stored_default_listener() -> None:
    passed = {store_name(parse_bind(DEFAULT_BIND)): 3, "web": 4}
    assert resolve((), passed) == (fd_spec("web", 4),)


def test_fd_name_picks_the_socket_passed_under_that_name() -> None:
    specs = (parse_bind("fd:admin"),)
    assert resolve(specs, {"web": 3, "admin": 4}) == (fd_spec("admin", 4),)


def test_fd_name_that_was_not_passed_is_an_error_listing_what_was() -> None:
    with pytest.raises(ConfigError) as caught:
        resolve((parse_bind("fd:api"),), {"web": 3, "admin": 4})
    assert caught.value.message == (
        "--bind fd:api: systemd passed no socket named 'api' (passed: web, admin)"
    )
    assert caught.value.hint == (
        "name it with FileDescriptorName= in the .socket unit, or use fd:N"
    )


def test_fd_name_when_nothing_was_passed_says_none() -> None:
    with pytest.raises(ConfigError) as caught:
        resolve((parse_bind("fd:web"),), {})
    assert (
        caught.value.message == "--bind fd:web: systemd passed no socket named 'web' (passed: none)"
    )


def test_a_stored_listener_is_adopted_instead_of_bound_again() -> None:
    tcp, unix = parse_bind("127.0.0.1:8000"), parse_bind("unix:/run/app/web.sock")
    passed = {store_name(tcp): 3, store_name(unix): 4}
    assert resolve((tcp, unix), passed) == (
        BindSpec(kind=BindKind.FD, text="127.0.0.1:8000", fd=3, name=store_name(tcp)),
        BindSpec(
            kind=BindKind.FD,
            text="unix:/run/app/web.sock",
            fd=4,
            name=store_name(unix),
            path="/run/app/web.sock",
        ),
    )


def test_a_unix_socket_is_stored_under_its_path_whatever_its_options() -> None:
    plain = parse_bind("unix:/run/app/web.sock")
    with_options = parse_bind("unix:/run/app/web.sock,mode=0660,owner=nobody,group=www-data")
    assert store_name(with_options) == store_name(plain) == "handoff_unix_/run/app/web.sock"
    assert store_name(parse_bind("unix:/run/app/web.sock,mode=0600")) == store_name(plain)
    assert store_name(parse_bind("unix:/run/app/other.sock,mode=0660")) != store_name(plain)


def test_a_stored_unix_socket_is_adopted_with_the_options_of_this_start() -> None:
    """Stored by a start without options, adopted by one with them (and the reverse):
    the same socket, whose file gets the mode and owner given now."""
    before = parse_bind("unix:/run/app/web.sock")
    now = parse_bind("unix:/run/app/web.sock,mode=0660,group=www-data")
    (adopted,) = resolve((now,), {store_name(before): 7})
    assert (adopted.kind, adopted.fd, adopted.name) == (BindKind.FD, 7, store_name(before))
    assert (adopted.path, adopted.mode, adopted.group, adopted.owner) == (
        "/run/app/web.sock",
        0o660,
        "www-data",
        "",
    )
    (back,) = resolve((before,), {store_name(now): 8})
    assert (back.fd, back.mode, back.group) == (8, None, "")


def test_binds_without_a_stored_listener_are_bound_as_given() -> None:
    tcp, unix = parse_bind("127.0.0.1:8000"), parse_bind("unix:/run/app/web.sock")
    passed = {store_name(parse_bind("127.0.0.1:8001")): 3, "web": 4}
    assert resolve((tcp, unix), passed) == (tcp, unix)


def test_fd_number_binds_are_taken_as_given() -> None:
    spec = parse_bind("fd:3")
    assert resolve((spec,), {store_name(spec): 5, "fd3": 3}) == (spec,)


def test_only_the_binds_with_a_stored_listener_are_adopted() -> None:
    kept, fresh = parse_bind("127.0.0.1:8000"), parse_bind("127.0.0.1:8001")
    assert resolve((kept, fresh), {store_name(kept): 6}) == (
        BindSpec(kind=BindKind.FD, text="127.0.0.1:8000", fd=6, name=store_name(kept)),
        fresh,
    )


# -- close_unused ---------------------------------------------------------------------------


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_passed_sockets_no_bind_took_are_closed_and_named(tmp_path: Path) -> None:
    files = [os.open(tmp_path / name, os.O_CREAT | os.O_RDONLY) for name in "abcd"]
    a, b, c, d = files
    try:
        passed = {"web": a, "admin": b, FDSTORE_PREFIX + "127.0.0.1_8000": c, "metrics": d}
        used = (fd_spec("admin", b), parse_bind("127.0.0.1:8001"), fd_spec("metrics", d))
        assert close_unused(passed, used) == ["web", FDSTORE_PREFIX + "127.0.0.1_8000"]
        assert [is_open(fd) for fd in files] == [False, True, False, True]
    finally:
        for fd in (b, d):
            os.close(fd)


def test_adopted_stored_listeners_are_kept_open(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "listener", os.O_CREAT | os.O_RDONLY)
    try:
        spec = parse_bind("127.0.0.1:8000")
        passed = {store_name(spec): fd}
        assert close_unused(passed, resolve((spec,), passed)) == []
        assert is_open(fd)
    finally:
        os.close(fd)


def test_with_nothing_passed_nothing_is_closed() -> None:
    assert close_unused({}, (parse_bind(DEFAULT_BIND),)) == []
