"""The built-in HTTP app that `handoff demo` runs as its workers.

A worker program, not part of the master, and it imports nothing from handoff: it takes
its listening sockets the systemd way (LISTEN_FDS from fd 3, LISTEN_PID), reports
readiness with sd_notify datagrams on NOTIFY_SOCKET, and drains on SIGTERM without
losing a request. Run it as `python -m handoff.demo.app [--version-file PATH]`.

GET / answers with the worker's generation, number, pid and version (the version file is
read once at start-up, so an answer proves which release served it); GET /sleep?ms=N
answers the same after N ms; anything else is 404.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Final, cast

_FIRST_FD: Final = 3
# Idle keep-alive connections are kept this long into a drain; see _App.drain.
_IDLE_GRACE_S: Final = 2.0
_MAX_HEAD_BYTES: Final = 16 * 1024
_MAX_BODY_BYTES: Final = 1024 * 1024
_MAX_SLEEP_MS: Final = 60_000
# Past this a drain stops waiting for clients that do not read their responses.
_DRAIN_LIMIT_S: Final = _MAX_SLEEP_MS / 1000 + 2 * _IDLE_GRACE_S
_ACCEPT_BATCH: Final = 128  # accepts per wake-up, so one burst cannot starve the loop


class StartupError(Exception):
    """The process was not started the way a worker must be."""


def _response(status: str, body: bytes, headers: str, *, close: bool) -> bytes:
    connection = "close" if close else "keep-alive"
    head = (
        f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}"
        f"Connection: {connection}\r\n\r\n"
    )
    return head.encode("latin-1") + body


class _Responses:
    """Every response this app sends, built once: the answers never change."""

    def __init__(self, *, generation: str, worker: str, version: str) -> None:
        def number_or_text(text: str) -> int | str:
            return int(text) if text.isdigit() else text

        document = {
            "generation": number_or_text(generation),
            "worker": number_or_text(worker),
            "pid": os.getpid(),
            "version": version,
        }
        body = json.dumps(document).encode() + b"\n"
        header_version = "".join(c if c.isprintable() and c.isascii() else "?" for c in version)
        headers = (
            "Content-Type: application/json\r\n"
            f"X-Handoff-Generation: {generation}\r\nX-Handoff-Version: {header_version}\r\n"
        )
        text = "Content-Type: text/plain\r\n"
        self.ok = _response("200 OK", body, headers, close=False)
        self.ok_close = _response("200 OK", body, headers, close=True)
        self.not_found = _response("404 Not Found", b"not found\n", text, close=False)
        self.not_found_close = _response("404 Not Found", b"not found\n", text, close=True)
        self.bad_request = _response("400 Bad Request", b"bad request\n", text, close=True)
        self.too_large = _response("413 Content Too Large", b"too large\n", text, close=True)


def _sleep_ms(query: str) -> int | None:
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if name == "ms" and value.isdigit() and int(value) <= _MAX_SLEEP_MS:
            return int(value)
    return None


class _HttpConnection(asyncio.Protocol):
    """One client connection: HTTP/1.1 with keep-alive and in-order pipelining."""

    _transport: asyncio.Transport  # set by connection_made, which asyncio calls first

    def __init__(self, app: _App) -> None:
        self._app = app
        self._buffer = bytearray()
        self._busy = False  # a request is being answered (/sleep)
        self._closing = False
        self._peer_done = False  # the client half-closed its side
        self._paused = False
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # a stream transport
        self._app.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
        self._app.forget(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._serve()
        if self._busy and len(self._buffer) > _MAX_HEAD_BYTES + _MAX_BODY_BYTES:
            # A client pipelining behind a slow request: stop reading until it is answered.
            self._paused = True
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        self._peer_done = True
        # Keep the transport open only to finish a response still being prepared.
        return self._busy

    def close_unless_busy(self) -> None:
        """Close the connection unless it is answering a request."""
        if not self._busy:
            self._closing = True
            self._transport.close()

    def _send(self, payload: bytes, *, close: bool) -> None:
        self._transport.write(payload)
        if close:
            self._closing = True
            self._transport.close()

    def _serve(self) -> None:
        while not self._busy and not self._closing:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > _MAX_HEAD_BYTES:
                    self._send(self._app.responses.bad_request, close=True)
                elif self._peer_done:
                    self.close_unless_busy()
                return
            if not self._handle(bytes(self._buffer[:end]), end + 4):
                return

    def _handle(self, head: bytes, head_size: int) -> bool:
        """Answer the request whose head is complete; False if its body has not arrived."""
        responses = self._app.responses
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._send(responses.bad_request, close=True)
            return False
        method, target, version = parts
        length = 0
        tokens = b""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                if not value.strip().isdigit():
                    self._send(responses.bad_request, close=True)
                    return False
                length = int(value)
            elif name == b"connection":
                tokens = value.strip().lower()
            elif name == b"transfer-encoding":
                # Chunked request bodies are not worth parsing in a demo.
                self._send(responses.bad_request, close=True)
                return False
        if length > _MAX_BODY_BYTES:
            self._send(responses.too_large, close=True)
            return False
        if len(self._buffer) < head_size + length:
            return False
        del self._buffer[: head_size + length]
        http10 = version == b"HTTP/1.0"
        keep_alive = b"keep-alive" in tokens if http10 else b"close" not in tokens
        path, _, query = target.decode("latin-1").partition("?")
        if method in (b"GET", b"POST") and path == "/":  # a POST's body is read and ignored
            self._answer(keep_alive)
        elif method == b"GET" and path == "/sleep" and (ms := _sleep_ms(query)) is not None:
            self._busy = True
            self._task = asyncio.get_running_loop().create_task(self._answer_later(ms, keep_alive))
        else:
            close = not keep_alive or self._app.draining
            self._send(responses.not_found_close if close else responses.not_found, close=close)
        return True

    def _answer(self, keep_alive: bool) -> None:
        # Once draining, every answer closes its connection: the client learns from the
        # response itself, so no FIN can cross a request it is already sending.
        close = not keep_alive or self._app.draining
        self._send(self._app.responses.ok_close if close else self._app.responses.ok, close=close)

    async def _answer_later(self, ms: int, keep_alive: bool) -> None:
        await asyncio.sleep(ms / 1000)
        self._busy = False
        self._task = None
        if self._closing:
            return
        self._answer(keep_alive)
        self._serve()
        if self._paused and not self._closing:
            self._paused = False
            self._transport.resume_reading()


class _App:
    """The listening sockets and connections of one worker, and its drain."""

    def __init__(self, responses: _Responses, listeners: list[socket.socket]) -> None:
        self.responses = responses
        self.connections: set[_HttpConnection] = set()
        self.draining = False
        self._listeners = listeners
        # Accepted sockets whose transport asyncio is still setting up. Accepting by hand
        # (not with loop.create_server) is what makes them countable: a drain must not
        # end while one is on its way, or its request dies with the process (a reset).
        # It also avoids create_server's listen() call, which would reset the backlog of
        # the socket shared with the master and the other workers.
        self._adopting: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        for sock in listeners:
            sock.setblocking(False)
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # EMFILE and the like: the master will see us struggle
                _say(f"demoapp: accept: {exc}")
                return
            task = self._loop.create_task(self._adopt(conn))
            self._adopting.add(task)
            task.add_done_callback(self._adopted)

    async def _adopt(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(lambda: _HttpConnection(self), conn)
        except OSError:
            conn.close()

    def _adopted(self, task: asyncio.Task[None]) -> None:
        self._adopting.discard(task)
        self._changed.set()

    def forget(self, connection: _HttpConnection) -> None:
        self.connections.discard(connection)
        self._changed.set()

    async def _until_idle(self, timeout_s: float) -> bool:
        """Wait until no connection is left; False if timeout_s passes first."""
        deadline = self._loop.time() + timeout_s
        while self.connections or self._adopting:
            self._changed.clear()
            remaining = deadline - self._loop.time()
            try:
                await asyncio.wait_for(self._changed.wait(), max(remaining, 0))
            except TimeoutError:
                return False
        return True

    async def drain(self) -> None:
        """Stop accepting, finish every request in flight, then return."""
        for sock in self._listeners:
            # Closes only this process's copy of the listening socket: the master and the
            # other workers keep theirs, so nothing in the accept queue is lost.
            self._loop.remove_reader(sock.fileno())
            sock.close()
        _notify(b"STOPPING=1")
        self.draining = True
        # Closing an idle keep-alive connection now would race with the client's next
        # request (our FIN crossing it means a lost request). Instead the next request
        # on each connection is answered with "Connection: close"; only connections
        # still silent after the grace are closed.
        if not await self._until_idle(_IDLE_GRACE_S):
            for connection in list(self.connections):
                connection.close_unless_busy()
        if not await self._until_idle(_DRAIN_LIMIT_S):
            _say("demoapp: drain: clients not reading their responses; exiting")


def _say(line: str) -> None:
    """One line to stderr in one write(2): never glued to a line someone else writes."""
    with contextlib.suppress(OSError):
        os.write(2, f"{line}\n".encode(errors="replace"))


def _notify(message: bytes) -> None:
    """Send one sd_notify datagram, if there is anyone to send it to."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(5.0)
            sock.sendto(message, address)
    except OSError as exc:
        _say(f"demoapp: cannot notify {address!r}: {exc}")


