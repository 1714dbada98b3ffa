"""What the master tells systemd: state changes, STATUS=, watchdog keep-alives, the fd store.

Only when systemd gave the master a NOTIFY_SOCKET (workers never see it). READY=1 once
the first generation serves; RELOADING=1 with MONOTONIC_USEC when a reload starts and
READY=1 when it ends (succeeded or failed: the reload cycle always closes); STOPPING=1;
and STATUS= always saying what serves and how the last reload ended, read from the
machine's state. Keep-alives are sent from the loop itself, so a stuck loop stops them
and systemd notices. ``messages_for`` and ``status_text`` are pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from handoff.core import actions as act
from handoff.core.machine import Supervisor
from handoff.core.model import GenerationState, MasterState
from handoff.formats.log_events import EventName
from handoff.formats.options import BindKind
from handoff.formats.worker_contract import FDSTORE_PREFIX
from handoff.master.logs import emit
from handoff.system.sockets import Listener
from handoff.system.systemd_notify import (
    FD_STORE_WAIT_S,
    STATE_CHANGE_WAIT_S,
    SystemdNotifier,
    monotonic_usec,
    watchdog_interval,
)
from handoff.system.systemd_sockets import store_name


def status_text(machine: Supervisor) -> str:
    """STATUS=: what serves now, and how the last reload ended."""
    active = machine.generation_in(GenerationState.ACTIVE)
    if active is None:
        serving = "no generation serving"
    else:
        serving = (
            f"generation {active.id} serving, {active.ready_count()} of {active.size} workers ready"
        )
    if machine.state is MasterState.LEAVING:
        return f"leaving (shutdown delay, then drain): {serving}"
    parked = machine.generation_in(GenerationState.PARKED)
    if parked is not None:
        serving += f"; generation {parked.id} parked for a rollback"
    starting = machine.generation_in(GenerationState.STARTING)
    if starting is not None and starting.canary:
        serving += f"; canary generation {starting.id}: {starting.ready_count()} ready"
    last = machine.last_reload
    if last is None:
        return serving
    if last.ok:
        return f"{serving}; last reload: generation {last.gen} ok in {last.duration_s:g} s"
    return f"{serving}; last reload failed: {last.reason}"


def messages_for(event: EventName, monotonic_usec: int) -> dict[str, str] | None:
    """The state change to announce for a report, or None (STATUS is added by the caller)."""
    match event:
        case EventName.MASTER_READY | EventName.RELOAD_SUCCEEDED | EventName.RELOAD_FAILED:
            return {"READY": "1"}
        case EventName.RELOAD_REQUESTED:
            return {"RELOADING": "1", "MONOTONIC_USEC": str(monotonic_usec)}
        case EventName.MASTER_STOPPING | EventName.MASTER_LEAVING:
            return {"STOPPING": "1"}
        case (
            EventName.GENERATION_ACTIVE
            | EventName.GENERATION_GONE
            | EventName.WORKER_EXITED
            | EventName.WORKER_READY
            | EventName.MASTER_SCALED
        ):
            return {}  # nothing changes state, but STATUS= does
        case _:
            return None


class SystemdGlue:
    """The master's side of sd_notify while it runs; inert without NOTIFY_SOCKET."""

    def __init__(self, environ: Mapping[str, str], machine: Supervisor, now: float) -> None:
        self._notifier = SystemdNotifier.from_environment(environ)
        self._machine = machine
        self._watchdog_every = watchdog_interval(environ) if self._notifier else None
        self._watchdog_next = now if self._watchdog_every else None

    def next_deadline(self) -> float | None:
        """When the next watchdog keep-alive is due."""
        return self._watchdog_next

    def on_report(self, report: act.Report) -> None:
        if self._notifier is None:
            return
        message = messages_for(report.event, monotonic_usec())
        if message is not None:
            # A state change may wait a moment for room in systemd's queue; a STATUS=
            # alone is dropped at once (the next one says it again).
            wait_s = STATE_CHANGE_WAIT_S if message else 0.0
            self._notifier.send({**message, "STATUS": status_text(self._machine)}, wait_s=wait_s)

    def expire(self, now: float) -> None:
        """Send the watchdog keep-alive if it is due."""
        if self._notifier is None or self._watchdog_next is None or self._watchdog_every is None:
            return
        if now >= self._watchdog_next:
            self._notifier.send({"WATCHDOG": "1"})
            self._watchdog_next = now + self._watchdog_every

    def close(self) -> None:
        if self._notifier is not None:
            self._notifier.close()


def sync_fd_store(
    environ: Mapping[str, str], listeners: Sequence[Listener], unused: Sequence[str]
) -> None:
    """Under systemd, keep a copy of each listener we bound in its fd store, and drop
    the stored sockets that no --bind uses any more (their port closes).

    A crashed or restarted master then gets the same sockets back (with
    FileDescriptorStoreMax= > 0 in the unit): the port never closes, and a unix socket's
    file is never removed. Sockets a .socket unit passed are systemd's already.
    """
    notifier = SystemdNotifier.from_environment(environ)
    if notifier is None:
        return
    try:
        for name in unused:
            if name.startswith(FDSTORE_PREFIX):
                notifier.send({"FDSTOREREMOVE": "1", "FDNAME": name}, wait_s=FD_STORE_WAIT_S)
        for listener in listeners:
            if listener.spec.name and not listener.spec.name.startswith(FDSTORE_PREFIX):
                continue
            name = store_name(listener.spec)
            if listener.spec.kind is not BindKind.FD:
                # Bound anew: a socket stored under this name before (its file since
                # removed) must not come back next time instead of this one.
                notifier.send({"FDSTOREREMOVE": "1", "FDNAME": name}, wait_s=FD_STORE_WAIT_S)
            if notifier.store_fd(listener.fileno(), name):
                # The stored socket outlives this master and is served again through its
                # path after a restart: the file must stay. After a stop, the next
                # start finds it refusing connections and replaces it (stale).
                listener.created_path = None
                listener.stored = True
                emit(EventName.LISTENER_STORED, address=listener.address, name=name)
    finally:
        notifier.close()
