"""The health endpoint's side of HTTP/1.x: a bounded request-head parser and responses.

Pure: bytes in, bytes out. Only what a load balancer, a Kubernetes probe or a
Prometheus scrape sends is understood (GET or HEAD, a request line and headers); the
answer always closes the connection, so there is no body to read and no keep-alive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from handoff.errors import ConfigError
from handoff.formats.options import BindKind, BindSpec, parse_bind

# The request line and headers together; a client sending more is cut off with 431.
MAX_HEAD: Final = 8192
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
TEXT: Final = "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # without the query string

    @property
    def head_only(self) -> bool:
        return self.method == "HEAD"


class BadHttpRequest(Exception):
    """The request cannot be answered; status is what to answer it with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_head(data: bytes) -> Request | None:
    """The request in data, or None while its head is incomplete; BadHttpRequest if it
    is garbage, too long or not GET/HEAD."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")  # a bare-LF client (printf | nc) is tolerated
    if end < 0:
        if len(data) > MAX_HEAD:
            raise BadHttpRequest(431, f"request head longer than {MAX_HEAD} bytes")
        return None
    if end > MAX_HEAD:
        raise BadHttpRequest(431, f"request head longer than {MAX_HEAD} bytes")
    line = data[:end].split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1].startswith(b"/"):
        raise BadHttpRequest(400, "not an HTTP/1.x request line")
    try:
        method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise BadHttpRequest(400, "request line is not ASCII") from None
    if method not in ("GET", "HEAD"):
        raise BadHttpRequest(405, f"method {method[:16]!r} not allowed (GET or HEAD)")
    return Request(method=method, path=target.split("?", 1)[0])


def response(
    status: int, body: bytes, *, head_only: bool = False, content_type: str = TEXT
) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + (b"" if head_only else body)


def text_response(status: int, line: str, *, head_only: bool = False) -> bytes:
    """A one-line plain-text answer."""
    return response(status, (line + "\n").encode("utf-8"), head_only=head_only)


def parse_health_address(text: str) -> BindSpec:
    """--health: HOST:PORT ([V6]:PORT, :PORT) or unix:PATH, without socket options."""
    spec = parse_bind(text)
    if spec.kind is BindKind.FD or spec.mode is not None or spec.owner or spec.group:
        raise ConfigError(
            f"'{text}': the health endpoint takes HOST:PORT or unix:PATH "
            "(e.g. 127.0.0.1:9000, unix:/run/myapp/health.sock)"
        )
    return spec
