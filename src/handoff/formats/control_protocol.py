"""The control protocol's messages: parse a request line, build the lines sent back.

Layer 0 (pure). Newline-delimited JSON over a unix stream socket, version 1; the full
contract is docs/control.md. Every line sent carries ``"v": 1`` and a ``"type"``:
``result``, ``progress`` or ``error``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from handoff.formats.log_events import EventName

VERSION: Final = 1
MAX_LINE: Final = 64 * 1024
COMMANDS: Final = ("status", "reload", "stop", "scale")


class Command(StrEnum):
    STATUS = "status"
    RELOAD = "reload"
    STOP = "stop"
    SCALE = "scale"


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    command: Command
    wait: bool = True
    workers: int = 0


class BadRequest(Exception):
    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def parse_request(line: bytes) -> Request:
    """Parse one request line (without its newline)."""
    try:
        data = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BadRequest(
            "the request is not a JSON object", 'send e.g. {"v": 1, "cmd": "status"}'
        ) from None
    if not isinstance(data, dict):
        raise BadRequest("the request is not a JSON object", 'send e.g. {"v": 1, "cmd": "status"}')
    if data.get("v") != VERSION:
        raise BadRequest(f"unsupported protocol version {data.get('v')!r}", f'send "v": {VERSION}')
    command = data.get("cmd")
    if command not in COMMANDS:
        raise BadRequest(f"unknown command {command!r}", f"commands: {', '.join(COMMANDS)}")
    wait = data.get("wait", True)
    if not isinstance(wait, bool):
        raise BadRequest('"wait" must be true or false')
    workers = data.get("workers", 0)
    if command == Command.SCALE and (
        not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 1024
    ):
        raise BadRequest('"workers" must be a whole number from 1 to 1024')
    return Request(
        command=Command(command), wait=wait, workers=workers if isinstance(workers, int) else 0
    )


def encode(kind: str, **fields: object) -> bytes:
    """One line to send: {"v": 1, "type": kind, ...}."""
    return (json.dumps({"v": VERSION, "type": kind, **fields}, default=str) + "\n").encode()


def error_line(message: str, hint: str = "") -> bytes:
    return encode("error", error=message, **({"hint": hint} if hint else {}))


def progress_message(
    event: str, fields: Mapping[str, object], sizes: Mapping[int, int]
) -> str | None:
    """A reload's progress in words, for the events a waiting client is shown."""
    gen = fields.get("gen")
    match event:
        case EventName.GENERATION_STARTED:
            return f"generation {gen} started: {fields.get('workers')} workers"
        case EventName.WORKER_READY:
            how = (
                f"{fields.get('via')}: {fields['detail']}"
                if fields.get("detail")
                else fields.get("via")
            )
            ready = fields.get("ready_count", "?")
            size = sizes.get(gen, "?") if isinstance(gen, int) else "?"
            return f"generation {gen}: {ready} of {size} workers ready ({how})"
        case EventName.WORKER_EXITED | EventName.WORKER_SPAWN_FAILED | EventName.WORKER_NOT_READY:
            what = fields.get("status") or fields.get("reason")
            return f"generation {gen}: worker {fields.get('worker')} {what}"
        case EventName.GENERATION_ACTIVE:
            return f"generation {gen} serving ({fields.get('duration_s')} s after it started)"
        case EventName.GENERATION_DRAINING:
            return f"generation {gen} draining ({fields.get('signal')})"
        case EventName.GENERATION_FAILED:
            return f"generation {gen} failed: {fields.get('reason')}"
        case _:
            return None
