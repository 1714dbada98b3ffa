"""What the master holds for its whole life, across re-execs in place.

The listening sockets, the workers' notify socket, the warden (its lifeline), the
control socket when a re-exec kept it, the workers' fd limit, the failpoints still
armed, and what a previous exec carried over (``Carried``). ``capture`` turns them, with
the machine's snapshot, into the ``ResumeState`` the next exec takes over from.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from handoff.core.snapshot import MachineSnapshot
from handoff.master.failpoints import Failpoints
from handoff.master.resume_state import ClientRecord, ListenerRecord, ResumeState, this_version
from handoff.master.sources import NotifySource, WardenHandle
from handoff.master.status import add_counters
from handoff.system.output_relay import OutputRelay
from handoff.system.sockets import Listener


@dataclass(frozen=True, slots=True, kw_only=True)
class Carried:
    """What a master that re-executed keeps from before: when it started, its control
    clients still waiting, its recent crashes, its counters, the version it was."""

    started_at: float
    clients: tuple[ClientRecord, ...] = ()
    crashes: tuple[float, ...] = ()
    counters: Mapping[str, int] = field(default_factory=dict)
    version: str = ""


@dataclass(slots=True, kw_only=True)
class Holdings:
    listeners: Sequence[Listener]
    notify: NotifySource
    warden: WardenHandle
    relay: OutputRelay | None = None
    worker_fd_limit: int | None = None
    control_socket: socket.socket | None = None
    failpoints: Failpoints = field(default_factory=Failpoints)
    carried: Carried | None = None  # None: a fresh start

    def counters(self, log_lines_dropped: int) -> dict[str, int]:
        """What status counts: this master's own, the relay's, and what was carried."""
        relay_dropped = self.relay.dropped() if self.relay is not None else 0
        return add_counters(
            self.carried.counters if self.carried is not None else {},
            log_lines_dropped=log_lines_dropped + relay_dropped,
            notify_datagrams_dropped=self.notify.dropped,
        )

    def capture(
        self,
        reason: str,
        *,
        machine: MachineSnapshot | None,
        control: tuple[int, tuple[ClientRecord, ...]] | None,
        started_at: float,
        counters: Mapping[str, int],
        crashes: tuple[float, ...] | None = None,
    ) -> ResumeState:
        """The state to hand over; control: the control socket's fd and waiting clients."""
        carried = self.carried
        return ResumeState(
            reason=reason,
            version=this_version(),
            listeners=tuple(ListenerRecord.of(listener) for listener in self.listeners),
            notify_fd=self.notify.fileno(),
            notify_address=self.notify.address,
            warden_pid=self.warden.pid,
            warden_lifeline=self.warden.lifeline,
            relay=None
            if self.relay is None
            else (self.relay.pid, self.relay.counter, *self.relay.originals),
            control_fd=None if control is None else control[0],
            clients=() if control is None else control[1],
            machine=machine,
            started_at=started_at,
            worker_fd_limit=self.worker_fd_limit,
            crashes=(carried.crashes if carried else ()) if crashes is None else crashes,
            failpoints=self.failpoints.spec(),
            counters={**counters, "reexecs": counters.get("reexecs", 0) + 1},
        )
