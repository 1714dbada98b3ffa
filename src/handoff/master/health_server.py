"""The health endpoint (``--health``): /livez and /readyz over HTTP/1.x, served by the
master's own event loop.

One request per connection, answered and closed. Every client is bounded like the
control socket's (8 KiB of request head, 5 s to send it, 64 clients at once), sockets
are non-blocking and answers are a few hundred bytes, so a slow, hostile or vanished
client never blocks the loop. docs/health.md is the contract.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from handoff.core import actions as act
from handoff.core.model import GenerationState, MasterState
from handoff.errors import HandoffError
from handoff.formats.http_request import (
    MAX_HEAD,
    BadHttpRequest,
    Request,
    parse_head,
    response,
    text_response,
)
from handoff.formats.log_events import EventName, Level
from handoff.formats.options import BindSpec, RunConfig
from handoff.master.client_deadlines import ClientDeadlines
from handoff.master.holdings import Holdings
from handoff.master.logs import emit
from handoff.master.metrics import AVAILABLE, MISSING_HINT, EventCounts, MetricsView, render
from handoff.master.sources import Source, Sources, Watch
from handoff.system.sockets import Listener, close_listeners, open_listeners, socket_address

MAX_CLIENTS: Final = 64
REQUEST_DEADLINE_S: Final = 5.0
LEAVING: Final = "leaving: shutdown delay, the master stops soon"  # --shutdown-delay
PATHS: Final = "/livez, /readyz, /metrics"


class HealthMaster(Protocol):
    """The loop, as the endpoint needs it."""

    @property
    def view(self) -> HealthView: ...

    def counters(self) -> dict[str, int]: ...


class HealthView(MetricsView, Protocol):
    """What the endpoint reads of the machine (``Supervisor`` is one): what /metrics
    reads, and why the master stops."""

    @property
    def stop_reason(self) -> str: ...


def not_ready(view: HealthView) -> str | None:
    """Why /readyz answers 503 (one line), or None: a generation serves and the master is
    not stopping (a reload in progress keeps the generation that serves ready)."""
    if view.state is MasterState.LEAVING:
        return LEAVING
    if view.state is MasterState.STOPPING:
        return f"stopping: {view.stop_reason or 'the master is shutting down'}"
    serving = any(gen.state is GenerationState.ACTIVE for gen in view.generations.values())
    if not serving:
        return "starting: no generation is ready yet"
    return None


Scrape = Callable[[], tuple[bytes, str]]  # /metrics: (body, content type)


def answer(request: Request, view: HealthView, scrape: Scrape | None = None) -> bytes:
    """The response to a parsed request; scrape: None without prometheus_client."""
    head_only = request.head_only
    match request.path:
        case "/metrics" if scrape is not None:
            try:
                body, content_type = scrape()
            except Exception as exc:  # a scrape must never take the master down
                line = f"metrics failed: {type(exc).__name__}: {str(exc)[:200]}"
                return text_response(500, line, head_only=head_only)
            return response(200, body, head_only=head_only, content_type=content_type)
        case "/metrics":
            return text_response(404, f"no metrics; hint: {MISSING_HINT}", head_only=head_only)
        case "/livez":
            return text_response(200, "live", head_only=head_only)
        case "/readyz":
            reason = not_ready(view)
            if reason is None:
                return text_response(200, "ready", head_only=head_only)
            return text_response(503, f"not ready: {reason}", head_only=head_only)
        case _:
            line = f"no such path: {request.path[:64]!r}; hint: the paths are {PATHS}"
            return text_response(404, line, head_only=head_only)


@dataclass(slots=True)
class _Client:
    sock: socket.socket
    deadline: float
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytes = b""


class HealthServer:
    """Owns the --health listener and its clients; disabled (does nothing) without one."""

    def __init__(
        self,
        listener: Listener | None,
        *,
        sources: Sources,
        clock: Callable[[], float],
        master: HealthMaster,
        counts: EventCounts,
        scrape: Scrape | None = None,
    ) -> None:
        self._listener = listener
        self._sources = sources
        self._clock = clock
        self._master = master
        self.counts = counts
        self._scrape = scrape
        self._clients: dict[int, _Client] = {}
        self._deadlines = ClientDeadlines(clock)
        self.served = 0  # answers sent, for tests and status
        if listener is not None:
            listener.sock.setblocking(False)
            self.listen()

    @property
    def address(self) -> str | None:
        return None if self._listener is None else self._listener.address

    def listen(self) -> None:
        if self._listener is not None:
            self._deadlines.paused_until = None
            fd = self._listener.sock.fileno()
            self._sources.watch(fd, Watch(Source.HEALTH, fd=fd))

    # -- Timed -------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self._deadlines.next_deadline(self._clients)

    def expire(self, now: float) -> None:
        if self._deadlines.pause_over(now):
            self.listen()
        for fd in self._deadlines.due(now):
            client = self._clients.get(fd)
            if client is None or client.deadline > now:
                continue  # the fd belongs to a newer client by now
            if not client.outbox:
                line = f"no complete request within {REQUEST_DEADLINE_S:g} s"
                self._reply(fd, client, text_response(408, line))
            if self._clients.get(fd) is client:
                self._drop(fd)  # it does not read its answer: cut, whatever is left unsent

    # -- readiness ---------------------------------------------------------------------

    def on_ready(self, fd: int, readable: bool, writable: bool) -> None:
        if self._listener is not None and fd == self._listener.sock.fileno():
            self._accept(self._listener.sock)
            return
        client = self._clients.get(fd)
        if client is None:
            return
        if writable:
            self._flush(fd, client)
        elif readable:
            self._read(fd, client)

    def _accept(self, listening: socket.socket) -> None:
        while True:
            try:
                sock, _ = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the client waits in the queue
                self._sources.unwatch(listening.fileno())
                self._deadlines.pause()
                emit(EventName.HEALTH_REFUSED, Level.WARNING, reason=f"accept: {exc.strerror}")
                return
            sock.setblocking(False)
            fd = sock.fileno()
            client = _Client(sock, self._clock() + REQUEST_DEADLINE_S)
            self._clients[fd] = client
            self._deadlines.admit(client.deadline, fd)  # every client, the refused too
            if len(self._clients) > MAX_CLIENTS:
                line = f"too many health clients (at most {MAX_CLIENTS}); try again"
                self._reply(fd, client, text_response(503, line))
                continue
            self._sources.watch(fd, Watch(Source.HEALTH, fd=fd))

    def _read(self, fd: int, client: _Client) -> None:
        if client.outbox:
            return
        try:
            data = client.sock.recv(MAX_HEAD + 1 - len(client.inbox))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(fd)
            return
        if not data:
            self._drop(fd)
            return
        client.inbox += data
        try:
            request = parse_head(bytes(client.inbox))
        except BadHttpRequest as exc:
            self._reply(fd, client, text_response(exc.status, exc.message))
            return
        if request is not None:
            self._reply(fd, client, answer(request, self._master.view, self._scrape))

    def _reply(self, fd: int, client: _Client, data: bytes) -> None:
        client.outbox = data
        self.served += 1
        self._flush(fd, client)

    def _flush(self, fd: int, client: _Client) -> None:
        try:
            sent = client.sock.send(client.outbox)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(fd)
            return
        client.outbox = client.outbox[sent:]
        if not client.outbox:
            self._drop(fd)
        else:  # a full send buffer: the deadline still bounds it
            self._sources.watch(fd, Watch(Source.HEALTH, fd=fd), write=True)

    def _drop(self, fd: int) -> None:
        client = self._clients.pop(fd, None)
        if client is None:
            return
        self._sources.unwatch(fd)
        with contextlib.suppress(OSError):
            client.sock.shutdown(socket.SHUT_WR)  # the answer first, then the end
        client.sock.close()
        if self._deadlines.paused_until is not None:
            self.listen()  # an fd is free again

    def on_report(self, report: act.Report) -> None:
        self.counts.on_report(report)

    def close(self) -> None:
        for fd in list(self._clients):
            self._drop(fd)
        if self._listener is not None:
            self._sources.unwatch(self._listener.sock.fileno())
            close_listeners([self._listener])
            self._listener = None


def open_health(
    config: RunConfig,
    holdings: Holdings,
    sources: Sources,
    clock: Callable[[], float],
    master: HealthMaster,
) -> HealthServer:
    """Bind --health, or take back the socket a re-exec in place kept open (not one
    connection is refused meanwhile: they wait in its queue). A failure to bind at start
    is the operator's to fix (exit 1); after a re-exec it is logged, and the workers
    serve on without the endpoint."""
    listener = None
    if config.health is not None and holdings.health_socket is not None:
        listener = _kept(config.health, holdings.health_socket)
    elif holdings.health_socket is not None:
        holdings.health_socket.close()  # not asked for any more
    elif config.health is not None:
        try:
            listener = open_listeners((config.health,), MAX_CLIENTS)[0]
        except HandoffError as exc:
            if holdings.carried is None:
                raise
            emit(EventName.HEALTH_REFUSED, Level.ERROR, reason=exc.message)
        else:
            emit(EventName.HEALTH_LISTENING, address=listener.address, port=listener.port)
    holdings.health_listener = listener  # handed over at a re-exec
    carried = holdings.carried.counters if holdings.carried is not None else {}
    counts = EventCounts(holdings.metric_counts, carried)
    listeners = holdings.listeners

    def scrape() -> tuple[bytes, str]:
        return render(master.view, counts, master.counters(), listeners)

    return HealthServer(
        listener,
        sources=sources,
        clock=clock,
        master=master,
        counts=counts,
        scrape=scrape if AVAILABLE else None,
    )


def _kept(spec: BindSpec, sock: socket.socket) -> Listener:
    """The --health socket a re-exec kept open, as a listener."""
    sock.setblocking(False)
    path = spec.path if sock.family == socket.AF_UNIX else None
    return Listener(
        spec=spec, sock=sock, address=socket_address(sock), name="health", created_path=path
    )
