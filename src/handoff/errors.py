"""User-facing failures: each carries a one-line message, a hint and an exit code.

Pure. The CLI prints ``handoff: error: <message>`` and ``hint: <hint>`` and
exits with ``exit_code``; nothing else in the package calls ``sys.exit``.
"""

from __future__ import annotations

from typing import Final

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_NEVER_READY: Final = 3
EXIT_GAVE_UP: Final = 4  # --give-up-after: every worker kept crashing


class HandoffError(Exception):
    """An expected failure, explained to the operator."""

    exit_code: int = EXIT_FAILURE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ConfigError(HandoffError):
    """The command line or configuration is wrong (exit 2)."""

    exit_code = EXIT_USAGE


class BindError(HandoffError):
    """A listening socket could not be created (exit 1)."""


class SpawnError(HandoffError):
    """A worker process could not be started."""


class PlatformError(HandoffError):
    """The kernel or sandbox lacks something handoff needs (pidfd_open, /proc)."""
