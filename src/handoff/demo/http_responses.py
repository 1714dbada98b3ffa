"""Reading HTTP/1.x responses off an asyncio stream, for the load generator.

Not part of the master. Just enough HTTP for counting failures precisely:
the status line and headers, bodies framed by Content-Length, chunked encoding, or the end
of the connection, interim 1xx responses, and whether the server will close the
connection. An early end of the connection is its own exception, because where it
happens (before the first byte of a response on a reused connection, or later) is what
tells the idle keep-alive race from a lost request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


class EarlyEof(Exception):
    """The peer closed the connection before a complete response."""

    def __init__(self, *, before_first_byte: bool) -> None:
        super().__init__(
            "connection closed before first byte"
            if before_first_byte
            else "connection closed mid-response"
        )
        self.before_first_byte = before_first_byte


class BadResponse(Exception):
    """The bytes received are not an HTTP/1.x response we can parse."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    close: bool  # the server will close the connection after this response


def _connection_closes(version: str, headers: dict[str, str]) -> bool:
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    if version == "HTTP/1.0":
        return "keep-alive" not in tokens
    return "close" in tokens


def _parse_head(head: bytes) -> tuple[str, int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise BadResponse(f"bad status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise BadResponse(f"bad header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return parts[0], int(parts[1]), headers


async def _read_chunked(reader: asyncio.StreamReader) -> None:
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BadResponse(f"bad chunk size {size_line[:40]!r}") from None
        if size == 0:
            # Trailers, then the empty line that ends the message.
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return
        await reader.readexactly(size + 2)


async def read_response(reader: asyncio.StreamReader) -> Response:
    """Read one response; raise EarlyEof if the connection ends before it is complete."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            raise EarlyEof(before_first_byte=not exc.partial) from None
        except asyncio.LimitOverrunError:
            raise BadResponse("response head too large") from None
        version, status, headers = _parse_head(head[:-4])
        # 1xx are interim responses (100 Continue...): the real one follows.
        if not 100 <= status < 200 or status == 101:
            break
    close = _connection_closes(version, headers)
    try:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            await _read_chunked(reader)
        elif "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise BadResponse("bad Content-Length") from None
            await reader.readexactly(length)
        elif status not in (204, 304):
            # No framing: the body runs to the end of the connection.
            await reader.read()
            close = True
    except asyncio.IncompleteReadError:
        raise EarlyEof(before_first_byte=False) from None
    return Response(status=status, headers=headers, close=close)
