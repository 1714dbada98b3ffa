"""The control socket: served by the master's own event loop, one request per connection.

A unix stream socket, mode 0600 (0660 with a control group); every
client is checked with SO_PEERCRED. Sockets are non-blocking and every client is bounded
(64 KiB in, 1 MiB out, 5 s to send its request, 64 clients), so a client that sends
garbage, stalls or vanishes costs the master nothing. Requests become events for the
machine; what the machine reports is streamed back to clients waiting for a reload.
docs/control.md is the contract.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Protocol, assert_never

from handoff.core import actions as act
from handoff.core import events as ev
from handoff.core.model import MasterState
from handoff.formats.control_protocol import (
    MAX_LINE,
    BadRequest,
    Command,
    Request,
    encode,
    error_line,
    parse_request,
)
from handoff.formats.log_events import EventName, Level
from handoff.formats.options import RunConfig
from handoff.master.client_deadlines import ClientDeadlines
from handoff.master.control_answers import Answers, MasterView
from handoff.master.control_clients import Client
from handoff.master.health_server import not_ready
from handoff.master.holdings import Holdings
from handoff.master.logs import emit
from handoff.master.resume_state import ClientRecord
from handoff.master.sources import Source, Sources, Watch
from handoff.system.runtime_files import FileId, close_unix_socket
from handoff.system.sockets import bind_control_socket, peer_credentials, peer_groups

MAX_CLIENTS: Final = 64
MAX_OUTPUT: Final = 1 << 20
REQUEST_DEADLINE_S: Final = 5.0


class ControlledMaster(Protocol):
    """The loop, as the control server needs it."""

    @property
    def view(self) -> MasterView: ...

    def submit(self, event: ev.Event) -> list[act.Report]:
        """Feed the machine; return the reports it answered this event with."""
        ...

    def status(self) -> Mapping[str, object]: ...

    def upgrade(self, source: str) -> str | None:
        """Start an upgrade; the reason it was refused, or None."""
        ...


def open_control(
    config: RunConfig,
    holdings: Holdings,
    master: ControlledMaster,
    sources: Sources,
    clock: Callable[[], float],
) -> ControlServer | None:
    """The control socket (--control), listening: the one a re-executed master kept, else
    bound now; None without a path."""
    if config.control_path is None:
        return None
    control = ControlServer(
        config.control_path,
        group=config.control_group,
        master=master,
        sources=sources,
        clock=clock,
        listening=holdings.control_socket,
    )
    control.listen()
    if holdings.control_socket is None:
        emit(EventName.CONTROL_LISTENING, path=config.control_path)
    return control


class ControlServer:
    """Owns the control socket and its clients; the loop forwards readiness and reports."""

    def __init__(
        self,
        path: str,
        *,
        group: int | None,
        master: ControlledMaster,
        sources: Sources,
        clock: Callable[[], float],
        listening: socket.socket | None = None,
    ) -> None:
        """listening: the control socket a re-executed master kept open; else bind path."""
        self.path = path
        self._group = group
        self._master = master
        self._sources = sources
        self._clock = clock
        self._clients: dict[int, Client] = {}
        self._deadlines = ClientDeadlines(clock)
        self._answers = Answers(lambda: master.view, self._send, self._finish)
        self._file: FileId | None = None  # after a re-exec: the kernel is asked at close
        if listening is not None:
            self._sock = listening
            self._sock.setblocking(False)
            return
        self._sock, self._file = bind_control_socket(path, group, MAX_CLIENTS)

    def fileno(self) -> int:
        return self._sock.fileno()

    # -- loop interface ----------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self._deadlines.next_deadline(self._clients)

    def listen(self) -> None:
        self._deadlines.paused_until = None
        self._sources.watch(self._sock.fileno(), Watch(Source.CONTROL))

    def expire(self, now: float) -> None:
        """Take the listener back; cut clients that did not send their request in time."""
        if self._deadlines.pause_over(now):
            self.listen()
        for fd in self._deadlines.due(now):
            client = self._clients.get(fd)
            if client is not None and not client.answered and client.deadline <= now:
                self._fail(fd, client, f"no request within {REQUEST_DEADLINE_S:g} s")

    def on_listener(self) -> None:
        while True:
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the client waits in the queue
                self._sources.unwatch(self._sock.fileno())
                self._deadlines.pause()
                emit(EventName.CONTROL_REFUSED, Level.WARNING, reason=f"accept: {exc.strerror}")
                return
            sock.setblocking(False)
            fd = sock.fileno()
            client = Client(sock, self._clock() + REQUEST_DEADLINE_S)
            self._clients[fd] = client
            self._watch(fd, write=False)
            if len(self._clients) > MAX_CLIENTS:
                self._fail(fd, client, f"too many control clients (at most {MAX_CLIENTS})")
            elif not _allowed(sock, self._group):
                emit(EventName.CONTROL_REFUSED, Level.WARNING, reason="permission denied")
                self._fail(fd, client, "permission denied", "run as the master's user or root")
            else:
                self._deadlines.admit(client.deadline, fd)

    def on_client(self, fd: int, readable: bool, writable: bool) -> None:
        client = self._clients.get(fd)
        if client is None:
            return
        if writable:
            self._flush(fd, client)
        if readable and fd in self._clients:
            self._read(fd, client)

    def on_report(self, report: act.Report) -> None:
        """Route progress and results to the clients waiting for them."""
        self._answers.on_report(report)

    def handover(self) -> tuple[int, tuple[ClientRecord, ...]]:
        """The listening socket and the waiting clients, to hand over across a re-exec."""
        return self.fileno(), tuple(self.waiting_clients())

    def waiting_clients(self) -> list[ClientRecord]:
        """The clients waiting for a result, to hand over across a re-exec."""
        return self._answers.waiting.records()

    def adopt_clients(self, records: Sequence[ClientRecord]) -> None:
        """Take back the waiting clients a re-exec handed over, once the machine has taken
        over: a reload that ended meanwhile is answered now, one that did not survive the
        re-exec is answered as interrupted."""
        for record in records:
            try:
                sock = socket.socket(fileno=record.fd)
                sock.setblocking(False)
                sock.set_inheritable(False)
            except OSError:
                continue
            client = Client(sock, deadline=float("inf"), answered=True)
            self._clients[record.fd] = client
            self._watch(record.fd, write=False)
            self._answers.place(client, record)

    def upgrade_finished(self, **fields: object) -> None:
        """Answer the clients waiting for the upgrade (fields: ok, and what else to say)."""
        self._answers.upgrade_finished(pid=os.getpid(), **fields)

    def close(self) -> None:
        for fd, client in list(self._clients.items()):
            if not client.closing:
                with contextlib.suppress(OSError):
                    client.sock.send(error_line("the master exited"))
            self._drop(fd)
        self._sources.unwatch(self._sock.fileno())
        close_unix_socket(self._sock, self.path, self._file)  # a successor's file stays

    # -- requests ----------------------------------------------------------------------

    def _read(self, fd: int, client: Client) -> None:
        try:
            data = client.sock.recv(MAX_LINE + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(fd)
            return
        if not data:
            self._drop(fd)  # the client went away (mid-request or while waiting)
            return
        if client.answered:
            return  # one request per connection: later bytes are ignored
        client.inbox += data
        line, newline, _ = client.inbox.partition(b"\n")
        if not newline:
            if len(client.inbox) > MAX_LINE:
                self._fail(fd, client, f"request line longer than {MAX_LINE} bytes")
            return
        client.answered = True
        try:
            request = parse_request(bytes(line))
        except BadRequest as exc:
            self._fail(fd, client, exc.message, exc.hint)
            return
        self._dispatch(fd, client, request)

    def _dispatch(self, fd: int, client: Client, request: Request) -> None:
        match request.command:
            case Command.STATUS:
                self._finish(client, encode("result", ok=True, status=self._master.status()))
            case Command.PROBE:  # what /livez and /readyz would answer (health_server.py)
                reason = not_ready(self._master.view)
                self._finish(client, encode("result", ok=True, ready=reason is None, reason=reason))
            case Command.STOP:
                self._master.submit(ev.StopRequested(fast=False, source="control"))
                self._finish(client, encode("result", ok=True, pid=os.getpid()))
            case Command.SCALE:
                was = self._master.view.workers_target
                answer = self._master.submit(
                    ev.ScaleRequested(source="control", workers=request.workers)
                )
                if any(report.event is EventName.SCALE_REFUSED for report in answer):
                    self._fail(fd, client, "the master is stopping")
                else:
                    workers = self._master.view.workers_target
                    self._finish(client, encode("result", ok=True, workers=workers, was=was))
            case Command.RELOAD:
                self._reload(
                    fd, client, wait=request.wait, verify=request.verify, canary=request.canary
                )
            case Command.ROLLBACK:
                # Every action of the switch runs inside submit: its time is the switch's.
                began = time.perf_counter()
                answer = self._master.submit(ev.RollbackRequested(source="control"))
                switch_ms = round((time.perf_counter() - began) * 1000, 3)
                self._answers.rollback(client, answer, wait=request.wait, switch_ms=switch_ms)
            case Command.PROMOTE:
                answer = self._master.submit(ev.PromoteRequested(source="control"))
                self._answers.promote(client, answer, wait=request.wait)
            case Command.UPGRADE:
                reason = self._master.upgrade("control")
                if reason is not None:
                    self._fail(fd, client, reason)
                elif request.wait:
                    self._answers.waiting.upgrades.append(client)
                else:
                    self._finish(client, encode("result", ok=True, accepted="started"))
            case _:
                assert_never(request.command)

    def _reload(self, fd: int, client: Client, *, wait: bool, verify: bool, canary: int) -> None:
        if self._master.view.state in (MasterState.STOPPING, MasterState.LEAVING):
            self._fail(fd, client, "the master is stopping", "a stopping master does not reload")
            return
        client.verify = verify
        if wait:
            self._answers.waiting.next_reload.append(client)
        answer = self._master.submit(ev.ReloadRequested(source="control", canary=canary))
        self._answers.reload(client, answer, wait=wait)

    # -- output and teardown -----------------------------------------------------------

    def _send(self, client: Client, line: bytes) -> None:
        fd = client.sock.fileno()
        if fd not in self._clients:
            return
        client.outbox += line
        if len(client.outbox) > MAX_OUTPUT:
            self._drop(fd)  # it stopped reading
            return
        self._flush(fd, client)

    def _finish(self, client: Client, line: bytes) -> None:
        client.closing = True
        self._send(client, line)

    def _fail(self, fd: int, client: Client, message: str, hint: str | None = None) -> None:
        client.answered = True
        self._finish(client, error_line(message, hint))

    def _flush(self, fd: int, client: Client) -> None:
        while client.outbox:
            try:
                sent = client.sock.send(client.outbox)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(fd)
                return
            del client.outbox[:sent]
        if not client.outbox and client.closing:
            self._drop(fd)
            return
        want = bool(client.outbox)
        if want != client.wants_write:
            client.wants_write = want
            self._watch(fd, write=want)

    def _drop(self, fd: int) -> None:
        client = self._clients.pop(fd, None)
        if client is None:
            return
        self._answers.waiting.forget(client)
        self._sources.unwatch(fd)
        client.sock.close()
        if self._deadlines.paused_until is not None:
            self.listen()  # an fd is free again

    def _watch(self, fd: int, *, write: bool) -> None:
        self._sources.watch(fd, Watch(Source.CLIENT, fd=fd), write=write)


def _allowed(sock: socket.socket, group: int | None) -> bool:
    pid, uid, gid = peer_credentials(sock)
    if uid in (0, os.geteuid()):
        return True
    return group is not None and (gid == group or group in peer_groups(sock, pid))
