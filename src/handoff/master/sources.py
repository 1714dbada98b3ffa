"""What the master loop waits on: one epoll selector, each fd tagged with its source,
and the protocols of the loop's long-lived sources (the real ones are in system/).

A turn handles what woke the loop in the order of ``Source``: signals first, then the
workers' output (so a worker's last lines are read before its exit is handled), worker
exits before notify messages and probe results, so a worker that died in the same pass is
never counted ready; control clients last.
"""

from __future__ import annotations

import contextlib
import selectors
import signal
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final, Protocol

from handoff.core import events as ev
from handoff.core.model import Pid
from handoff.formats.log_events import EventName, Level
from handoff.master.logs import emit


class Source(Enum):
    """What woke the loop; handled in this order."""

    SIGNALS = auto()
    OUTPUT = auto()  # a worker's stdout and stderr pipe; the master's stderr, backlogged
    WORKER = auto()
    NOTIFY = auto()
    PROBE = auto()
    VERIFY = auto()  # a --verify check exited
    UPGRADE = auto()  # the pre-flight of an upgrade exited
    WARDEN = auto()
    CONTROL = auto()
    CLIENT = auto()
    HEALTH = auto()  # the --health listener and its clients (by fd)
    RESCUE = auto()  # a rescued keep-alive connection, or its relay to the new generation


NO_PID: Final = Pid(0)


@dataclass(frozen=True, slots=True)
class Watch:
    source: Source
    pid: Pid = NO_PID  # the worker's, for WORKER and OUTPUT; the probe's own, for PROBE
    fd: int = -1  # a control client's socket; a worker's output pipe


@dataclass(frozen=True, slots=True)
class Wakeup:
    watch: Watch
    readable: bool
    writable: bool


class SignalSource(Protocol):
    """The signal inbox (system/signals.py): readable when signals arrived."""

    def fileno(self) -> int: ...

    def drain(self) -> list[signal.Signals]: ...


class NotifySource(Protocol):
    """The workers' notify socket (system/worker_notify.py)."""

    @property
    def address(self) -> str: ...

    @property
    def dropped(self) -> int:
        """Datagrams refused (another user's, or without credentials)."""
        ...

    def fileno(self) -> int: ...

    def receive(self) -> list[tuple[Pid, dict[str, str]]]: ...


class Owners(Protocol):
    """Who owns a process (master/system.py's ``System`` is one)."""

    def owning_worker(self, sender: Pid, workers: Collection[Pid]) -> Pid | None: ...


def notified(
    notify: NotifySource, owners: Owners, workers: Collection[Pid]
) -> Iterator[ev.WorkerNotified]:
    """The notify socket is readable: what each message says, as the worker it came from
    (a sender in no worker's process tree is logged and ignored)."""
    for sender, fields in notify.receive():
        worker = owners.owning_worker(sender, workers)
        if worker is None:
            reason = "not in a worker's process tree"
            emit(EventName.NOTIFY_IGNORED, Level.DEBUG, sender=sender, reason=reason)
            continue
        ready = fields.get("READY") == "1"
        yield ev.WorkerNotified(pid=worker, ready=ready, status=fields.get("STATUS"))


class WardenHandle(Protocol):
    """The warden process (system/warden.py): its pidfd is readable if it dies."""

    @property
    def pid(self) -> Pid: ...

    @property
    def pidfd(self) -> int: ...

    @property
    def lifeline(self) -> int:
        """The write end of its pipe: kept open across a re-exec."""
        ...


class Sources:
    """The selector: register what to wait on, wait until something is ready."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()

    def watch(self, fd: int, watch: Watch, *, write: bool = False, read: bool = True) -> None:
        """Wait for fd to be readable (and writable with write); re-watching replaces."""
        events = (selectors.EVENT_READ if read else 0) | (selectors.EVENT_WRITE if write else 0)
        try:
            self._selector.modify(fd, events, watch)
        except KeyError:
            self._selector.register(fd, events, watch)

    def unwatch(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fd)

    def wait(self, timeout: float | None) -> list[Wakeup]:
        """Block until an fd is ready or the timeout passes; in ``Source`` order."""
        ready = self._selector.select(timeout)
        wakeups = [
            Wakeup(key.data, bool(mask & selectors.EVENT_READ), bool(mask & selectors.EVENT_WRITE))
            for key, mask in ready
        ]
        return sorted(wakeups, key=lambda wakeup: wakeup.watch.source.value)

    def close(self) -> None:
        self._selector.close()
