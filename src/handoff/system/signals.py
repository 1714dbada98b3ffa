"""Signals as readable bytes: handlers do nothing, ``set_wakeup_fd`` wakes the selector.

Why not signalfd: it needs the signals blocked in every thread,
and a blocked mask survives fork *and* exec, so every worker would start with SIGTERM
blocked unless each spawn path unblocked it. The wakeup fd keeps dispositions ordinary.
The bytes read back are the signal numbers (asyncio does the same); they are deduplicated
per read because signals are requests, not counters.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import warnings
from collections.abc import Iterator
from types import FrameType
from typing import Final

HANDLED: Final = (
    signal.SIGHUP,
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGCHLD,
    # USR2 (logged as not supported), TTIN/TTOU (scale by one): caught, so that none of
    # them can kill or suspend the master.
    signal.SIGUSR2,
    signal.SIGTTIN,
    signal.SIGTTOU,
)
# Python ignores these at start-up and SIG_IGN survives exec: a worker must get them back.
RESET_IN_CHILD: Final = (*HANDLED, signal.SIGPIPE, signal.SIGXFSZ)


def _ignore(signum: int, frame: FrameType | None) -> None:
    """Do nothing: the C-level handler already wrote the signal number to the wakeup fd."""


class SignalInbox:
    """Installs the master's handlers and exposes the signals that arrived as an fd."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._previous = {sig: signal.signal(sig, _ignore) for sig in HANDLED}
        displaced = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        if displaced != -1:
            warnings.warn(
                f"handoff replaced another signal wakeup fd ({displaced})",
                RuntimeWarning,
                stacklevel=2,
            )

    def fileno(self) -> int:
        return self._reader.fileno()

    def drain(self) -> list[signal.Signals]:
        """Return the signals received since the last call, each once, in arrival order."""
        seen: dict[signal.Signals, None] = {}
        while True:
            try:
                data = self._reader.recv(4096)
            except BlockingIOError:
                break
            if not data:
                break
            for number in data:
                with contextlib.suppress(ValueError):
                    seen[signal.Signals(number)] = None
        return list(seen)

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._reader.close()
        self._writer.close()


@contextlib.contextmanager
def blocked(signals: tuple[signal.Signals, ...] = HANDLED) -> Iterator[None]:
    """Block signals around a fork, so none runs a handler in the child before exec."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def reset_in_child() -> None:
    """In a forked child, before exec: default dispositions, no wakeup fd, nothing blocked."""
    signal.set_wakeup_fd(-1)
    for sig in RESET_IN_CHILD:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
