"""The --env-file parser (formats/env_file.py): systemd's EnvironmentFile= grammar.

The expected values of ``SYSTEMD_CASES`` are what systemd 252 itself put in a service's
environment from the same file (an ``EnvironmentFile=`` unit under the real systemd of
tests/systemd, ``env -0`` as ExecStart=), so the parser is checked against systemd, not
against our reading of its source. What systemd skips with a warning is an error here,
with the line.
"""

from __future__ import annotations

import pytest

from handoff.errors import ConfigError
from handoff.formats.env_file import MAX_ENV_FILE_BYTES, EnvFileError, parse_env_file
from handoff.formats.worker_contract import worker_environment

# (the line(s) as written in the file, the value systemd 252 gave the variable)
SYSTEMD_CASES = [
    ("V01=plain", "plain"),
    ("V02 = spaced   ", "spaced"),
    ('V03="dq with # hash"', "dq with # hash"),
    ("V04='sq $HOME \\n \\\" '  ", 'sq $HOME \\n \\" '),
    ("V05=bs\\\ncontinued", "bscontinued"),
    ('V06="a \\" b \\\\ c \\$ d \\` e \\n f \\x"', 'a " b \\ c $ d ` e \\n f \\x'),
    ("V07=val # not a comment", "val # not a comment"),
    ("   V08=indented", "indented"),
    ("V09=", ""),
    ('V10="multi\nline"', "multi\nline"),
    ("V11='a'\"b\"c", "abc"),
    ("V12=a\"b\"'c' ", "a\"b\"'c'"),
    ("V13=x\\ty\\\\z", "xty\\z"),
    ('V14="dq\\\ncont"', "dqcont"),
    ("V15='sq\n two lines'  ", "sq\n two lines"),
    ('V16="x" # after', "x# after"),
    ("V17= 'lead' ", "lead"),
    ("V18=a\\ ", "a "),
    ("V19=a \\\n  b", "a   b"),
    ('V20="" ', ""),
    ("V21=''  ", ""),
    ("V22=tab\tinside\t", "tab\tinside"),
    ("V23==equals=", "=equals="),
    ("V24=semi;colon", "semi;colon"),
    ('V25="it\'s"', "it's"),
    ("V26='say \"hi\"' ", 'say "hi"'),
    ('V27=\\"quoted\\"', '"quoted"'),
    ("V28=üñí", "üñí"),
    ('V29="a"  "b"', "ab"),
    ("V30=a    b", "a    b"),
    ('V31="trailing\\\\"', "trailing\\"),
    ("V32=end\\\\", "end\\"),
    ("_V33=underscore", "underscore"),
    ('V34="\\a\\b"', "\\a\\b"),
    ("V35=#hash", "#hash"),
    ("V36=crlf\r", "crlf"),
]


def parse(text: str) -> dict[str, str]:
    return parse_env_file(text.encode(), "/srv/app/app.env")


def error(text: str | bytes) -> EnvFileError:
    data = text.encode() if isinstance(text, str) else text
    with pytest.raises(EnvFileError) as caught:
        parse_env_file(data, "/srv/app/app.env")
    return caught.value


def test_one_file_with_every_case_gives_what_systemd_gave() -> None:
    text = "# header comment\n; semi comment\n\n" + "\n".join(line for line, _ in SYSTEMD_CASES)

    assert parse(text + "\n") == {line.split("=")[0].strip(): v for line, v in SYSTEMD_CASES}


@pytest.mark.parametrize(("line", "expected"), SYSTEMD_CASES)
def test_each_case_alone_gives_what_systemd_gave(line: str, expected: str) -> None:
    name = line.split("=", maxsplit=1)[0].strip()

    assert parse(line) == {name: expected}


def test_a_name_set_twice_keeps_its_last_value() -> None:
    assert parse("A=1\nB=2\nA=3\n") == {"A": "3", "B": "2"}


def test_export_prefix_of_a_shell_env_file_is_accepted() -> None:
    # systemd skips these lines ("invalid variable name"); .env files written for a
    # shell (`set -a; . ./app.env`) have them.
    assert parse("export A=1\nexport\tB='two'\nexport=3\n") == {"A": "1", "B": "two", "export": "3"}


def test_comments_empty_files_and_blank_lines() -> None:
    assert parse("") == {}
    assert parse("\n\n   \n# only\n  ; comments\n") == {}
    assert parse("# A=1\nB=2 # not a comment\n") == {"B": "2 # not a comment"}


