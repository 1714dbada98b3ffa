"""Keep-alive rescue: the one request the master hands on, checked and rewritten.

Pure. The bytes a client sent on a rescued connection are handed to the new generation
only if they are one plain HTTP/1.x request: a strict request line (``METHOD SP target
SP HTTP/1.0|1.1 CRLF``; never ``PRI * HTTP/2.0``, never ``CONNECT``), a complete head
within ``MAX_HEAD`` bytes, no upgrade of any kind (WebSocket, h2c) and a body whose end
is known from ``Content-Length`` alone. The head goes on with ``Connection: close``
instead of the client's hop-by-hop headers, so the new worker answers once and closes,
and the client opens its next connection to the new generation itself. Optionally the
client's address goes along (``--rescue-forwarded``). Nothing else is parsed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from handoff.errors import ConfigError
from handoff.formats.rescue_rules import Release

MAX_HEAD: Final = 16 * 1024
_REQUEST_LINE: Final = re.compile(
    rb"([A-Z]{3,20}) (/[\x21-\x7e]*|https?://[\x21-\x7e]+|\*) HTTP/1\.([01])\r\n"
)
# What a request line may hold before its end: upper-case method, SP, visible ASCII.
_LINE_SO_FAR: Final = re.compile(rb"[A-Z]{1,20}( [\x21-\x7e]*( [HTP/0-9.]{0,8}\r?)?)?")
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HOP_BY_HOP: Final = frozenset({b"connection", b"keep-alive", b"proxy-connection"})
_UPGRADES: Final = frozenset({b"upgrade", b"http2-settings"})


class Forwarded(StrEnum):
    """--rescue-forwarded: how the rescued request tells the app its client's address."""

    NONE = "none"
    FORWARDED = "forwarded"  # RFC 7239: Forwarded: for=...
    X_FORWARDED_FOR = "x-forwarded-for"


DEFAULT_HOLD_S: Final = 2.0  # the shortest keep-alive timeout of the servers in the matrix


@dataclass(frozen=True, slots=True, kw_only=True)
class RescueOptions:
    """--rescue-keepalive, --rescue-hold, --rescue-forwarded (docs/rescue.md)."""

    enabled: bool = False
    hold_s: float = DEFAULT_HOLD_S
    forwarded: Forwarded = Forwarded.NONE

    def __post_init__(self) -> None:
        if self.hold_s <= 0:
            raise ConfigError("--rescue-hold must be above 0 seconds", hint="e.g. 2")
        if not self.enabled and self.forwarded is not Forwarded.NONE:
            raise ConfigError(
                "--rescue-forwarded needs --rescue-keepalive: only rescued requests get it",
                hint="add --rescue-keepalive, or drop --rescue-forwarded",
            )


@dataclass(frozen=True, slots=True)
class Request:
    """A complete, acceptable request head."""

    line: bytes  # the request line, CRLF included
    fields: tuple[tuple[bytes, bytes], ...]  # (name, value) as sent, hop-by-hop left out
    head_length: int  # bytes of the head in the client's stream, the blank line included
    body_length: int  # from Content-Length; 0 without


class Incomplete:
    """More bytes are needed before the head can be judged."""


INCOMPLETE: Final = Incomplete()


def read_request(data: bytes) -> Request | Incomplete | Release:
    """The head at the start of data, if it is one acceptable request; INCOMPLETE while
    what came so far could still become one; else why the connection is released."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) >= MAX_HEAD:
            return Release.HEAD_TOO_LARGE
        line_end = data.find(b"\r\n")
        if line_end < 0:
            return INCOMPLETE if _LINE_SO_FAR.fullmatch(data) else Release.NOT_HTTP1
        return INCOMPLETE if _request_line(data[: line_end + 2]) else Release.NOT_HTTP1
    if end + 4 > MAX_HEAD:
        return Release.HEAD_TOO_LARGE
    lines = data[: end + 2].split(b"\r\n")[:-1]
    first = lines[0] + b"\r\n"
    if not _request_line(first):
        return Release.NOT_HTTP1
    fields: list[tuple[bytes, bytes]] = []
    lengths: set[bytes] = set()
    for raw in lines[1:]:
        name, colon, value = raw.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            return Release.NOT_HTTP1  # obs-fold, no colon, a space before it: not ours to guess
        key, value = name.lower(), value.strip(b" \t")
        if key in _UPGRADES:
            return Release.UPGRADE
        if key == b"transfer-encoding":
            return Release.REQUEST_BODY
        if key == b"content-length":
            lengths.update(part.strip() for part in value.split(b","))
        if key == b"connection" and b"upgrade" in _tokens(value):
            return Release.UPGRADE
        if key not in _HOP_BY_HOP:
            fields.append((name, value))
    if len(lengths) > 1 or not all(n.isdigit() and len(n) <= 15 for n in lengths):
        return Release.REQUEST_BODY
    body = int(next(iter(lengths))) if lengths else 0
    return Request(first, tuple(fields), end + 4, body)


def _request_line(line: bytes) -> bool:
    match = _REQUEST_LINE.fullmatch(line)
    return match is not None and match.group(1) not in (b"CONNECT", b"PRI")


def _tokens(value: bytes) -> set[bytes]:
    return {part.strip().lower() for part in value.split(b",")}


def rewrite(request: Request, client: str | None, forwarded: Forwarded) -> bytes:
    """The head as the new generation gets it: ``Connection: close`` in place of the
    client's hop-by-hop headers, and the client's address if asked (client: its IP)."""
    fields = list(request.fields)
    if client is not None and forwarded is not Forwarded.NONE:
        if forwarded is Forwarded.FORWARDED:
            name, value = b"Forwarded", b'for="[' + client.encode() + b']"'
            if ":" not in client:
                value = b"for=" + client.encode()
        else:
            name, value = b"X-Forwarded-For", client.encode()
        fields = _appended(fields, name, value)
    lines = [request.line, *(name + b": " + value + b"\r\n" for name, value in fields)]
    return b"".join([*lines, b"Connection: close\r\n\r\n"])


def _appended(
    fields: list[tuple[bytes, bytes]], name: bytes, value: bytes
) -> list[tuple[bytes, bytes]]:
    """The address appended to the last hop list already there, else a field of its own."""
    key = name.lower()
    for index in range(len(fields) - 1, -1, -1):
        if fields[index][0].lower() == key:
            fields[index] = (fields[index][0], fields[index][1] + b", " + value)
            return fields
    return [*fields, (name, value)]
