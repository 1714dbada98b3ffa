"""A worker's output as lines: split and bounded, kept as last words, rendered per sink.

Pure. The master reads each worker's stdout and stderr (one pipe per worker) in chunks
(master/worker_output.py); this module turns those bytes into lines, keeps the worker's
last lines, and renders a line for each destination: a console line with a prefix, a
JSON event line (``worker.output``), a journald native-protocol entry.

Every bound is here. A line longer than ``MAX_LINE`` bytes is split into pieces of at
most ``MAX_LINE`` (cut at a UTF-8 character boundary), so the partial line kept between
two reads is never longer than ``MAX_LINE``, whatever a worker writes (binary, no
newline ever, 50 MB at once). The last words (``Tail``) are at most ``TAIL_LINES``
lines and ``TAIL_CHARS`` characters, each line cut to ``TAIL_LINE_CHARS``. Bytes that
are not UTF-8 become U+FFFD; a trailing CR (CRLF line ends) is dropped.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable, Mapping
from json.encoder import encode_basestring_ascii
from typing import Final

from handoff.formats.log_events import EventName

MAX_LINE: Final = 16 * 1024  # bytes: longer lines are split (journald's LineMax is 48K)
TAIL_LINES: Final = 20
TAIL_CHARS: Final = 4096
TAIL_LINE_CHARS: Final = 1024  # one long line does not push the traceback out

_NEWLINE: Final = b"\n"
_CR: Final = b"\r"


def _cut(data: bytes) -> tuple[list[bytes], bytes]:
    """data in pieces of at most MAX_LINE bytes, each ending on a character boundary,
    and what is left (at most MAX_LINE bytes; empty only if data is)."""
    pieces: list[bytes] = []
    start = 0
    while len(data) - start > MAX_LINE:
        end = start + MAX_LINE
        # Back off over UTF-8 continuation bytes (10xxxxxx), at most 3, so that a
        # character is not split between two lines; binary data is cut where it is.
        back = end
        while back > end - 3 and data[back] & 0xC0 == 0x80:
            back -= 1
        if back > start and data[back] & 0xC0 != 0x80:
            end = back
        pieces.append(data[start:end])
        start = end
    return pieces, data[start:]


class LineSplitter:
    """Bytes in, whole lines out; keeps the unfinished line (at most MAX_LINE bytes)."""

    __slots__ = ("_partial",)

    def __init__(self, partial: bytes = b"") -> None:
        self._partial = partial[:MAX_LINE]

    @property
    def partial(self) -> bytes:
        return self._partial

    def feed(self, data: bytes) -> list[bytes]:
        """The lines data completes (without their newline), long ones split."""
        if not data:
            return []
        if self._partial:
            data = self._partial + data
        *whole, rest = data.split(_NEWLINE)
        lines: list[bytes] = []
        for line in whole:
            last = line
            if len(line) > MAX_LINE:
                pieces, last = _cut(line)
                lines.extend(pieces)
            lines.append(last[:-1] if last.endswith(_CR) else last)
        pieces, self._partial = _cut(rest)
        lines.extend(pieces)
        return lines

    def flush(self) -> bytes | None:
        """The unfinished line as a line of its own (at the end of the output); None if
        there is none."""
        partial, self._partial = self._partial, b""
        return partial or None


def decode(line: bytes) -> str:
    return line.decode("utf-8", "replace")


class Tail:
    """A worker's last lines: at most TAIL_LINES lines and TAIL_CHARS characters."""

    __slots__ = ("_chars", "_lines")

    def __init__(self, lines: Iterable[str] = ()) -> None:
        self._lines: deque[str] = deque()
        self._chars = 0
        self.add(list(lines))

    def add(self, texts: list[str]) -> None:
        for text in texts[-TAIL_LINES:]:
            kept = text if len(text) <= TAIL_LINE_CHARS else text[:TAIL_LINE_CHARS] + "…"
            self._lines.append(kept)
            self._chars += len(kept)
        while len(self._lines) > TAIL_LINES or self._chars > TAIL_CHARS:
            self._chars -= len(self._lines.popleft())

    def lines(self) -> tuple[str, ...]:
        return tuple(self._lines)


def console_prefix(name: str, gen: int, worker: int) -> str:
    """What starts each console line of a worker: ``app[g3.w0] ``."""
    return f"{name}[g{gen}.w{worker}] "


def json_parts(event: EventName, gen: int, worker: int, pid: int) -> tuple[str, str]:
    """The JSON event line around the text: (before, after), after ends in the timestamp's
    opening quote (the caller adds the timestamp and ``"}``)."""
    before = f'{{"gen": {gen}, "worker": {worker}, "pid": {pid}, "text": '
    after = f', "event": "{event.value}", "level": "info", "timestamp": "'
    return before, after


def json_text(text: str) -> str:
    """The text as a JSON string (ASCII, as the master's other JSON lines): what
    ``json.dumps`` does for a str, without its per-call overhead."""
    return encode_basestring_ascii(text)


def journal_field(name: str, value: str | bytes) -> bytes:
    """One field of journald's native protocol (systemd.journal-fields(7), the
    "Native Journal Protocol"): ``NAME=value\\n``, or the binary form for a value with a
    newline."""
    data = value.encode("utf-8", "replace") if isinstance(value, str) else value
    if _NEWLINE not in data:
        return name.encode() + b"=" + data + _NEWLINE
    return name.encode() + _NEWLINE + struct.pack("<Q", len(data)) + data + _NEWLINE


def journal_fields(fields: Mapping[str, str]) -> bytes:
    """The fields every entry of one worker carries (after its MESSAGE=)."""
    return b"".join(journal_field(name, value) for name, value in fields.items())