def _inherited_sockets() -> list[socket.socket]:
    """Adopt the listening sockets passed at fd 3.. (sd_listen_fds(3))."""
    count = os.environ.get("LISTEN_FDS")
    owner = os.environ.get("LISTEN_PID")
    if not count:
        raise StartupError("LISTEN_FDS is not set: run me under handoff or socket activation")
    if owner != str(os.getpid()):
        raise StartupError(f"LISTEN_PID={owner} is not my pid {os.getpid()}: not my sockets")
    if not count.isdigit() or int(count) == 0:
        raise StartupError(f"LISTEN_FDS={count!r} is not a positive number")
    sockets = []
    for fd in range(_FIRST_FD, _FIRST_FD + int(count)):
        try:
            sock = socket.socket(fileno=fd)  # family and type come from the kernel
        except OSError as exc:
            raise StartupError(f"fd {fd} from LISTEN_FDS is not a socket: {exc}") from None
        if sock.type != socket.SOCK_STREAM:
            raise StartupError(f"fd {fd} is not a stream socket")
        sockets.append(sock)
    return sockets


async def _serve(sockets: list[socket.socket], responses: _Responses, generation: str) -> int:
    loop = asyncio.get_running_loop()
    app = _App(responses, sockets)
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            os._exit(128 + signum)  # a second stop request: no more patience
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    _notify(f"READY=1\nSTATUS=serving generation {generation}".encode())
    await stop.wait()
    await app.drain()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo app; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m handoff.demo.app", description=__doc__)
    parser.add_argument("--version-file", help="report this file's contents as the version")
    args = parser.parse_args(argv)
    version = "builtin"
    try:
        if args.version_file is not None:
            with open(args.version_file, encoding="utf-8") as file:
                version = file.read().strip()
        sockets = _inherited_sockets()
    except (OSError, StartupError) as exc:
        _say(f"demoapp: error: {exc}")
        return 2
    generation = os.environ.get("HANDOFF_GENERATION", "0")
    worker = os.environ.get("HANDOFF_WORKER", "0")
    responses = _Responses(generation=generation, worker=worker, version=version)
    _say(
        f"demoapp: pid {os.getpid()} generation {generation} worker {worker} "
        f"version {version!r} on {len(sockets)} socket(s)"
    )
    return asyncio.run(_serve(sockets, responses, generation))


if __name__ == "__main__":
    sys.exit(main())
