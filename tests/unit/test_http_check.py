"""--ready http:PATH: its options, the probe's request and what it reads back (pure)."""

from __future__ import annotations

import pytest

from handoff.errors import ConfigError
from handoff.formats.http_check import (
    DEFAULT_STATUSES,
    MAX_REPORT_BYTES,
    Report,
    StatusLine,
    accepted,
    decode_report,
    describe_statuses,
    parse_statuses,
    request_head,
    status_line,
)
from handoff.formats.options import (
    READY_FORMS,
    ReadyMode,
    ReadySpec,
    parse_ready,
    with_http_options,
)


def test_http_ready_mode_is_parsed_with_defaults() -> None:
    spec = parse_ready("http:/healthz?deep=1")
    assert spec == ReadySpec(mode=ReadyMode.HTTP, path="/healthz?deep=1")
    assert spec.statuses == DEFAULT_STATUSES == ((200, 299),)
    assert spec.try_timeout_s == 2.0
    assert spec.describe() == "http:/healthz?deep=1"
    assert "http:PATH" in READY_FORMS


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("http:", "'http:': needs a path, e.g. http:/healthz"),
        ("http:healthz", "the path must start with '/'"),
        ("http:/health z", "printable ASCII without spaces"),
        ("http:/health\r\nX: y", "printable ASCII without spaces"),
        ("http:/é", "printable ASCII without spaces"),
        ("http:/" + "a" * 2048, "at most 2048 characters"),
    ],
)
def test_bad_http_paths_are_refused(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_ready(text)
    assert says in caught.value.message


@pytest.mark.parametrize(
    ("text", "ranges"),
    [
        ("200-299", ((200, 299),)),
        ("200", ((200, 200),)),
        ("200,204, 300-399", ((200, 200), (204, 204), (300, 399))),
        ("100-599", ((100, 599),)),
    ],
)
def test_status_ranges(text: str, ranges: tuple[tuple[int, int], ...]) -> None:
    assert parse_statuses(text) == ranges


@pytest.mark.parametrize(
    "text", ["", "2xx", "99", "600", "299-200", "200-", "-200", "\uff1200", "200,,"]
)
def test_bad_status_ranges_are_refused(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_statuses(text)
    assert caught.value.message.startswith(f"'{text}': give CODE or FROM-TO")


def test_accepted_and_described() -> None:
    ranges = parse_statuses("200-299,503")
    assert [accepted(s, ranges) for s in (199, 200, 299, 300, 503)] == [
        False,
        True,
        True,
        False,
        True,
    ]
    assert describe_statuses(ranges) == "200-299,503"


def test_http_options_apply_to_http_only() -> None:
    http = parse_ready("http:/healthz")
    spec = with_http_options(http, ((200, 200),), 0.5)
    assert (spec.statuses, spec.try_timeout_s) == (((200, 200),), 0.5)
    assert with_http_options(http, None, None) == http
    auto = parse_ready("auto")
    assert with_http_options(auto, None, None) is auto
    with pytest.raises(ConfigError) as caught:
        with_http_options(auto, ((200, 200),), None)
    assert caught.value.message == (
        "--ready-status only applies to --ready http:PATH (not --ready auto)"
    )
    assert caught.value.hint
    with pytest.raises(ConfigError) as caught:
        with_http_options(parse_ready("notify"), None, 3.0)
    assert caught.value.message.startswith("--ready-try-timeout only applies")
    with pytest.raises(ConfigError) as caught:
        with_http_options(http, None, 0.0)
    assert caught.value.message == "--ready-try-timeout must be above 0 seconds, not 0"


def test_the_request_lacks_only_its_final_empty_line() -> None:
    head = request_head("/healthz", "127.0.0.1:8000")
    assert head.startswith(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n")
    assert head.endswith(b"Connection: close\r\n")
    assert b"\r\n\r\n" not in head


@pytest.mark.parametrize(
    ("head", "line"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", StatusLine(200, "OK")),
        (b"HTTP/1.0 503 Service Unavailable\r\n", StatusLine(503, "Service Unavailable")),
        (b"HTTP/1.1 204\r\n\r\n", StatusLine(204, "")),
        (b"HTTP/1.1 200 \xff\x00bad\r\n", StatusLine(200, "\xffbad")),
        (b"HTTP/1.1 200 OK", None),  # the line is not complete yet
        (b"HTTP/2 200\r\n", None),
        (b"SSH-2.0-OpenSSH\r\n", None),
        (b"", None),
        (b"HTTP/1.1 999 Odd\r\n", None),
    ],
)
def test_status_line(head: bytes, line: StatusLine | None) -> None:
    assert status_line(head) == line


def test_status_line_text() -> None:
    assert str(StatusLine(503, "Service Unavailable")) == "HTTP 503 Service Unavailable"
    assert str(StatusLine(204, "")) == "HTTP 204"


def test_reports_round_trip_and_a_crash_is_a_report_too() -> None:
    report = Report(ok=True, detail="HTTP 200 OK from pid 7 (GET /healthz)", answer="HTTP 200 OK")
    assert decode_report(report.encode(), 0) == report
    assert decode_report(b"noise\n" + report.encode(), 0) == report
    # ok needs exit status 0 as well
    assert not decode_report(report.encode(), 1).ok
    crashed = decode_report(b"Traceback...\nValueError: boom\n", 1)
    assert crashed == Report(
        ok=False, detail="the http probe exited 1 without a report: ValueError: boom"
    )
    assert decode_report(b"", None).detail == "the http probe was killed without a report"
    huge = decode_report(b"x" * 100_000, 1)
    assert len(huge.detail) < MAX_REPORT_BYTES
