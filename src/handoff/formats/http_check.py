"""``--ready http:PATH``: the option values, the probe's request, what it reads back.

Pure. The probe itself (system/http_probe.py) is a short-lived process the master starts
per try; it reports one line (``Report``) on a pipe and through its exit status.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Final

from handoff.errors import ConfigError

StatusRanges = tuple[tuple[int, int], ...]
DEFAULT_STATUSES: Final[StatusRanges] = ((200, 299),)
DEFAULT_TRY_TIMEOUT_S: Final = 2.0
MAX_PATH: Final = 2048
MAX_HEAD_BYTES: Final = 8192  # of the answer read: the status line and the headers
MAX_REPORT_BYTES: Final = 2048  # of the probe's report the master reads
STATUS_FORMS: Final = "CODE or FROM-TO, comma-separated, e.g. 200-299 or 200,204"
# What may follow http: : an origin-form request target, printable ASCII without spaces.
_PATH: Final = re.compile(r"/[!-~]*")
_STATUS_LINE: Final = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?: ([^\r\n]*))?\r?\n")


def parse_path(text: str) -> str:
    """The PATH of ``--ready http:PATH``: what the probe sends in its request line."""
    if not text:
        raise ConfigError("'http:': needs a path, e.g. http:/healthz")
    if len(text) > MAX_PATH or not _PATH.fullmatch(text):
        raise ConfigError(
            f"'http:{text}': the path must start with '/' and be printable ASCII without "
            f"spaces, at most {MAX_PATH} characters (e.g. http:/healthz?full=1)"
        )
    return text


def parse_statuses(text: str) -> StatusRanges:
    """``--ready-status``: the answers that count as ready."""
    ranges: list[tuple[int, int]] = []
    for item in text.split(","):
        low, dash, high = item.strip().partition("-")
        if not dash:
            high = low
        if not (_is_status(low) and _is_status(high)) or int(low) > int(high):
            raise ConfigError(f"'{text}': give {STATUS_FORMS} (codes 100-599)")
        ranges.append((int(low), int(high)))
    return tuple(ranges)


def _is_status(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) == 3 and 100 <= int(text) <= 599


def describe_statuses(ranges: StatusRanges) -> str:
    return ",".join(f"{low}" if low == high else f"{low}-{high}" for low, high in ranges)


def accepted(status: int, ranges: StatusRanges) -> bool:
    return any(low <= status <= high for low, high in ranges)


def request_head(path: str, host: str) -> bytes:
    """The request, all but its final empty line: the probe sends that only once it knows
    which process accepted the connection (so that the answer, if any, is that one's)."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: handoff-ready-probe\r\n"
        "Accept: */*\r\nConnection: close\r\n"
    ).encode("ascii")


REQUEST_END: Final = b"\r\n"


@dataclass(frozen=True, slots=True)
class StatusLine:
    status: int
    reason: str

    def __str__(self) -> str:
        return f"HTTP {self.status} {self.reason}".rstrip()


def status_line(head: bytes) -> StatusLine | None:
    """The status of an HTTP/1.x answer from its first bytes (None: not one, or not yet)."""
    match = _STATUS_LINE.match(head)
    if match is None:
        return None
    reason = (match.group(2) or b"").decode("latin-1")
    printable = "".join(ch for ch in reason if ch.isprintable())[:80]
    return StatusLine(int(match.group(1)), printable.strip())


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """One try of the probe, as it tells the master."""

    ok: bool
    detail: str  # for the log: what happened
    answer: str = ""  # the worker's own answer ("HTTP 503 Service Unavailable"), if any

    def encode(self) -> bytes:
        fields = {"ok": self.ok, "detail": self.detail, "answer": self.answer}
        return (json.dumps(fields) + "\n").encode()


def decode_report(data: bytes, exit_code: int | None) -> Report:
    """The probe's report from what it wrote (its last line), else from its exit status."""
    text = data[-MAX_REPORT_BYTES:].decode("utf-8", "replace").strip()
    last = text.rsplit("\n", 1)[-1] if text else ""
    try:
        fields = json.loads(last)
    except ValueError:
        fields = None
    if isinstance(fields, dict) and isinstance(fields.get("detail"), str):
        return Report(
            ok=fields.get("ok") is True and exit_code == 0,
            detail=str(fields["detail"])[:500],
            answer=str(fields.get("answer") or "")[:200],
        )
    how = "was killed" if exit_code is None else f"exited {exit_code}"
    said = f": {last[:300]}" if last else ""
    return Report(ok=False, detail=f"the http probe {how} without a report{said}")
