"""``--env-file``: systemd's EnvironmentFile= syntax, parsed into variables.

Pure: the bytes come from system/deploy_paths.py. The grammar is systemd's
(``parse_env_file_internal`` in src/basic/env-file.c, checked against systemd 252 by
tests/unit/test_env_file.py):

- empty lines and lines whose first non-blank character is ``#`` or ``;`` are comments
  (only whole lines: ``A=b # c`` sets ``b # c``);
- ``NAME=VALUE``, blanks around ``NAME`` and before VALUE ignored, an unquoted VALUE
  loses its trailing blanks;
- ``'...'`` keeps everything literally, newlines included; ``"..."`` too, except that a
  backslash escapes ``" \\ ` $`` and a backslash-newline is removed (any other ``\\x``
  stays as it is); quoted and unquoted parts join when nothing but blanks separates
  them (``'a' "b"`` is ``ab``); a quote inside an unquoted value is an ordinary character;
- outside quotes a backslash takes the next character literally, and a backslash at the
  end of a line joins the next line;
- LF, CRLF and CR all end a line.

Two differences, both on purpose: ``export NAME=VALUE`` (a shell ``.env`` file) is
accepted, where systemd ignores the line; and what systemd skips with a warning (a line
without ``=``, an invalid name, invalid UTF-8, an unterminated quote) is an error here,
with the line, so that a typo fails a reload instead of silently dropping a variable.
"""

from __future__ import annotations

import re
from typing import Final

from handoff.errors import ConfigError

# Per file: the master reads it at every reload, in its event loop.
MAX_ENV_FILE_BYTES: Final = 1 << 20

_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EXPORT: Final = re.compile(r"export[ \t]+")
_BLANKS: Final = re.compile(r"[ \t\n\r]*")  # between assignments: newlines too
_VALUE_BLANKS: Final = re.compile(r"[ \t]*")
_TO_LINE_END: Final = re.compile(r"[^\n\r]*")
_KEY: Final = re.compile(r"[^=\n\r]*")
_UNQUOTED_RUN: Final = re.compile(r"[^\\\n\r]+")
_DOUBLE_QUOTED: Final = re.compile(r'((?:[^"\\]|\\.)*)"', re.DOTALL)
_DOUBLE_ESCAPE: Final = re.compile(r"\\(.)", re.DOTALL)
_NEEDS_ESCAPE: Final = frozenset('"\\`$')
_NEWLINES: Final = "\n\r"


class EnvFileError(ConfigError):
    """An --env-file that cannot be used: its path, the line (0: the whole file), why."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        where = f"env file {path}, line {line}" if line else f"env file {path}"
        hint = (
            "the syntax is systemd's EnvironmentFile=: NAME=VALUE lines, "
            "# comments, 'single' or \"double\" quotes (docs/cli.md)"
            if line
            else "--env-file names a regular file of at most 1 MiB; a relative path "
            "starts from the directory handoff was started in"
        )
        super().__init__(f"{where}: {reason}", hint=hint)
        self.path = path
        self.line = line
        self.reason = reason


def parse_env_file(data: bytes, path: str) -> dict[str, str]:
    """The variables a file sets, in order (a name set twice keeps its last value)."""
    if len(data) > MAX_ENV_FILE_BYTES:
        raise EnvFileError(path, 0, f"larger than {MAX_ENV_FILE_BYTES >> 20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EnvFileError(path, _line_at(data, exc.start), "invalid UTF-8") from None
    if "\0" in text:
        raise EnvFileError(path, _line_at(text, text.index("\0")), "a NUL byte")
    return _Parser(text, path).parse()


def _line_at(text: str | bytes, position: int) -> int:
    if isinstance(text, bytes):
        return text.count(b"\n", 0, position) + 1
    return text.count("\n", 0, position) + 1


class _Parser:
    def __init__(self, text: str, path: str) -> None:
        self._text = text
        self._path = path
        self._pos = 0

    def _fail(self, position: int, reason: str) -> EnvFileError:
        return EnvFileError(self._path, _line_at(self._text, position), reason)

    def _skip(self, pattern: re.Pattern[str]) -> str:
        match = pattern.match(self._text, self._pos)
        assert match is not None  # every pattern used here can match the empty string
        self._pos = match.end()
        return match.group()

    def _peek(self) -> str:
        return self._text[self._pos : self._pos + 1]

    def parse(self) -> dict[str, str]:
        variables: dict[str, str] = {}
        while True:
            self._skip(_BLANKS)
            if self._pos >= len(self._text):
                return variables
            if self._peek() in "#;":
                self._skip(_TO_LINE_END)
                continue
            start = self._pos
            key = self._skip(_KEY)
            if self._peek() != "=":
                shown = key.strip()[:40]
                raise self._fail(start, f"expected NAME=VALUE, found '{shown}'")
            self._pos += 1
            name = _EXPORT.sub("", key.rstrip(" \t"), count=1)
            if not _NAME.fullmatch(name):
                raise self._fail(
                    start,
                    f"invalid variable name '{name[:40]}' "
                    "(letters, digits and _, not starting with a digit)",
                )
            variables[name] = self._value()

    def _value(self) -> str:
        """After '=': quoted and unquoted parts up to the end of the line."""
        parts: list[str] = []
        while True:
            self._skip(_VALUE_BLANKS)
            char = self._peek()
            if not char or char in _NEWLINES:
                return "".join(parts)
            if char == "'":
                opened = self._pos
                end = self._text.find("'", self._pos + 1)
                if end < 0:
                    raise self._fail(opened, "unterminated single quote")
                parts.append(self._text[self._pos + 1 : end])
                self._pos = end + 1
            elif char == '"':
                opened = self._pos
                match = _DOUBLE_QUOTED.match(self._text, self._pos + 1)
                if match is None:
                    raise self._fail(opened, "unterminated double quote")
                parts.append(_DOUBLE_ESCAPE.sub(_unescape_double, match.group(1)))
                self._pos = match.end()
            else:
                parts.append(self._unquoted())
                return "".join(parts)

    def _unquoted(self) -> str:
        """The rest of the line, outside quotes: backslash escapes, trailing blanks dropped."""
        parts: list[str] = []
        strip_from: int | None = None  # where trailing blanks that are not escaped start
        length = 0
        while True:
            char = self._peek()
            if not char or char in _NEWLINES:
                break
            if char == "\\":
                escaped = self._text[self._pos + 1 : self._pos + 2]
                self._pos += 1 + len(escaped)
                if escaped and escaped not in _NEWLINES:
                    parts.append(escaped)
                    length += 1
                elif escaped == "\r" and self._peek() == "\n":
                    self._pos += 1  # a CRLF continuation
                strip_from = None
                continue
            run = self._skip(_UNQUOTED_RUN)
            kept = len(run.rstrip(" \t"))
            strip_from = length + kept if kept < len(run) else None
            parts.append(run)
            length += len(run)
        value = "".join(parts)
        return value if strip_from is None else value[:strip_from]


def _unescape_double(match: re.Match[str]) -> str:
    char = match.group(1)
    if char in _NEEDS_ESCAPE:
        return char
    if char == "\n":
        return ""  # a continuation line
    return "\\" + char
