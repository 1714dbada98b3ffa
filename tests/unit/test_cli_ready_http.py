"""--ready http:PATH and its options on the command line: one-line errors, exit 2."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

from tests.unit.test_cli import MISSING, assert_usage_error, error_lines, invoke


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--ready", "http:"],
            "Invalid value for '--ready': 'http:': needs a path, e.g. http:/healthz",
        ),
        (
            ["--ready", "http:/a b"],
            "Invalid value for '--ready': 'http:/a b': the path must start with '/' and be "
            "printable ASCII without spaces, at most 2048 characters (e.g. http:/healthz?full=1)",
        ),
        (
            ["--ready", "http:/healthz", "--ready-status", "2xx"],
            "Invalid value for '--ready-status': '2xx': give CODE or FROM-TO, "
            "comma-separated, e.g. 200-299 or 200,204 (codes 100-599)",
        ),
        (
            ["--ready", "http:/healthz", "--ready-try-timeout", "soon"],
            "Invalid value for '--ready-try-timeout': --ready-try-timeout must be a number of "
            "seconds, not 'soon'",
        ),
    ],
)
def test_bad_http_options_are_one_line_usage_errors(args: list[str], message: str) -> None:
    assert_usage_error(invoke("run", *args, "--", MISSING), message)


@pytest.mark.parametrize(
    ("args", "message", "hint"),
    [
        (
            ["--ready-status", "200"],
            "--ready-status only applies to --ready http:PATH (not --ready auto)",
            "e.g. --ready http:/healthz --ready-status 200-299 --ready-try-timeout 2",
        ),
        (
            ["--ready", "notify", "--ready-try-timeout", "1"],
            "--ready-try-timeout only applies to --ready http:PATH (not --ready notify)",
            "e.g. --ready http:/healthz --ready-status 200-299 --ready-try-timeout 2",
        ),
        (
            ["--ready", "http:/healthz", "--ready-try-timeout", "0"],
            "--ready-try-timeout must be above 0 seconds, not 0",
            "one try connects, sends GET PATH and reads the answer: e.g. 2",
        ),
    ],
)
def test_http_options_without_http_exit_2_before_anything_starts(
    args: list[str], message: str, hint: str
) -> None:
    result = invoke("run", *args, "--", "true")
    assert result.exit_code == 2, (result.stderr, result.exception)
    assert error_lines(result) == [f"handoff: error: {message}", f"hint: {hint}"]


def test_help_names_the_http_mode() -> None:
    result = invoke("run", "--help")
    assert "http:PATH" in result.stdout
    assert "--ready-status" in result.stdout
    assert "--ready-try-timeout" in result.stdout
