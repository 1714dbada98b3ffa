"""The pure option parsers: --bind, --stop-signal, durations, --ready."""

from __future__ import annotations

import signal

import pytest

from handoff.errors import EXIT_USAGE, ConfigError
from handoff.formats.options import (
    BIND_FORMS,
    READY_FORMS,
    BindKind,
    BindSpec,
    ReadyMode,
    ReadySpec,
    parse_bind,
    parse_duration,
    parse_ready,
    parse_signal,
)

# -- parse_bind -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "127.0.0.1:8000",
            BindSpec(kind=BindKind.TCP, text="127.0.0.1:8000", host="127.0.0.1", port=8000),
        ),
        (":8000", BindSpec(kind=BindKind.TCP, text=":8000", host="0.0.0.0", port=8000)),
        ("[::1]:0", BindSpec(kind=BindKind.TCP, text="[::1]:0", host="::1", port=0)),
        ("[::]:443", BindSpec(kind=BindKind.TCP, text="[::]:443", host="::", port=443)),
        (
            "localhost:80",
            BindSpec(kind=BindKind.TCP, text="localhost:80", host="localhost", port=80),
        ),
        (
            "0.0.0.0:65535",
            BindSpec(kind=BindKind.TCP, text="0.0.0.0:65535", host="0.0.0.0", port=65535),
        ),
        ("unix:/tmp/x", BindSpec(kind=BindKind.UNIX, text="unix:/tmp/x", path="/tmp/x")),
        (
            "unix:relative.sock",
            BindSpec(kind=BindKind.UNIX, text="unix:relative.sock", path="relative.sock"),
        ),
        ("fd:3", BindSpec(kind=BindKind.FD, text="fd:3", fd=3)),
    ],
)
def test_parse_bind_accepts(text: str, expected: BindSpec) -> None:
    assert parse_bind(text) == expected


