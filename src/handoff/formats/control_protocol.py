"""The control protocol's messages: parse a request line, build the lines sent back.

Pure. Newline-delimited JSON over a unix stream socket, version 1; the full
contract is docs/control.md. Every line sent carries ``"v": 1`` and a ``"type"``:
``result``, ``progress`` or ``error``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from handoff.errors import HandoffError
from handoff.formats.options import MAX_WORKERS, MIN_WORKERS

VERSION: Final = 1
MAX_LINE: Final = 64 * 1024


class Command(StrEnum):
    STATUS = "status"
    RELOAD = "reload"
    STOP = "stop"
    SCALE = "scale"
    UPGRADE = "upgrade"
    PROBE = "probe"  # handoff probe: live, and ready as /readyz says
    ROLLBACK = "rollback"  # back to the previous generation (docs/rollback.md)
    PROMOTE = "promote"  # the canary becomes the reload


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    command: Command
    wait: bool = True
    workers: int = 0
    verify: bool = False  # reload: wait through the --keep-previous window too
    canary: int = 0  # reload: start this many new workers beside the old ones


class BadRequest(HandoffError):
    """A request line the master cannot take; answered with an error line, never raised on."""


_EXAMPLE: Final = 'send e.g. {"v": 1, "cmd": "status"}'
_COMMAND_NAMES: Final = tuple(command.value for command in Command)


def parse_request(line: bytes) -> Request:
    """Parse one request line (without its newline)."""
    try:
        data = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("the request is not a JSON object", hint=_EXAMPLE) from None
    except RecursionError:
        # '[' x 5000 fits in one line; the parser gives up at the interpreter's depth
        # limit, which must be an answer to this client, never the master's end.
        raise BadRequest("the request is nested too deeply", hint=_EXAMPLE) from None
    if not isinstance(data, dict):
        raise BadRequest("the request is not a JSON object", hint=_EXAMPLE)
    if type(data.get("v")) is not int or data.get("v") != VERSION:  # not true, not 1.0
        raise BadRequest(
            f"unsupported protocol version {data.get('v')!r}", hint=f'send "v": {VERSION}'
        )
    command = data.get("cmd")
    if not isinstance(command, str) or command not in _COMMAND_NAMES:
        raise BadRequest(
            f"unknown command {command!r}", hint=f"commands: {', '.join(_COMMAND_NAMES)}"
        )
    wait = data.get("wait", True)
    if not isinstance(wait, bool):
        raise BadRequest('"wait" must be true or false')
    workers = data.get("workers", 0)
    if command == Command.SCALE and (
        not isinstance(workers, int)
        or isinstance(workers, bool)
        or not MIN_WORKERS <= workers <= MAX_WORKERS
    ):
        raise BadRequest(f'"workers" must be a whole number from {MIN_WORKERS} to {MAX_WORKERS}')
    verify = data.get("verify", False)
    if not isinstance(verify, bool):
        raise BadRequest('"verify" must be true or false')
    canary = data.get("canary", 0)
    if not isinstance(canary, int) or isinstance(canary, bool) or not 0 <= canary <= MAX_WORKERS:
        raise BadRequest(f'"canary" must be a whole number from 0 to {MAX_WORKERS}')
    if verify and not wait:
        raise BadRequest('"verify" waits for the window: it needs "wait": true')
    return Request(
        command=Command(command),
        wait=wait,
        workers=workers if isinstance(workers, int) else 0,
        verify=verify,
        canary=canary,
    )


def encode(kind: str, **fields: object) -> bytes:
    """One line to send: {"v": 1, "type": kind, ...}."""
    return (json.dumps({"v": VERSION, "type": kind, **fields}, default=str) + "\n").encode()


def error_line(message: str, hint: str | None = None) -> bytes:
    return encode("error", error=message, **({"hint": hint} if hint else {}))
