"""A worker that misbehaves on purpose: python misbehave.py MODE [PIDFILE].

exit-at-start   prints a reason and exits 3 before serving
hang-at-start   never becomes ready (and never sends READY=1)
stubborn DIR    sends READY=1, ignores SIGTERM, and starts two children that ignore it
                too: one in its process group, one that left it with setsid; writes the
                three pids to DIR/pids-GENERATION-WORKER
child-notifies  a child of the worker sends READY=1 (as prefork servers do), then
                both wait
waits-in KIND   serves HTTP on fd 3 waiting in a blocking accept, select or poll
                (KIND: accept, select, poll), or, for KIND slow-epoll, sleeps 1.5 s
                before serving with asyncio (epoll); never sends READY=1
select FILE     reads FILE: "exit" or "hang" behave as above, anything else execs the
                demo app with --version-file FILE.version (same pid: LISTEN_PID holds)
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import threading


def notify(message: bytes) -> None:
    address = os.environ["NOTIFY_SOCKET"]
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message, address)


def stubborn_child(leave_group: bool) -> int:
    """A child that ignores SIGTERM; returns once it is settled (out of the group if asked)."""
    settled_read, settled_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(settled_read)
        if leave_group:
            os.setsid()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.close(settled_write)
        threading.Event().wait()
        os._exit(0)
    os.close(settled_write)
    os.read(settled_read, 1)  # EOF once the child has done the above
    os.close(settled_read)
    return pid


def answer(connection: socket.socket) -> None:
    with connection:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = connection.recv(4096)
            if not chunk:
                return
            request += chunk
        generation = os.environ.get("HANDOFF_GENERATION", "0")
        connection.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n"
            + f"X-Handoff-Generation: {generation}\r\n\r\nok".encode()
        )


def waits_in(kind: str) -> None:
    listener = socket.socket(fileno=3)
    if kind == "slow-epoll":
        import asyncio
        import time

        time.sleep(1.5)  # a start-up hook: nothing accepts yet

        async def serve() -> None:
            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                await writer.drain()
                writer.close()

            server = await asyncio.start_server(handle, sock=listener)
            await server.serve_forever()

        asyncio.run(serve())
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    while True:
        if kind == "select":
            select.select([listener], [], [])
        elif kind == "poll":
            poller.poll()
        answer(listener.accept()[0])


def main() -> None:
    mode = sys.argv[1]
    if mode == "waits-in":
        return waits_in(sys.argv[2])
    if mode == "select":
        with open(sys.argv[2]) as f:
            mode = f.read().strip()
        if mode not in ("exit-at-start", "hang-at-start"):
            demo = ["-m", "handoff.demo.app", "--version-file", sys.argv[2] + ".version"]
            os.execv(sys.executable, [sys.executable, *demo])
        return main_mode(mode)
    return main_mode(mode)


def main_mode(mode: str) -> None:
    if mode == "exit-at-start":
        print("misbehave: cannot load settings (on purpose)", file=sys.stderr, flush=True)
        sys.exit(3)
    if mode == "hang-at-start":
        threading.Event().wait()
    if mode == "child-notifies":
        if os.fork() == 0:
            notify(b"READY=1")
            threading.Event().wait()
        threading.Event().wait()
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        pids = [os.getpid(), stubborn_child(False), stubborn_child(True)]
        name = f"pids-{os.environ['HANDOFF_GENERATION']}-{os.environ['HANDOFF_WORKER']}"
        with open(os.path.join(sys.argv[2], name), "w") as f:
            f.write(" ".join(map(str, pids)))
        notify(b"READY=1")
        threading.Event().wait()
    sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
