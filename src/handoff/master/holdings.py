"""What the master holds for its whole life, across re-execs in place.

The listening sockets, the workers' notify socket, the warden (its lifeline), the
control socket when a re-exec kept it, the workers' fd limit, each generation's
``--env-file`` values and release directory, the workers' output pipes
(``open_output``), the failpoints still armed, and what a previous exec carried over
(``Carried``). ``capture`` turns them, with
the machine's snapshot, into the ``ResumeState`` the next exec takes over from.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from handoff.core.model import GenId, Pid
from handoff.core.snapshot import MachineSnapshot
from handoff.formats.options import RunConfig
from handoff.master.failpoints import Failpoints
from handoff.master.logs import LineWriter
from handoff.master.resume_state import (
    ClientRecord,
    LastWords,
    ListenerRecord,
    OutputRecord,
    ResumeState,
    this_version,
)
from handoff.master.sources import NotifySource, Sources, WardenHandle
from handoff.master.status import add_counters
from handoff.master.worker_output import WorkerOutput
from handoff.master.worker_output import build as build_output
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
    outputs: tuple[OutputRecord, ...] = ()  # the workers' output pipes
    last_failure: LastWords | None = None  # the last failed reload's worker output


@dataclass(slots=True, kw_only=True)
class Holdings:
    listeners: Sequence[Listener]
    notify: NotifySource
    warden: WardenHandle
    relay: OutputRelay | None = None
    worker_fd_limit: int | None = None
    control_socket: socket.socket | None = None
    health_socket: socket.socket | None = None  # --health's, kept by a re-exec
    health_listener: Listener | None = None  # --health's, bound (master/health_server.py)
    failpoints: Failpoints = field(default_factory=Failpoints)
    carried: Carried | None = None  # None: a fresh start
    # gen -> the --env-file values it started with, the release directory it runs in
    # (master/generation_setup.py fills and prunes them)
    generation_env: dict[GenId, dict[str, str]] = field(default_factory=dict)
    generation_dirs: dict[GenId, str] = field(default_factory=dict)
    output: WorkerOutput | None = None  # the workers' output pipes: open_output
    metric_counts: dict[str, int] = field(default_factory=dict)  # master/metrics.py
    dropped_connections: int = 0  # left queued when a stop closed the listeners early

    def open_output(
        self,
        config: RunConfig,
        sources: Sources,
        log: LineWriter | None,
        environ: Mapping[str, str],
    ) -> WorkerOutput:
        """The workers' output (master/worker_output.py), with the pipes a re-exec handed
        over; kept here to be handed over again."""
        carried = self.carried
        self.output = build_output(
            config,
            sources,
            log,
            environ,
            relay=self.relay,
            handed=carried.outputs if carried else (),
            last_failure=carried.last_failure if carried else None,
        )
        return self.output

    def helper_pids(self) -> list[Pid]:
        """The master's helper children besides the warden (the output relay): not strays."""
        return [] if self.relay is None else [Pid(self.relay.pid)]

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
            health_fd=None if self.health_listener is None else self.health_listener.fileno(),
            clients=() if control is None else control[1],
            machine=machine,
            started_at=started_at,
            worker_fd_limit=self.worker_fd_limit,
            crashes=(carried.crashes if carried else ()) if crashes is None else crashes,
            failpoints=self.failpoints.spec(),
            counters={
                **counters,
                **self.metric_counts,
                "reexecs": counters.get("reexecs", 0) + 1,
            },
            generation_env={str(gen): dict(env) for gen, env in self.generation_env.items()},
            generation_dirs={str(gen): path for gen, path in self.generation_dirs.items()},
            outputs=self.output.records() if self.output is not None else (),
            last_failure=self.output.last_failure if self.output is not None else None,
        )