def test_ipv6_hosts_are_kept_without_brackets() -> None:
    # (BindSpec.is_ipv6, which nothing in handoff used, is gone: the host says it.)
    assert parse_bind("[::1]:80").host == "::1"
    assert ":" not in parse_bind("127.0.0.1:80").host
    assert parse_bind("unix:/tmp/a:b").host == ""


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("localhost:http", "port must be an integer 0-65535"),
        ("127.0.0.1", "missing ':PORT'"),
        ("", "missing ':PORT'"),
        ("::1:80", "put IPv6 addresses in brackets"),
        ("[::1]80", "IPv6 addresses are written [V6]:PORT"),
        ("[::1", "IPv6 addresses are written [V6]:PORT"),
        ("[::1]:", "port must be an integer 0-65535"),
        (":99999", "port must be an integer 0-65535"),
        (":65536", "port must be an integer 0-65535"),
        ("host:-1", "port must be an integer 0-65535"),
        (":", "port must be an integer 0-65535"),
        ("unix:", "unix: needs a path"),
        ("fd:x:y", "fd: needs a file descriptor number or a socket name"),
        ("fd:", "fd: needs a file descriptor number"),
        ("fd:-1", "fd: needs a file descriptor number or a socket name"),
    ],
)
def test_parse_bind_refuses_naming_the_forms(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_bind(text)

    message = caught.value.message
    assert message.startswith(f"'{text}': ")
    assert says in message
    assert f"(forms: {BIND_FORMS})" in message
    assert "\n" not in message
    assert caught.value.exit_code == EXIT_USAGE


def test_bind_forms_lists_every_form() -> None:
    assert BIND_FORMS == "HOST:PORT, [V6]:PORT, :PORT, unix:PATH, fd:N, fd:NAME"


def test_fd_name_selects_a_socket_systemd_passed_by_name() -> None:
    assert parse_bind("fd:http") == BindSpec(kind=BindKind.FD, text="fd:http", name="http")
    assert parse_bind("fd:handoff-example.socket").name == "handoff-example.socket"


def test_parse_bind_refuses_nul_in_a_unix_path() -> None:
    with pytest.raises(ConfigError, match="cannot contain NUL"):
        parse_bind("unix:/tmp/a\0b")


@pytest.mark.parametrize("text", ["[zz]:80", "[127.0.0.1]:80"])
def test_parse_bind_refuses_a_bracketed_non_ipv6_host(text: str) -> None:
    with pytest.raises(ConfigError, match="is not an IPv6 address"):
        parse_bind(text)


def test_parse_bind_bad_ipv6_message_names_the_forms() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_bind("[zz]:80")
    assert BIND_FORMS in caught.value.message


@pytest.mark.parametrize("text", [":²", "fd:²"])
def test_parse_bind_superscript_digits_are_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_bind(text)


# -- parse_signal ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["TERM", "SIGTERM", "sigterm", "term", " TERM ", "15"])
def test_parse_signal_accepts_names_and_numbers(text: str) -> None:
    assert parse_signal(text) is signal.SIGTERM


@pytest.mark.parametrize(
    ("text", "expected"),
    [("QUIT", signal.SIGQUIT), ("int", signal.SIGINT), ("SIGUSR1", signal.SIGUSR1)],
)
def test_parse_signal_other_signals(text: str, expected: signal.Signals) -> None:
    assert parse_signal(text) is expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("KILL", "SIGKILL cannot be a stop signal"),
        ("SIGKILL", "SIGKILL cannot be a stop signal"),
        ("stop", "SIGSTOP cannot be a stop signal"),
        ("bogus", "unknown signal (examples: TERM, QUIT, INT, USR1)"),
        ("SIG", "unknown signal"),
        ("", "unknown signal"),
        ("999", "no such signal number"),
    ],
)
def test_parse_signal_refuses(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_signal(text)

    assert caught.value.message.startswith(f"'{text}': ")
    assert says in caught.value.message


@pytest.mark.parametrize("text", ["9", "19"])
def test_parse_signal_refuses_kill_and_stop_by_number(text: str) -> None:
    with pytest.raises(ConfigError, match="cannot be a stop signal"):
        parse_signal(text)


# -- parse_duration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"), [("0", 0.0), ("1", 1.0), ("1.5", 1.5), ("1e3", 1000.0), (" 2 ", 2.0)]
)
def test_parse_duration_accepts(text: str, expected: float) -> None:
    assert parse_duration(text, what="--drain-timeout") == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("-1", "must be a finite number of seconds >= 0, not '-1'"),
        ("-0.001", "must be a finite number of seconds >= 0"),
        ("nan", "must be a finite number of seconds >= 0, not 'nan'"),
        ("inf", "must be a finite number of seconds >= 0, not 'inf'"),
        ("-inf", "must be a finite number of seconds >= 0"),
        ("ten", "must be a number of seconds, not 'ten'"),
        ("", "must be a number of seconds, not ''"),
        ("5s", "must be a number of seconds, not '5s'"),
    ],
)
def test_parse_duration_refuses_naming_the_option(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_duration(text, what="--drain-timeout")

    assert caught.value.message.startswith(f"--drain-timeout {says}")


# -- parse_ready ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "described"),
    [
        ("notify", ReadySpec(mode=ReadyMode.NOTIFY), "notify"),
        ("auto", ReadySpec(mode=ReadyMode.AUTO), "auto"),
        ("delay:1.5", ReadySpec(mode=ReadyMode.DELAY, delay_s=1.5), "delay:1.5"),
        ("delay:0", ReadySpec(mode=ReadyMode.DELAY, delay_s=0.0), "delay:0"),
        (
            "exec:curl -fs localhost:8000/health",
            ReadySpec(mode=ReadyMode.EXEC, command="curl -fs localhost:8000/health"),
            "exec:curl -fs localhost:8000/health",
        ),
    ],
)
def test_parse_ready_accepts(text: str, expected: ReadySpec, described: str) -> None:
    spec = parse_ready(text)

    assert spec == expected
    assert spec.describe() == described


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("exec:", "exec: needs a command"),
        ("exec:   ", "exec: needs a command"),
        ("auto:fast", "unknown readiness mode"),
        ("bogus", "unknown readiness mode"),
        ("NOTIFY", "unknown readiness mode"),
        ("notify:now", "unknown readiness mode"),
        ("", "unknown readiness mode"),
    ],
)
def test_parse_ready_refuses(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_ready(text)

    assert caught.value.message.startswith(f"'{text}': ")
    assert says in caught.value.message


@pytest.mark.parametrize("text", ["auto:1", "bogus"])
def test_parse_ready_refusal_lists_the_modes(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_ready(text)

    assert f"(choose {READY_FORMS})" in caught.value.message


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("delay:", "delay: must be a number of seconds"),
        ("delay:soon", "delay: must be a number of seconds, not 'soon'"),
        ("delay:-1", "delay: must be a finite number of seconds >= 0"),
    ],
)
def test_parse_ready_delay_needs_seconds(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        parse_ready(text)
