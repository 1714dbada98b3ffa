"""Keep-alive rescue: the rescued connections, found by fd, by phase and by deadline.

One ``Rescued`` record per connection the master copied from an old worker. The table
files it under its copy's fd number (which stays its key after the socket closed), keeps
the ones the worker may still hold apart (the looks go through those only), maps the fds
that can wake the loop (the copy's, and a relay's connection to the new generation) and
keeps the held and relayed ones' deadlines in a heap (entries replaced or gone are
dropped lazily), so that nothing per loop turn walks every connection.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum, auto

from handoff.core.model import Pid
from handoff.formats.rescue_rules import Release
from handoff.master.rescue_relay import Relay
from handoff.system.rescue_copies import Copy


class Phase(Enum):
    WATCHED = auto()  # the worker may still hold it
    HELD = auto()  # let go at a request boundary: waiting for the client's request
    RELAYING = auto()


@dataclass(slots=True)
class Rescued:
    copy: Copy
    worker: Pid
    window_ends: float
    fd: int  # the copy's fd number: its key in the table, even once the socket is closed
    phase: Phase = Phase.WATCHED
    let_go: bool = False  # WATCHED: the worker let go, its last bytes not acknowledged yet
    deadline: float = 0.0  # HELD: the hold's end; RELAYING: the relay's
    on_timeout: Release = Release.HOLD_TIMEOUT  # HELD: why it goes at the deadline
    received: bytearray = field(default_factory=bytearray)  # HELD: the request so far
    lingering: bool = False  # RELAYING: the response is out, the client's EOF awaited
    relay: Relay | None = None


class RescueTable:
    """Every rescued connection, and what the loop needs to find it fast."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._all: dict[int, Rescued] = {}
        self._watched: dict[int, Rescued] = {}
        self._waking: dict[int, Rescued] = {}  # the copy's fd, and a relay's upstream
        self._deadlines: list[tuple[float, int, Rescued]] = []
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[Rescued]:
        return iter(list(self._all.values()))

    def add(self, rescued: Rescued) -> None:
        self._all[rescued.fd] = self._watched[rescued.fd] = self._waking[rescued.fd] = rescued

    def waking(self, fd: int) -> Rescued | None:
        return self._waking.get(fd)

    def wakes_too(self, fd: int, rescued: Rescued) -> None:
        """A relay's connection to the new generation: its wakeups go to rescued."""
        self._waking[fd] = rescued

    def quiet(self, fd: int, rescued: Rescued) -> None:
        """fd (a relay's upstream) closes next: its number may soon name another socket."""
        if self._waking.get(fd) is rescued:
            del self._waking[fd]

    def watched(self, pid: Pid | None = None) -> list[Rescued]:
        """The connections the worker (any, without pid) may still hold."""
        return [r for r in self._watched.values() if pid is None or r.worker == pid]

    def any_watched(self) -> bool:
        return bool(self._watched)

    def unwatch(self, rescued: Rescued) -> None:
        """The worker let go of it: no more looks."""
        self._watched.pop(rescued.fd, None)

    def forget(self, rescued: Rescued) -> None:
        for table in (self._all, self._watched, self._waking):
            if table.get(rescued.fd) is rescued:
                del table[rescued.fd]

    def set_deadline(self, rescued: Rescued, delay_s: float) -> None:
        rescued.deadline = self._clock() + delay_s
        heapq.heappush(self._deadlines, (rescued.deadline, next(self._sequence), rescued))

    def next_deadline(self) -> float | None:
        while self._deadlines and not self._current(*self._deadlines[0]):
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def due(self, now: float) -> Iterator[Rescued]:
        """The connections whose deadline has come, earliest first (each once)."""
        while self._deadlines and self._deadlines[0][0] <= now:
            entry = heapq.heappop(self._deadlines)
            if self._current(*entry):
                yield entry[2]

    def _current(self, deadline: float, _: int, rescued: Rescued) -> bool:
        """Is this heap entry still the connection's deadline (not replaced, not gone)?"""
        return self._all.get(rescued.fd) is rescued and rescued.deadline == deadline
