"""Failpoints: a test's way to make the master hit an internal fault on purpose.

``HANDOFF_FAILPOINT=EVENT[:TIMES][,EVENT[:TIMES]...]`` makes the master raise
``InjectedFault`` right after it logs EVENT (a name from docs/events.md, e.g.
``reload.requested`` or ``generation.draining``), TIMES times in all (default 1). It is
read once, at start, and removed from the environment (workers never see it); what is
left of it is carried across the master's re-exec, so a fault fires the number of times
asked, not once per exec. Off unless set. docs/reliability.md has the details.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Final

from handoff.errors import ConfigError
from handoff.formats.log_events import EventName

VARIABLE: Final = "HANDOFF_FAILPOINT"
_MAX_TIMES: Final = 1000


class InjectedFault(RuntimeError):
    """The fault a failpoint asked for: handled exactly like a bug in handoff."""


class Failpoints:
    def __init__(self, spec: str = "") -> None:
        self._left: dict[EventName, int] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, _, times = item.partition(":")
            try:
                event = EventName(name)
            except ValueError:
                raise ConfigError(
                    f"{VARIABLE}: unknown event {name!r}", hint="name an event of docs/events.md"
                ) from None
            if times and (not times.isdigit() or not 0 < int(times) <= _MAX_TIMES):
                raise ConfigError(
                    f"{VARIABLE}: {item!r}: times must be 1 to {_MAX_TIMES}",
                    hint="e.g. reload.requested:2",
                )
            self._left[event] = int(times or 1)

    @classmethod
    def take(cls, environ: MutableMapping[str, str]) -> Failpoints:
        """Read and remove the variable."""
        return cls(environ.pop(VARIABLE, ""))

    def after(self, event: EventName) -> None:
        """Raise InjectedFault if a failpoint is set on this event (and still has times)."""
        left = self._left.get(event, 0)
        if left <= 0:
            return
        self._left[event] = left - 1
        raise InjectedFault(f"failpoint {event.value} ({VARIABLE})")

    def spec(self) -> str:
        """What is left, in the variable's format."""
        return ",".join(f"{event.value}:{left}" for event, left in self._left.items() if left)
