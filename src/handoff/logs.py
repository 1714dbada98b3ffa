"""structlog set-up: JSON lines off a terminal (journald), a readable console on one.

Layer 2 (shell). Event names are stable dotted identifiers, catalogued in docs/events.md.
"""

from __future__ import annotations

import logging
import sys
from typing import Final, TextIO

import structlog

from handoff.config import LogFormat

LEVELS: Final = ("debug", "info", "warning", "error")


def configure(fmt: LogFormat, level: str, stream: TextIO | None = None) -> None:
    out = stream if stream is not None else sys.stderr
    if fmt is LogFormat.AUTO:
        fmt = LogFormat.CONSOLE if out.isatty() else LogFormat.JSON
    processors: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt is LogFormat.JSON:
        processors.append(structlog.processors.JSONRenderer(sort_keys=False))
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=out.isatty(), pad_event=24))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def emit(event: str, level: str = "info", **fields: object) -> None:
    """Log one event at the named level."""
    logger = structlog.get_logger("handoff")
    match level:
        case "debug":
            logger.debug(event, **fields)
        case "warning":
            logger.warning(event, **fields)
        case "error":
            logger.error(event, **fields)
        case _:
            logger.info(event, **fields)
