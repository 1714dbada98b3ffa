"""Keep-alive rescue (``--rescue-keepalive``): no keep-alive request lost at a reload.

A server that closes its idle keep-alive connections when it starts shutting down races
every client about to reuse one: the client's next request meets a closed connection.
With rescue, just before an old worker's stop signal the master copies the worker's
connections (system/rescue_copies.py), so the worker's close sends no FIN. Then, for
``WINDOW_S`` after the signal, it looks every ``LOOK_S`` which connections the worker let
go of, and judges each from the kernel's counters (formats/rescue_rules.py):

- at a request boundary and idle: held for the client's next request, at most
  ``--rescue-hold`` seconds; a client EOF closes it at once;
- bytes waiting: handed on if they are one plain HTTP/1.x request
  (formats/rescue_request.py), through the listener to the new generation with
  ``Connection: close``, its response relayed once (master/rescue_relay.py);
- anything else, or any doubt: released, the master's copy closed at once, and the client
  sees exactly what it would have seen without rescue.

Connections the worker still holds when the window closes, or when it is killed, are
released the same way. Bounded: at most ``MAX_CONNECTIONS`` copies at once, and at most
``MAX_LOOKS`` lookups per loop turn. docs/rescue.md has the rules and the limits.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from handoff.core import events as ev
from handoff.core.model import MasterState, Pid
from handoff.formats.log_events import EventName, Level
from handoff.formats.options import RunConfig
from handoff.formats.rescue_request import MAX_HEAD, Forwarded, Request, read_request, rewrite
from handoff.formats.rescue_rules import Release, TcpCounters, Verdict, judge
from handoff.master.holdings import Holdings
from handoff.master.logs import emit
from handoff.master.rescue_counts import RescueCounts
from handoff.master.rescue_relay import Relay, Step
from handoff.master.rescue_table import Phase, Rescued, RescueTable
from handoff.master.sources import Source, Sources, Watch
from handoff.system.rescue_copies import (
    FdListings,
    copy_connections,
    read_counters,
    unavailable,
)
from handoff.system.serving_scan import ListenAddresses, listen_addresses
from handoff.system.sockets import listener_inodes

WINDOW_S: Final = 0.5  # after the stop signal: a close later than this is not trusted
LOOK_S: Final = 0.002  # between looks at the connections a worker still holds
MAX_CONNECTIONS: Final = 1024  # copies held at once, all workers together
MAX_LOOKS: Final = 512  # /proc lookups per loop turn
# Rescued sockets served per loop turn; the rest stay ready (level-triggered) for the next
# turn, so signals, worker exits and control clients are never kept waiting behind them.
MAX_WAKEUPS: Final = 256
# A worker that answered after its stop signal and then closed: how long its client may
# take to send again before the last response counts as the end (Verdict.WAIT).
ANSWER_GRACE_S: Final = 0.1


@dataclass(frozen=True, slots=True)
class RescueSettings:
    hold_s: float
    forwarded: Forwarded
    relay_timeout_s: float  # the drain timeout: a rescued request gets as long as any


class Rescue:
    """The master's rescued connections; see the module docstring."""

    def __init__(
        self,
        settings: RescueSettings,
        addresses: ListenAddresses,
        *,
        listener_inodes: frozenset[int],
        sources: Sources,
        clock: Callable[[], float],
        carried: Mapping[str, int],
    ) -> None:
        self._settings = settings
        self._addresses = addresses
        self._listener_inodes = listener_inodes
        self._sources = sources
        self._clock = clock
        self._table = RescueTable(clock)
        self._counts = RescueCounts(carried)
        self._serving: Callable[[], bool] = lambda: True
        self._next_look = 0.0
        self._wakeups = 0  # served in this loop turn
        self._unavailable: str | None = None

    def serving_while(self, serving: Callable[[], bool]) -> None:
        """Hand requests on only while this says a generation serves (not at a stop)."""
        self._serving = serving

    def check_available(self) -> None:
        """Ask the kernel once whether rescue can work here; if not, say so and stay off."""
        self._unavailable = unavailable()
        if self._unavailable is not None:
            emit(
                EventName.RESCUE_UNAVAILABLE,
                Level.WARNING,
                reason=self._unavailable,
                hint="keep-alive connections are not rescued at reloads; run the master as "
                "root or with CAP_SYS_PTRACE, and allow pidfd_getfd (docs/rescue.md)",
            )

    # -- the loop's calls -----------------------------------------------------------------

    def before_signal(self, pid: Pid) -> None:
        """Copy the worker's connections: its stop signal comes next."""
        if self._unavailable:
            return
        started = time.thread_time()
        room = MAX_CONNECTIONS - len(self._table)
        copied = copy_connections(pid, self._addresses, self._listener_inodes, max(room, 0))
        window_ends = self._clock() + WINDOW_S
        for copy in copied.copies:
            fd = copy.sock.fileno()
            self._table.add(Rescued(copy, pid, window_ends, fd))
        fields: dict[str, object] = {"pid": pid, "connections": len(copied.copies)}
        if copied.left:
            fields["left"] = copied.left
        if copied.refused:
            fields["refused"] = copied.refused
        emit(EventName.RESCUE_COPIED, Level.DEBUG, **fields)
        self._counts.copied(pid, len(copied.copies), copied.left)
        self._counts.spent_since(started)

    def exited(self, pid: Pid, event: ev.ChildExited | None) -> ev.ChildExited | None:
        """A worker's exit, on its way to the machine: first judge what it held."""
        # Killed (SIGKILL: the drain timeout, the OOM killer): what it read may be lost.
        # A worker that died of its stop signal (uvicorn raises it again once drained, a
        # server without a handler dies of it) is judged like any other.
        killed = event is not None and event.status.signal == signal.SIGKILL
        self.worker_gone(pid, killed=killed)
        return event

    def worker_gone(self, pid: Pid, *, killed: bool) -> None:
        """The worker exited, or is being killed: judge at once what it held (killed:
        release it all; a killed worker may have read a request it never answered)."""
        started = time.thread_time()
        listings = FdListings()
        for rescued in self._table.watched(pid):
            if killed:
                self._release(rescued, Release.KILLED)
            elif listings.still_held(rescued.copy):  # by a process of its tree
                self._release(rescued, Release.BUSY)
            else:
                self._let_go(rescued)
        self._counts.spent_since(started)

    def next_deadline(self) -> float | None:
        deadline = self._table.next_deadline()
        due = [] if deadline is None else [deadline]
        if self._table.any_watched():
            due.append(self._next_look)
        return min(due) if due else None

    def expire(self, now: float) -> None:
        self._wakeups = 0  # the turn's wakeups are over: the next turn gets a fresh budget
        if not self._table:
            return
        started = time.thread_time()
        if not self._serving():  # the master stops: nothing is handed on any more
            for rescued in self._table:
                if rescued.phase is not Phase.RELAYING:
                    self._release(rescued, Release.STOPPING)
        if self._table.any_watched() and now >= self._next_look:
            self._next_look = now + LOOK_S
            self._look(now)
        for rescued in self._table.due(now):
            if rescued.phase is Phase.HELD:
                self._release(rescued, rescued.on_timeout)
            else:
                assert rescued.relay is not None
                if not rescued.relay.delivered:  # else only the client's EOF was awaited
                    rescued.relay.failure = "timed out"
                self._finish_relay(rescued)
        self._counts.spent_since(started)

    def _look(self, now: float) -> None:
        """Which of the watched connections did their workers let go of? At most
        MAX_LOOKS of them a turn; at its window's end, a connection still held is let go."""
        listings = FdListings()
        looks = MAX_LOOKS
        for rescued in self._table.watched():
            if rescued.let_go:  # only its acknowledgement is awaited: no lookup needed
                self._let_go(rescued)  # at the window's end, still unacknowledged: unsent
                continue
            looked = looks > 0
            looks -= looked
            if looked and not listings.still_held(rescued.copy):
                self._let_go(rescued)
            elif now >= rescued.window_ends:
                self._release(rescued, Release.BUSY)

    def on_ready(self, fd: int, readable: bool, writable: bool) -> None:
        rescued = self._table.waking(fd)
        if rescued is None or self._wakeups >= MAX_WAKEUPS:
            return
        self._wakeups += 1
        started = time.thread_time()
        if rescued.phase is Phase.HELD:
            self._check_request(rescued)
        elif rescued.relay is not None:
            if fd == rescued.fd:
                rescued.relay.on_client(readable, writable)
            else:
                rescued.relay.on_upstream(readable, writable)
            if rescued.relay.step is Step.DONE:
                self._finish_relay(rescued)
            elif rescued.relay.step is Step.LINGERING and not rescued.lingering:
                # Answered: the client's EOF is awaited no longer than a hold.
                rescued.lingering = True
                self._table.set_deadline(rescued, self._settings.hold_s)
        self._counts.spent_since(started)

    def close(self) -> None:
        """At the master's end (or before a re-exec): let go of everything."""
        for rescued in self._table:
            if rescued.relay is not None:
                rescued.relay.close()
            self._release(rescued, Release.STOPPING)
        self._counts.forget()

    def counters(self) -> dict[str, int]:
        return self._counts.counters()

    # -- one connection -------------------------------------------------------------------

    def _let_go(self, rescued: Rescued) -> None:
        """The worker let go of it: judge it, then hold, check or release."""
        after = read_counters(rescued.copy.sock)
        verdict = Release.CLOSED if after is None else judge(rescued.copy.before, after)
        if verdict is Verdict.LOOK_AGAIN:
            rescued.let_go = True
            if self._clock() >= rescued.window_ends:
                self._release(rescued, Release.UNSENT)
            return
        if isinstance(verdict, Release):
            assert after is not None or verdict is Release.CLOSED
            self._release(rescued, verdict, after)
            return
        # Ours alone now: its flags may change.
        rescued.copy.sock.setblocking(False)
        rescued.phase = Phase.HELD
        self._table.unwatch(rescued)
        if verdict is Verdict.WAIT:
            self._table.set_deadline(rescued, ANSWER_GRACE_S)
            rescued.on_timeout = Release.QUIET
        else:
            self._table.set_deadline(rescued, self._settings.hold_s)
        self._counts.taken_over()
        self._sources.watch(rescued.fd, Watch(Source.RESCUE, fd=rescued.fd))
        if verdict is Verdict.CHECK:
            self._check_request(rescued)

    def _check_request(self, rescued: Rescued) -> None:
        """Bytes came on a held connection: hand them on once they are one request."""
        try:
            data = rescued.copy.sock.recv(MAX_HEAD - len(rescued.received))
        except BlockingIOError:
            return
        except OSError:
            self._release(rescued, Release.CLOSED)
            return
        if not data:
            self._release(rescued, Release.CLOSED)
            return
        rescued.received += data
        found = read_request(bytes(rescued.received))
        if isinstance(found, Release):
            self._release(rescued, found)
        elif isinstance(found, Request):
            self._hand_on(rescued, found)

    def _hand_on(self, rescued: Rescued, request: Request) -> None:
        sock = rescued.copy.sock
        if not self._serving():
            self._release(rescued, Release.STOPPING)
            return
        try:
            client = str(sock.getpeername()[0])
        except OSError:
            self._release(rescued, Release.CLOSED)
            return
        # What came after the head is the body's start; anything past the body (a
        # pipelined request) is dropped: the new worker closes after this one.
        body = bytes(rescued.received[request.head_length :][: request.body_length])
        head = rewrite(request, client, self._settings.forwarded) + body
        rescued.received = bytearray()
        rescued.phase = Phase.RELAYING
        self._table.set_deadline(rescued, self._settings.relay_timeout_s)
        try:
            relay = Relay(sock, head, request.body_length - len(body), self._interest)
        except OSError:  # no socket to the new generation (the master is out of fds)
            self._release(rescued, Release.UPSTREAM)
            return
        rescued.relay = relay
        if relay.step is Step.DONE:
            self._finish_relay(rescued)
            return
        self._table.wakes_too(relay.upstream.fileno(), rescued)

    def _interest(self, sock: socket.socket, read: bool, write: bool) -> None:
        fd = sock.fileno()
        if fd < 0:
            return
        if read or write:
            self._sources.watch(fd, Watch(Source.RESCUE, fd=fd), read=read, write=write)
            return
        self._sources.unwatch(fd)
        owner = self._table.waking(fd)
        if owner is not None and owner.relay is not None and owner.relay.upstream is sock:
            self._table.quiet(fd, owner)

    def _finish_relay(self, rescued: Rescued) -> None:
        relay = rescued.relay
        assert relay is not None
        self._table.forget(rescued)
        relay.close()
        if relay.delivered:
            self._counts.handed(rescued.worker)
        else:
            self._counts.released(rescued.worker, Release.UPSTREAM)

    def _release(self, rescued: Rescued, why: Release, after: TcpCounters | None = None) -> None:
        """Let go of it: the master's copy closed, the client sees what it would have."""
        if rescued.copy.sock.fileno() >= 0:
            self._sources.unwatch(rescued.fd)
        self._table.forget(rescued)
        rescued.copy.sock.close()
        self._counts.released(rescued.worker, why)
        fields: dict[str, object] = {"pid": rescued.worker, "reason": str(why)}
        if rescued.received:
            fields["start"] = bytes(rescued.received[:16]).decode("ascii", "backslashreplace")
        if after is not None:  # what the rules saw: the counters since the copy
            before = rescued.copy.before
            fields.update(
                wrote=after.written - before.written,
                read=after.consumed - before.consumed,
                inq=after.inq,
                last_sent_ms=after.last_data_sent_ms,
                last_received_ms=after.last_data_recv_ms,
            )
        emit(EventName.RESCUE_RELEASED, Level.DEBUG, **fields)


class MachineState(Protocol):
    @property
    def state(self) -> MasterState: ...


def open_rescue(
    config: RunConfig,
    holdings: Holdings,
    sources: Sources,
    clock: Callable[[], float],
    machine: MachineState,
) -> Rescue:
    """The loop's rescue: idle unless --rescue-keepalive (and the kernel allows it)."""
    socks = [listener.sock for listener in holdings.listeners]
    carried = holdings.carried.counters if holdings.carried is not None else {}
    settings = RescueSettings(
        hold_s=config.rescue.hold_s,
        forwarded=config.rescue.forwarded,
        relay_timeout_s=config.timeouts.drain_s,
    )
    rescue = Rescue(
        settings,
        listen_addresses(socks),
        listener_inodes=frozenset(listener_inodes(holdings.listeners)),
        sources=sources,
        clock=clock,
        carried=carried,
    )
    rescue.serving_while(lambda: machine.state is not MasterState.STOPPING)
    if config.rescue.enabled:
        rescue.check_available()
    return rescue