def test_crlf_line_ends() -> None:
    assert parse("A=1\r\nB='x'\r\n# c\r\nC=\\\r\nd\r\n") == {"A": "1", "B": "x", "C": "d"}


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("A=1\nB C=2\n", 2, "invalid variable name 'B C'"),
        ("A=1\n\n1X=2\n", 3, "invalid variable name '1X'"),
        ("DB-URL=x\n", 1, "invalid variable name 'DB-URL'"),
        ("=x\n", 1, "invalid variable name ''"),
        ("A=1\njust words\n", 2, "expected NAME=VALUE, found 'just words'"),
        ("A=1\nlast", 2, "expected NAME=VALUE, found 'last'"),
        ("A=1\nB='never closed\nC=3\n", 2, "unterminated single quote"),
        ('A=1\nB="never closed\nC=3\n', 2, "unterminated double quote"),
        ('A="a\\"\n', 1, "unterminated double quote"),
    ],
)
def test_malformed_lines_are_errors_with_their_line(text: str, line: int, reason: str) -> None:
    failure = error(text)

    assert failure.line == line
    assert failure.reason.startswith(reason)
    assert failure.message.startswith(f"env file /srv/app/app.env, line {line}: {reason}")
    assert failure.hint is not None
    assert "EnvironmentFile=" in failure.hint
    assert isinstance(failure, ConfigError)  # exit 2 at a fresh start


def test_invalid_utf8_and_nul_are_errors_with_their_line() -> None:
    assert error(b"A=1\nB=\xff\xfe\n").line == 2
    assert error(b"A=1\nB=2\nC=x\0y\n").line == 3
    assert error(b"A=1\nB=\xff\xfe\n").reason == "invalid UTF-8"


def test_the_size_is_bounded() -> None:
    big = b"A=" + b"x" * (MAX_ENV_FILE_BYTES - 2)
    assert parse_env_file(big, "f") == {"A": "x" * (MAX_ENV_FILE_BYTES - 2)}

    failure = error(big + b"x")
    assert failure.line == 0
    assert failure.message == "env file /srv/app/app.env: larger than 1 MiB"


def test_a_big_file_parses_in_linear_time() -> None:
    # 1 MiB of short lines, and 1 MiB in one double-quoted value full of escapes: both
    # must parse at once (the master reads the files in its loop at every reload).
    lines = "".join(f"NAME_{i}=value {i}\n" for i in range(60_000)).encode()[:MAX_ENV_FILE_BYTES]
    lines = lines[: lines.rindex(b"\n") + 1]
    assert len(parse_env_file(lines, "f")) > 40_000
    quoted = b'A="' + b'\\"' * ((MAX_ENV_FILE_BYTES - 8) // 2) + b'"'
    assert parse_env_file(quoted, "f")["A"] == '"' * ((MAX_ENV_FILE_BYTES - 8) // 2)
    unterminated = b'A="' + b"x\\\\" * ((MAX_ENV_FILE_BYTES - 8) // 3)
    assert error(unterminated).reason == "unterminated double quote"


def test_precedence_master_then_files_then_handoff() -> None:
    env = worker_environment(
        {"A": "master", "B": "master", "PATH": "/bin", "WATCHDOG_USEC": "1", "PWD": "/old"},
        listener_names=["127.0.0.1_8000"],
        notify_socket="@handoff/1/x",
        generation=4,
        slot=1,
        files={
            "B": "file",
            "C": "file",
            "HANDOFF_GENERATION": "99",
            "LISTEN_FDS": "9",
            "NOTIFY_SOCKET": "/run/systemd/notify",
            "WATCHDOG_PID": "1",
            "PWD": "/file",
        },
        workdir="/srv/app/current",
    )

    assert env["A"] == "master"
    assert env["B"] == "file"
    assert env["C"] == "file"
    assert env["HANDOFF_GENERATION"] == "4"
    assert env["HANDOFF_WORKER"] == "1"
    assert env["LISTEN_FDS"] == "1"
    assert env["NOTIFY_SOCKET"] == "@handoff/1/x"
    assert "WATCHDOG_USEC" not in env
    assert "WATCHDOG_PID" not in env
    assert env["PWD"] == "/srv/app/current"  # noqa: S105 - the variable, not a password


def test_with_fd_placeholders_a_file_cannot_bring_listen_variables_back() -> None:
    env = worker_environment(
        {},
        listener_names=["x"],
        notify_socket="@n",
        generation=1,
        slot=0,
        listen_fds=False,
        files={"LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "LISTEN_PID": "1"},
    )

    assert not {"LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID"} & set(env)
