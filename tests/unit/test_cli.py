"""The command line through click's CliRunner: one-line errors, hints and exit codes.

Only failures that happen before anything is bound or spawned are tested here; errors
after binding (port in use, privileged port) belong to the integration tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner, Result

from handoff import __version__
from handoff.cli.main import cli
from handoff.formats.options import BIND_FORMS, READY_FORMS

MISSING = "gunicron"  # a misspelt command: nothing can start even if parsing let it through


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # 'handoff run' configures structlog to write to the (captured) stderr of the moment.
    yield
    structlog.reset_defaults()


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), prog_name="handoff")


def error_lines(result: Result) -> list[str]:
    """stderr as lines; the first must be the one-line error."""
    lines = result.stderr.splitlines()
    assert lines, f"nothing on stderr (exit {result.exit_code}, stdout {result.stdout!r})"
    assert lines[0].startswith("handoff: error: "), lines
    return lines


def assert_usage_error(
    result: Result, message: str, *, hint: str = "see 'handoff run --help'"
) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert error_lines(result) == [f"handoff: error: {message}", f"hint: {hint}"]
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--bind", "localhost:http"],
            "Invalid value for '-b' / '--bind': 'localhost:http': port must be an integer "
            f"0-65535 (forms: {BIND_FORMS})",
        ),
        (
            ["-b", "127.0.0.1:8000", "-b", "::1:80"],
            "Invalid value for '-b' / '--bind': '::1:80': put IPv6 addresses in brackets, "
            f"[V6]:PORT (forms: {BIND_FORMS})",
        ),
        (
            ["-b", "unix:"],
            f"Invalid value for '-b' / '--bind': 'unix:': unix: needs a path (forms: {BIND_FORMS})",
        ),
        (
            ["--stop-signal", "bogus"],
            "Invalid value for '--stop-signal': 'bogus': unknown signal "
            "(examples: TERM, QUIT, INT, USR1)",
        ),
        (
            ["--stop-signal", "KILL"],
            "Invalid value for '--stop-signal': 'KILL': SIGKILL cannot be a stop signal; "
            "a worker cannot drain on it",
        ),
        (
            ["--drain-timeout", "-1"],
            "Invalid value for '--drain-timeout': --drain-timeout must be a finite number of "
            "seconds >= 0, not '-1'",
        ),
        (
            ["--ready-timeout", "-5"],
            "Invalid value for '--ready-timeout': --ready-timeout must be a finite number of "
            "seconds >= 0, not '-5'",
        ),
        (
            ["--ready-timeout", "soon"],
            "Invalid value for '--ready-timeout': --ready-timeout must be a number of seconds, "
            "not 'soon'",
        ),
        (
            ["--ready", "bogus"],
            f"Invalid value for '--ready': 'bogus': unknown readiness mode (choose {READY_FORMS})",
        ),
        (
            ["--ready", "auto:1"],
            f"Invalid value for '--ready': 'auto:1': unknown readiness mode (choose {READY_FORMS})",
        ),
        (
            ["--settle", "-1"],
            "Invalid value for '--settle': --settle must be a finite number of seconds >= 0, "
            "not '-1'",
        ),
    ],
)
def test_bad_option_is_a_one_line_usage_error(args: list[str], message: str) -> None:
    assert_usage_error(invoke("run", *args, "--", MISSING), message)


@pytest.mark.parametrize(
    ("args", "starts"),
    [
        (["--workers", "0"], "Invalid value for '-w' / '--workers': 0 "),
        (["-w", "many"], "Invalid value for '-w' / '--workers': 'many' "),
        (["-w", "1025"], "Invalid value for '-w' / '--workers': 1025 "),
        (["--backlog", "0"], "Invalid value for '--backlog': 0 "),
        (["--log-format", "xml"], "Invalid value for '--log-format': 'xml' "),
        (["--log-level", "loud"], "Invalid value for '--log-level': 'loud' "),
        (["--frobnicate"], "No such option"),
    ],
)
def test_bad_option_checked_by_click_is_a_one_line_usage_error(
    args: list[str], starts: str
) -> None:
    # The rest of these messages is click's wording, which may change between releases.
    result = invoke("run", *args, "--", MISSING)

    assert result.exit_code == 2
    lines = error_lines(result)
    assert lines[0].startswith(f"handoff: error: {starts}")
    assert lines[1:] == ["hint: see 'handoff run --help'"]


def test_missing_command() -> None:
    assert_usage_error(invoke("run"), "Missing argument '-- COMMAND [ARG]...'.")
    assert_usage_error(invoke("run", "--workers", "2"), "Missing argument '-- COMMAND [ARG]...'.")


def test_command_not_found_exits_2_before_anything_starts() -> None:
    result = invoke("run", "--", MISSING, "app:app")

    assert result.exit_code == 2
    assert error_lines(result) == [
        "handoff: error: command not found: 'gunicron' (searched PATH)",
        "hint: check the spelling, or give the full path to the executable",
    ]


def test_placeholder_beyond_the_binds_exits_2(tmp_path: Path) -> None:
    # 'false' exits at once: should this check ever move after spawning, the test still ends.
    result = invoke(
        "run", "-b", f"unix:{tmp_path / 'sock'}", "--drain-timeout", "0", "--", "false", "{fd3}"
    )

    assert result.exit_code == 2, (result.stderr, result.exception)
    lines = error_lines(result)
    assert lines[0] == (
        "handoff: error: '{fd3}' names socket 3, but there are only 1 --bind addresses"
    )
    assert not (tmp_path / "sock").exists(), "nothing was bound"


def test_placeholder_error_has_a_hint(tmp_path: Path) -> None:
    result = invoke("run", "-b", f"unix:{tmp_path / 'sock'}", "--", "false", "{fd3}")

    assert len(error_lines(result)) == 2
    assert error_lines(result)[1].startswith("hint: ")


def test_stop_signal_kill_by_number_is_refused() -> None:
    result = invoke("run", "--stop-signal", "9", "--", MISSING)

    assert result.exit_code == 2
    assert "cannot be a stop signal" in error_lines(result)[0]


def test_bind_with_a_superscript_port_is_a_usage_error() -> None:
    result = invoke("run", "-b", ":²", "--", MISSING)

    assert result.exit_code == 2
    assert "Invalid value for '-b' / '--bind'" in error_lines(result)[0]


def test_unknown_subcommand() -> None:
    assert_usage_error(
        invoke("frobnicate"), "No such command 'frobnicate'.", hint="see 'handoff --help'"
    )


def test_bare_handoff_prints_help_not_an_error() -> None:
    result = invoke()

    assert "Usage: handoff" in result.output
    assert "handoff: error:" not in result.output


def test_version() -> None:
    result = invoke("--version")

    assert result.exit_code == 0
    assert result.stdout == f"handoff, version {__version__}\n"
    assert result.stderr == ""


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(flag: str) -> None:
    result = invoke(flag)

    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: handoff [OPTIONS] COMMAND [ARGS]...")
    assert "run" in result.stdout
    assert result.stderr == ""


def test_run_help_documents_the_forms() -> None:
    result = invoke("run", "--help")

    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: handoff run [OPTIONS] -- COMMAND [ARG]...")
    flat = " ".join(result.stdout.split())
    for text in ("--bind", "--workers", "--ready", "--stop-signal", "--drain-timeout", "{fd}"):
        assert text in flat
    assert " ".join(BIND_FORMS.split()) in flat


def test_options_after_the_command_belong_to_the_command() -> None:
    # allow_interspersed_args=False: '--workers 0' after COMMAND is COMMAND's, not ours, so
    # the only error is the misspelt command.
    result = invoke("run", MISSING, "--workers", "0")

    assert result.exit_code == 2
    assert error_lines(result)[0] == "handoff: error: command not found: 'gunicron' (searched PATH)"
