"""Keep-alive rescue: one rescued request handed to the new generation, its response back.

The master connects to the listener the client reached (the old workers are off it, so
a new worker accepts), sends the rewritten head (``Connection: close``), then the body's
``Content-Length`` bytes as the client sends them, and relays the response until the new
worker closes. Then it closes its side towards the client (``shutdown``), reads and drops
what the client still sends until its EOF (a close with unread bytes would reset the
connection and could destroy the response's tail), and closes. The client's next request
goes to a fresh connection, straight to the new generation.

Never blocking: every socket is non-blocking, each wakeup moves at most ``CHUNK`` bytes
each way, and a side is read only while the other side's buffer has room (``CAP``):
back-pressure through the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Callable
from enum import Enum, auto
from typing import Final

CHUNK: Final = 64 * 1024
CAP: Final = 256 * 1024  # bytes buffered per direction before the other side is not read
LINGER_DISCARD: Final = 1024 * 1024  # client bytes dropped while waiting for its EOF


class Step(Enum):
    CONNECTING = auto()
    RELAYING = auto()
    LINGERING = auto()  # the response is out, our side shut: waiting for the client's EOF
    DONE = auto()


Interest = Callable[[socket.socket, bool, bool], None]  # (sock, read, write)


class Relay:
    """One request and its response; ``step`` is DONE once both sockets are closed."""

    def __init__(self, client: socket.socket, head: bytes, body: int, interest: Interest) -> None:
        self.client = client
        self.step = Step.CONNECTING
        self.answered = False  # a response byte reached the client
        self.delivered = False  # the whole response reached the client (then it lingers)
        self.failure = ""  # why it ended early (for the caller's counters)
        self._interest = interest
        self._to_upstream = bytearray(head)
        self._body_left = body
        self._to_client = bytearray()
        self._upstream_eof = False
        self._discarded = 0
        self.upstream = socket.socket(client.family, socket.SOCK_STREAM)
        try:
            local = client.getsockname()  # the listener's address, as the client reached it
            self.upstream.setblocking(False)
            self.upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = self.upstream.connect_ex(local)
        except OSError as exc:
            code = exc.errno or errno.EIO
        if code not in (0, errno.EINPROGRESS):
            self._fail(f"connect: {errno.errorcode.get(code, code)}")
            return
        self._update()

    def on_upstream(self, readable: bool, writable: bool) -> None:
        if self.step is Step.CONNECTING and writable:
            try:
                code = self.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except OSError as exc:
                code = exc.errno or errno.EIO
            if code:
                self._fail(f"connect: {errno.errorcode.get(code, code)}")
                return
            self.step = Step.RELAYING
        if self.step is not Step.RELAYING:
            return
        try:
            if writable and self._to_upstream:
                sent = self.upstream.send(self._to_upstream[:CHUNK])
                del self._to_upstream[:sent]
            if readable and len(self._to_client) < CAP:
                data = self.upstream.recv(CHUNK)
                if data:
                    self._to_client += data
                else:
                    self._upstream_eof = True
        except BlockingIOError:
            pass
        except OSError as exc:
            self._fail(f"upstream: {exc.strerror}")
            return
        self._update()

    def on_client(self, readable: bool, writable: bool) -> None:
        try:
            if self.step is Step.LINGERING:
                if readable:
                    data = self.client.recv(CHUNK)
                    self._discarded += len(data)
                    if not data or self._discarded > LINGER_DISCARD:
                        self.close()
                return
            if writable and self._to_client:
                sent = self.client.send(self._to_client[:CHUNK])
                del self._to_client[:sent]
                self.answered = True
            if readable and self._body_left > 0 and len(self._to_upstream) < CAP:
                data = self.client.recv(min(CHUNK, self._body_left))
                if not data:
                    self._fail("the client closed before its request's body was complete")
                    return
                self._body_left -= len(data)
                self._to_upstream += data
        except BlockingIOError:
            pass
        except OSError as exc:
            self._fail(f"client: {exc.strerror}")
            return
        self._update()

    def _update(self) -> None:
        """Say what each socket waits for now; after the whole response, linger."""
        if self.step is Step.RELAYING and self._upstream_eof and not self._to_client:
            if not self.answered:
                self._fail("the new generation closed without an answer")
                return
            self._close_upstream()
            with contextlib.suppress(OSError):
                self.client.shutdown(socket.SHUT_WR)
            self.delivered = True
            self.step = Step.LINGERING
            self._interest(self.client, True, False)
            return
        if self.step is Step.CONNECTING:
            self._interest(self.upstream, False, True)
            self._interest(self.client, False, False)
            return
        if self.step is not Step.RELAYING:
            return
        self._interest(
            self.upstream,
            not self._upstream_eof and len(self._to_client) < CAP,
            bool(self._to_upstream),
        )
        self._interest(
            self.client,
            self._body_left > 0 and len(self._to_upstream) < CAP,
            bool(self._to_client),
        )

    def _fail(self, why: str) -> None:
        self.failure = why
        self.close()

    def _close_upstream(self) -> None:
        self._interest(self.upstream, False, False)
        self.upstream.close()

    def close(self) -> None:
        if self.step is Step.DONE:
            return
        self.step = Step.DONE
        self._close_upstream()
        self._interest(self.client, False, False)
        self.client.close()
