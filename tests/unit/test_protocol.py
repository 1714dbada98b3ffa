"""The worker contract: environment, {fd} placeholders, the sd_notify wire format, fd names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from handoff.errors import ConfigError
from handoff.formats.worker_contract import (
    FIRST_LISTEN_FD,
    expand_placeholders,
    fd_name,
    parse_notify,
    worker_environment,
)

MASTER_ENV = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/home/app",
    "LISTEN_FDS": "2",
    "LISTEN_PID": "1",
    "LISTEN_FDNAMES": "web:admin",
    "NOTIFY_SOCKET": "/run/systemd/notify",
    "WATCHDOG_USEC": "30000000",
    "WATCHDOG_PID": "1",
    "HANDOFF_GENERATION": "7",  # a handoff running under a handoff: ours wins
    "HANDOFF_WORKER": "3",
    "LISTEN_FDS_EXTRA": "kept",  # only the exact systemd names are stripped
}


def build(names: list[str], base: dict[str, str] | None = None) -> dict[str, str]:
    return worker_environment(
        MASTER_ENV if base is None else base,
        listener_names=names,
        notify_socket="@handoff/notify/1234",
        generation=2,
        slot=1,
    )


# -- worker_environment ---------------------------------------------------------------------


def test_worker_environment_replaces_the_masters_supervisor_variables() -> None:
    env = build(["127.0.0.1_8000", "unix_/run/app.sock"])

    assert env == {
        "PATH": "/usr/bin:/bin",
        "HOME": "/home/app",
        "LISTEN_FDS_EXTRA": "kept",
        "LISTEN_FDS": "2",
        "LISTEN_FDNAMES": "127.0.0.1_8000:unix_/run/app.sock",
        "NOTIFY_SOCKET": "@handoff/notify/1234",
        "HANDOFF_GENERATION": "2",
        "HANDOFF_WORKER": "1",
    }


def test_worker_environment_leaves_listen_pid_to_the_child() -> None:
    env = build(["a"])

    assert "LISTEN_PID" not in env, "only the forked child knows its own pid"
    assert "WATCHDOG_USEC" not in env
    assert "WATCHDOG_PID" not in env


def test_worker_environment_does_not_change_the_base() -> None:
    base = dict(MASTER_ENV)

    build(["a"], base)

    assert base == MASTER_ENV


def test_worker_environment_with_a_clean_base() -> None:
    env = build(["a", "b", "c"], {"PATH": "/bin"})

    assert env["LISTEN_FDS"] == "3"
    assert env["LISTEN_FDNAMES"].split(":") == ["a", "b", "c"]
    assert env["PATH"] == "/bin"


# -- expand_placeholders --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "count", "expected"),
    [
        (["uvicorn", "app:app", "--fd", "{fd}"], 1, ["uvicorn", "app:app", "--fd", "3"]),
        (["srv", "{fd0}", "{fd1}"], 2, ["srv", "3", "4"]),
        (
            ["gunicorn", "--bind", "fd://{fd}", "app:app"],
            1,
            ["gunicorn", "--bind", "fd://3", "app:app"],
        ),
        (["srv", "--listen={fd1},{fd0}"], 2, ["srv", "--listen=4,3"]),
        (["srv", "{fd}{fd}"], 1, ["srv", "33"]),
        (["srv", "{fd10}"], 11, ["srv", "13"]),
        (
            ["srv", "plain", "{FD}", "{fdx}", "{ fd }"],
            1,
            ["srv", "plain", "{FD}", "{fdx}", "{ fd }"],
        ),
        (["srv"], 0, ["srv"]),
    ],
)
def test_expand_placeholders(argv: list[str], count: int, expected: list[str]) -> None:
    assert expand_placeholders(argv, count) == expected


def test_expand_placeholders_leaves_its_input_alone() -> None:
    argv = ["srv", "{fd}"]

    expand_placeholders(argv, 1)

    assert argv == ["srv", "{fd}"]


@pytest.mark.parametrize(
    ("argv", "count", "message"),
    [
        (["srv", "{fd1}"], 1, "'{fd1}' names socket 1, but there are only 1 --bind addresses"),
        (["srv", "{fd3}"], 2, "'{fd3}' names socket 3, but there are only 2 --bind addresses"),
        (["srv", "fd://{fd}"], 0, "'{fd}' names socket 0, but there are only 0 --bind addresses"),
    ],
)
def test_expand_placeholders_out_of_range(argv: list[str], count: int, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        expand_placeholders(argv, count)

    assert caught.value.message == message


def test_first_listen_fd_is_3() -> None:
    assert FIRST_LISTEN_FD == 3


# -- parse_notify ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"READY=1", {"READY": "1"}),
        (b"READY=1\nSTATUS=serving 3 clients\n", {"READY": "1", "STATUS": "serving 3 clients"}),
        (b"STOPPING=1\nMAINPID=42", {"STOPPING": "1", "MAINPID": "42"}),
        (b"STATUS=a=b", {"STATUS": "a=b"}),
        (b"STATUS=", {"STATUS": ""}),
        (b"READY\nSTATUS=x", {"STATUS": "x"}),
        (b"=1\nREADY=1", {"READY": "1"}),
        (b"", {}),
        (b"\n\n", {}),
        (b"garbage", {}),
        (b"STATUS=one\nSTATUS=two", {"STATUS": "two"}),
        (b"STATUS=caf\xc3\xa9", {"STATUS": "caf\u00e9"}),
        (b"STATUS=\xff", {"STATUS": "\ufffd"}),
    ],
)
def test_parse_notify(payload: bytes, expected: dict[str, str]) -> None:
    assert parse_notify(payload) == expected


# -- fd_name --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:8000", "127.0.0.1_8000"),
        ("[::1]:80", "[__1]_80"),
        ("unix:/run/app.sock", "unix_/run/app.sock"),
        ("web", "web"),
        ("", "socket"),
    ],
)
def test_fd_name(address: str, expected: str) -> None:
    assert fd_name(address) == expected


def test_fd_name_is_capped_at_255_characters() -> None:
    assert len(fd_name("x" * 1000)) == 255


@given(st.text())
def test_fd_name_is_always_a_valid_fdname(address: str) -> None:
    name = fd_name(address)

    assert ":" not in name
    assert 1 <= len(name) <= 255
    assert name.isascii()
    assert name.isprintable()
