"""The lines of a server's output worth keeping in the results."""

from __future__ import annotations

from pathlib import Path
from typing import Final

LOG_TAIL_LINES: Final = 20
NOTABLE_LINES: Final = 40

# gunicorn's log lines that say why it reloaded, failed or stopped.
GUNICORN_NOTABLE: Final = (
    "[ERROR]",
    "[CRITICAL]",
    "[WARNING]",
    "Hang up",
    "Shutting down",
    "Reason:",
    "HaltServer",
    "Error:",
)

# The master's output lines (JSON events, tracebacks) that say why a generation failed.
HANDOFF_NOTABLE: Final = (
    '"reload.failed"',
    '"generation.failed"',
    '"worker.not_ready"',
    '"worker.spawn_failed"',
    "Error:",
    "RuntimeError",
)


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []


def log_tail(path: Path) -> list[str]:
    return read_lines(path)[-LOG_TAIL_LINES:]


def notable_lines(lines: list[str], markers: tuple[str, ...]) -> list[str]:
    picked = [line for line in lines if any(marker in line for marker in markers)]
    return picked[-NOTABLE_LINES:]


def lines_of_reload(lines: list[str], number: int) -> list[str]:
    """gunicorn's log from its number-th "Hang up" to the next one (at most NOTABLE_LINES)."""
    hups = [i for i, line in enumerate(lines) if "Hang up" in line]
    if len(hups) < number:
        return []
    end = hups[number] if len(hups) > number else len(lines)
    return lines[hups[number - 1] : end][:NOTABLE_LINES]
