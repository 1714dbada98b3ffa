"""Waiting on a condition of the outside world (process table, sockets) with a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Re-check condition every 10 ms until it holds; fail after timeout seconds.

    For facts no event announces (a connection accepted, a process gone); everything
    handoff itself reports is waited for through its events instead.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
