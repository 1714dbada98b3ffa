"""The control protocol's lines (docs/control.md): parsing a request, building a reply."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from handoff.formats.control_protocol import (
    VERSION,
    BadRequest,
    Command,
    Request,
    encode,
    error_line,
    parse_request,
)

NOT_AN_OBJECT = "the request is not a JSON object"
EXAMPLE_HINT = 'send e.g. {"v": 1, "cmd": "status"}'
WORKERS_RANGE = '"workers" must be a whole number from 1 to 1024'


def line(request: object) -> bytes:
    """A request as a client sends it, without its newline."""
    return json.dumps(request).encode()


def refusal(raw: bytes) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        parse_request(raw)
    return caught.value


def sent(data: bytes) -> dict[str, Any]:
    """One line as the master sends it: exactly one newline, at the end; a JSON object."""
    assert data.endswith(b"\n"), data
    assert data.count(b"\n") == 1, data
    document = json.loads(data)
    assert isinstance(document, dict), data
    return document


# -- parse_request: what it accepts ---------------------------------------------------------


def test_the_protocol_is_version_1_with_eight_commands() -> None:
    assert VERSION == 1
    assert [command.value for command in Command] == [
        "status",
        "reload",
        "stop",
        "scale",
        "upgrade",
        "probe",
        "rollback",
        "promote",
    ]


@pytest.mark.parametrize("command", ["status", "reload", "stop"])
def test_each_command_without_arguments_is_parsed_and_waits_by_default(command: str) -> None:
    request = parse_request(line({"v": 1, "cmd": command}))
    assert request == Request(command=Command(command), wait=True, workers=0)
    assert request.command is Command(command)


@pytest.mark.parametrize("wait", [True, False])
def test_wait_is_taken_as_given(wait: bool) -> None:
    request = parse_request(line({"v": 1, "cmd": "reload", "wait": wait}))
    assert request == Request(command=Command.RELOAD, wait=wait)


@pytest.mark.parametrize("workers", [1, 2, 64, 1023, 1024])
def test_scale_takes_a_worker_count_from_1_to_1024(workers: int) -> None:
    request = parse_request(line({"v": 1, "cmd": "scale", "workers": workers}))
    assert request == Request(command=Command.SCALE, workers=workers)


def test_keys_the_protocol_does_not_define_are_ignored() -> None:
    request = parse_request(line({"pad": "x" * 100, "v": 1, "cmd": "status", "extra": [1]}))
    assert request == Request(command=Command.STATUS)


def test_workers_are_not_checked_for_commands_other_than_scale() -> None:
    for workers in (0, 5000, "many", None):
        request = parse_request(line({"v": 1, "cmd": "status", "workers": workers}))
        assert request.command is Command.STATUS


def test_whitespace_around_the_object_is_allowed() -> None:
    assert parse_request(b' \t{"v": 1, "cmd": "stop"}\r ') == Request(command=Command.STOP)


# -- parse_request: what it refuses, and the words it uses ----------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"status",
        b'{"v": 1, "cmd": "status"',
        b'{"v": 1, "cmd": "status"}{}',
        b"\x00",
    ],
)
def test_a_line_that_is_not_json_is_refused_with_an_example(raw: bytes) -> None:
    refused = refusal(raw)
    assert refused.message == NOT_AN_OBJECT
    assert refused.hint == EXAMPLE_HINT


@pytest.mark.parametrize(
    "raw",
    [
        b'{"v": 1, "cmd": "\xff"}',
        b"\xfe\xff",
        b'{"v": 1, "cmd": "status", "pad": "\xc3"}',
        '{"v": 1, "cmd": "status"}'.encode("utf-16"),
    ],
)
def test_a_line_that_is_not_utf_8_is_refused_like_one_that_is_not_json(raw: bytes) -> None:
    refused = refusal(raw)
    assert refused.message == NOT_AN_OBJECT
    assert refused.hint == EXAMPLE_HINT


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 5000,  # within the 64 KiB line limit
        b'{"a":' * 5000,
        b'{"v": 1, "cmd": "status", "x": ' + b"[" * 20000 + b"]" * 20000 + b"}",
    ],
)
def test_a_line_nested_too_deeply_is_refused_not_fatal(raw: bytes) -> None:
    refused = refusal(raw)
    assert refused.message == "the request is nested too deeply"
    assert refused.hint == EXAMPLE_HINT


def test_an_integer_past_the_digit_limit_is_refused_not_fatal() -> None:
    refused = refusal(b'{"v": 1, "cmd": "status", "n": ' + b"9" * 60000 + b"}")
    assert refused.message == NOT_AN_OBJECT


@pytest.mark.parametrize(
    "raw",
    [
        b'{"v": 1, "cmd": "status", "f": 1' + b"0" * 400 + b".5e999999}",  # inf
        rb'{"v": 1, "cmd": "status", "s": "\ud800"}',  # a lone surrogate
    ],
)
def test_huge_floats_and_lone_surrogates_in_other_fields_are_harmless(raw: bytes) -> None:
    assert parse_request(raw).command.value == "status"


@pytest.mark.parametrize("document", [["status"], "status", 1, 1.5, None, True, []])
def test_json_that_is_not_an_object_is_refused_with_an_example(document: object) -> None:
    refused = refusal(line(document))
    assert refused.message == NOT_AN_OBJECT
    assert refused.hint == EXAMPLE_HINT


@pytest.mark.parametrize(
    ("document", "shown"),
    [
        ({"cmd": "status"}, "None"),
        ({"v": 2, "cmd": "status"}, "2"),
        ({"v": 0, "cmd": "status"}, "0"),
        ({"v": "1", "cmd": "status"}, "'1'"),
        ({"v": None, "cmd": "status"}, "None"),
        ({"v": [1], "cmd": "status"}, "[1]"),
        ({"v": True, "cmd": "status"}, "True"),
        ({"v": 1.0, "cmd": "status"}, "1.0"),
    ],
)
def test_another_protocol_version_is_refused_naming_it(
    document: dict[str, object], shown: str
) -> None:
    refused = refusal(line(document))
    assert refused.message == f"unsupported protocol version {shown}"
    assert refused.hint == 'send "v": 1'


def test_the_version_is_checked_before_the_command() -> None:
    refused = refusal(line({"v": 2, "cmd": "relaod"}))
    assert refused.message == "unsupported protocol version 2"


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("relaod", "'relaod'"),
        ("STATUS", "'STATUS'"),
        ("status ", "'status '"),
        ("", "''"),
        (None, "None"),
        (3, "3"),
        (["status"], "['status']"),
        ({"cmd": "status"}, "{'cmd': 'status'}"),
    ],
)
def test_an_unknown_command_is_refused_naming_it_and_listing_the_commands(
    command: object, shown: str
) -> None:
    refused = refusal(line({"v": 1, "cmd": command}))
    assert refused.message == f"unknown command {shown}"
    assert (
        refused.hint == "commands: status, reload, stop, scale, upgrade, probe, rollback, promote"
    )


def test_a_missing_command_is_refused_as_an_unknown_one() -> None:
    refused = refusal(line({"v": 1}))
    assert refused.message == "unknown command None"
    assert (
        refused.hint == "commands: status, reload, stop, scale, upgrade, probe, rollback, promote"
    )


@pytest.mark.parametrize("wait", [1, 0, "yes", "true", None, [], {}])
def test_wait_must_be_a_boolean(wait: object) -> None:
    refused = refusal(line({"v": 1, "cmd": "reload", "wait": wait}))
    assert refused.message == '"wait" must be true or false'


@pytest.mark.parametrize("workers", [0, -1, 1025, 10**12, -(10**12)])
def test_scale_refuses_a_worker_count_outside_1_to_1024(workers: int) -> None:
    refused = refusal(line({"v": 1, "cmd": "scale", "workers": workers}))
    assert refused.message == WORKERS_RANGE


@pytest.mark.parametrize("workers", [True, False])
def test_scale_refuses_booleans_although_python_counts_them_as_integers(workers: bool) -> None:
    refused = refusal(line({"v": 1, "cmd": "scale", "workers": workers}))
    assert refused.message == WORKERS_RANGE


@pytest.mark.parametrize("workers", ["2", 2.0, 2.5, None, [], {}, [2], "many"])
def test_scale_refuses_a_worker_count_that_is_not_a_whole_number(workers: object) -> None:
    refused = refusal(line({"v": 1, "cmd": "scale", "workers": workers}))
    assert refused.message == WORKERS_RANGE


def test_scale_without_a_worker_count_is_refused() -> None:
    refused = refusal(line({"v": 1, "cmd": "scale"}))
    assert refused.message == WORKERS_RANGE


def test_a_refusal_is_an_exception_whose_text_is_its_message() -> None:
    refused = refusal(line({"v": 1, "cmd": "relaod"}))
    assert isinstance(refused, Exception)
    assert str(refused) == refused.message


# -- encode and error_line ------------------------------------------------------------------


def test_encode_builds_one_json_line_with_the_version_and_type_first() -> None:
    data = encode("result", ok=True, workers=3, was=1)
    assert sent(data) == {"v": 1, "type": "result", "ok": True, "workers": 3, "was": 1}
    assert data.startswith(b'{"v": 1, "type": "result", ')


def test_encode_keeps_nested_fields() -> None:
    status = {"master": {"pid": 1, "sockets": [{"fd": 3}]}, "last_reload": None}
    assert sent(encode("result", ok=True, status=status)) == {
        "v": 1,
        "type": "result",
        "ok": True,
        "status": status,
    }


def test_encode_writes_values_json_lacks_as_their_text() -> None:
    document = sent(encode("result", ok=True, path=Path("/run/app/handoff.sock")))
    assert document["path"] == "/run/app/handoff.sock"


def test_encode_escapes_newlines_so_a_reply_stays_one_line() -> None:
    message = "first line\nsecond line\r\n"
    assert sent(encode("progress", message=message))["message"] == message


def test_encode_writes_ascii_and_the_text_survives() -> None:
    data = encode("error", error="café ☕ naïve")
    assert data.isascii()
    assert sent(data)["error"] == "café ☕ naïve"


def test_an_error_line_carries_its_message_and_hint() -> None:
    data = error_line("unknown command 'relaod'", "commands: status, reload, stop, scale, upgrade")
    assert sent(data) == {
        "v": 1,
        "type": "error",
        "error": "unknown command 'relaod'",
        "hint": "commands: status, reload, stop, scale, upgrade",
    }


def test_an_error_line_without_a_hint_has_no_hint_key() -> None:
    assert sent(error_line("permission denied")) == {
        "v": 1,
        "type": "error",
        "error": "permission denied",
    }
    assert "hint" not in sent(error_line("permission denied", ""))


def test_a_refusal_becomes_the_documented_error_line() -> None:
    refused = refusal(line({"v": 1, "cmd": "relaod"}))
    assert refused.hint  # given for an unknown command
    assert error_line(refused.message, refused.hint) == (
        b'{"v": 1, "type": "error", "error": "unknown command \'relaod\'", '
        b'"hint": "commands: status, reload, stop, scale, upgrade, probe, rollback, promote"}\n'
    )


def test_reload_takes_verify_and_canary_checked() -> None:
    request = parse_request(b'{"v": 1, "cmd": "reload", "verify": true, "canary": 2}')
    assert (request.verify, request.canary, request.wait) == (True, 2, True)
    for bad, why in [
        (b'{"v": 1, "cmd": "reload", "verify": 1}', '"verify" must be true or false'),
        (b'{"v": 1, "cmd": "reload", "canary": -1}', '"canary" must be a whole number'),
        (b'{"v": 1, "cmd": "reload", "canary": true}', '"canary" must be a whole number'),
        (b'{"v": 1, "cmd": "reload", "verify": true, "wait": false}', "it needs"),
    ]:
        with pytest.raises(BadRequest, match=why):
            parse_request(bad)
