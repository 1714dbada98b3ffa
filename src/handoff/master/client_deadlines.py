"""The time bounds the master's own servers (control, health) put on their clients.

Each client has until its deadline to send its request: the deadlines are a heap, whose
entries for clients gone (or replaced by a newer client on the same fd) are skipped. And
accept() failing for want of a resource (EMFILE...) leaves the listening socket readable:
the listener is set aside until a client leaves or ``ACCEPT_PAUSE_S`` has passed, instead
of waking the loop again and again.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Container
from typing import Final

ACCEPT_PAUSE_S: Final = 1.0


class ClientDeadlines:
    """Request deadlines by client fd, and the listener's pause."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int]] = []
        self.paused_until: float | None = None

    def admit(self, deadline: float, fd: int) -> None:
        heapq.heappush(self._heap, (deadline, fd))

    def next_deadline(self, live: Container[int]) -> float | None:
        """The earliest deadline of a live client, or the pause's end."""
        while self._heap and self._heap[0][1] not in live:
            heapq.heappop(self._heap)
        due = [self._heap[0][0]] if self._heap else []
        if self.paused_until is not None:
            due.append(self.paused_until)
        return min(due, default=None)

    def due(self, now: float) -> list[int]:
        """The fds whose deadline has passed (each client's own deadline decides: the fd
        may belong to a newer client by now)."""
        fds = []
        while self._heap and self._heap[0][0] <= now:
            fds.append(heapq.heappop(self._heap)[1])
        return fds

    def pause(self) -> None:
        """accept() failed: set the listener aside for a while."""
        self.paused_until = self._clock() + ACCEPT_PAUSE_S

    def pause_over(self, now: float) -> bool:
        return self.paused_until is not None and self.paused_until <= now
