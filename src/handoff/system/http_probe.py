"""``--ready http:PATH``: one try, run as its own short process.

    python -m handoff.system.http_probe '{"worker": PID, "target": {...}, "path": "/healthz",
                                         "statuses": [[200, 299]], "timeout_s": 2.0}'

The master starts one per try (master/probes.py) and reads its one-line report from a
pipe (formats/http_check.py ``Report``) when it exits; exit status 0 means ready. Why a
process and not a client in the master's loop: every step here blocks (connect, waiting
for the connection to be accepted, reading the answer) and may meet a server that stalls
or floods; in a child, with its own deadline and an alarm behind it, none of that can
reach the master, which only reaps a process and reads at most a few KiB. It reuses the
``exec:`` probes' machinery (spawn, pidfd watch, cancel, kill at shutdown). It costs a
Python start per try (about 50 ms of CPU), which the http backoff (0.05 s doubling to
0.5 s, core/policy.py) keeps to a few per reload.

One try:

1. Connect to the first listening socket's address (0.0.0.0 as 127.0.0.1, :: as ::1; a
   unix path as it is) and send the request without its final empty line.
2. Wait, polling the kernel's socket diagnostics, until the server side of this
   connection has been accepted (it has an inode then), and look for that inode among
   the sockets of the worker's process tree (/proc/PID/fd, the same reads as the scan).
   The server side is found by the connection's 4-tuple, reversed (TCP), or as the
   peer of this socket (unix).
   With worker 0 (a --verify check: master/switching.py), whoever accepts answers.
3. Accepted by another process (the old generation shares the listening socket): close
   it (that server sees a request cut short) and connect again, at most MAX_CONNECTIONS
   times within the try's timeout. Accepted by the worker's tree: finish the request,
   read the status line and headers (at most MAX_HEAD_BYTES), and report the status: in
   the accepted ranges, the worker is ready.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from handoff.core.model import Pid
from handoff.formats.http_check import (
    MAX_HEAD_BYTES,
    REQUEST_END,
    Report,
    StatusRanges,
    accepted,
    describe_statuses,
    request_head,
    status_line,
)
from handoff.formats.procfs import TcpEndpoint
from handoff.system import socket_diag
from handoff.system.accepting_scan import process_fds
from handoff.system.process_tree import tree
from handoff.system.serving_scan import unix_name

_ANYONE: Final = Pid(0)  # worker 0: the answer of whichever process accepted counts
MAX_CONNECTIONS: Final = 100  # per try: connections accepted by other generations
_FIRST_POLL_S: Final = 0.001  # waiting for the accept: 1 ms doubling to 20 ms
_POLL_CAP_S: Final = 0.02
_LOOPBACK: Final = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 - names, not binds


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """Where the probe connects: a TCP address, or a unix socket path ('@name': abstract)."""

    host: str = ""
    port: int = 0
    unix: str = ""

    def describe(self) -> str:
        if self.unix:
            return f"unix:{self.unix}"
        return str(TcpEndpoint(self.host, self.port))

    def host_header(self) -> str:
        return "localhost" if self.unix else self.describe()

    def as_dict(self) -> dict[str, object]:
        return {"host": self.host, "port": self.port, "unix": self.unix}


def probe_target(sock: socket.socket) -> Target | None:
    """Where to send the probe for a listening socket (None: not a stream socket)."""
    try:
        if sock.type != socket.SOCK_STREAM:
            return None
        name = sock.getsockname()
    except OSError:
        return None
    if sock.family == socket.AF_UNIX:
        return Target(unix=unix_name(name)) if name else None
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        host = str(name[0])
        return Target(host=_LOOPBACK.get(host, host), port=int(name[1]))
    return None


def try_once(
    worker: Pid, target: Target, path: str, statuses: StatusRanges, timeout_s: float
) -> Report:
    """One try: see the module docstring."""
    deadline = time.monotonic() + timeout_s
    elsewhere = 0
    while True:
        try:
            sock = _connect(target, max(0.001, deadline - time.monotonic()))
        except OSError as exc:
            return Report(ok=False, detail=f"cannot connect to {target.describe()}: {_why(exc)}")
        with sock:
            try:
                sock.sendall(request_head(path, target.host_header()))
                inode = _wait_accepted(sock, target, deadline)
            except OSError as exc:
                return Report(ok=False, detail=f"connection to {target.describe()}: {_why(exc)}")
            if inode is None:
                return Report(ok=False, detail=_not_accepted(timeout_s, elsewhere))
            owner = _owner(worker, inode) if worker else _ANYONE
            if owner is None:
                # Another generation won the accept: it gets an unfinished request and a
                # close. Connect again at once, while the try has time.
                elsewhere += 1
                if elsewhere < MAX_CONNECTIONS and time.monotonic() < deadline:
                    continue
                return Report(ok=False, detail=_not_accepted(timeout_s, elsewhere))
            who = f"pid {owner}" if owner else target.describe()
            try:
                sock.sendall(REQUEST_END)
                head = _read_head(sock, deadline)
            except OSError as exc:
                return Report(ok=False, detail=f"{who} accepted, then: {_why(exc)}")
        break
    line = status_line(head)
    # Connections an older generation accepted before this one: proof that its answers
    # were not taken for the worker's.
    before = f"; {elsewhere} accepted outside the worker's tree first" if elsewhere else ""
    if line is None:
        shown = head[:60].decode("latin-1").encode("unicode_escape").decode("ascii")
        what = f"'{shown}'" if head else "nothing"
        detail = f"{who} answered GET {path} with {what}, not HTTP{before}"
        return Report(ok=False, detail=detail)
    if accepted(line.status, statuses):
        detail = f"{line} from {who} (GET {path}{before})"
        return Report(ok=True, detail=detail, answer=str(line))
    wanted = describe_statuses(statuses)
    detail = f"{line} from {who} (GET {path}; want {wanted}{before})"
    return Report(ok=False, detail=detail, answer=str(line))


def _not_accepted(timeout_s: float, elsewhere: int) -> str:
    if elsewhere:
        return (
            f"accepted {elsewhere} times by processes outside the worker's tree (an older "
            f"generation), not by the worker within {timeout_s:g} s"
        )
    return f"not accepted within {timeout_s:g} s"


def _why(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _connect(target: Target, timeout_s: float) -> socket.socket:
    if target.unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        address = target.unix
        try:
            if address.startswith("@"):  # abstract: '@' stands for the NULs
                sock.connect(address.replace("@", "\0").encode())
            else:
                sock.connect(address)
        except OSError:
            sock.close()
            raise
        return sock
    return socket.create_connection((target.host, target.port), timeout=timeout_s)


def _wait_accepted(sock: socket.socket, target: Target, deadline: float) -> int | None:
    """The inode of the server side of sock once a process has accepted it; None if none
    did by the deadline. Raises OSError if the server closed the connection first."""
    pause = _FIRST_POLL_S
    while True:
        inode = _server_inode(sock, target)
        if inode:
            return inode
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        # Sleep until the next look, or until the server closes the connection.
        readable, _, _ = select.select([sock], [], [], min(pause, left))
        if readable and not sock.recv(1, socket.MSG_PEEK):
            raise ConnectionResetError(0, "closed by the server before the request ended")
        pause = min(pause * 2, _POLL_CAP_S)


def _server_inode(sock: socket.socket, target: Target) -> int:
    if target.unix:
        # The peer's inode is 0 until a process accepts it (it has no file before).
        mine = socket_diag.unix_socket(os.fstat(sock.fileno()).st_ino)
        return mine.peer if mine is not None else 0
    here, there = sock.getsockname(), sock.getpeername()
    server = socket_diag.tcp_socket(
        TcpEndpoint(str(there[0]), int(there[1])), TcpEndpoint(str(here[0]), int(here[1]))
    )
    return server.inode if server is not None else 0


def _owner(worker: Pid, inode: int) -> Pid | None:
    """The process of the worker's tree holding the socket, if one does."""
    for member in tree(worker):
        with contextlib.suppress(OSError):
            if inode in process_fds(member.pid).sockets.values():
                return member.pid
    return None


def _read_head(sock: socket.socket, deadline: float) -> bytes:
    """The answer's first bytes: up to the end of its headers, MAX_HEAD_BYTES, the end of
    the connection, or the deadline, whichever comes first."""
    head = b""
    while len(head) < MAX_HEAD_BYTES and b"\r\n\r\n" not in head:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            chunk = sock.recv(MAX_HEAD_BYTES - len(head))
        except TimeoutError:
            break
        if not chunk:
            break
        head += chunk
    return head


def main(argv: list[str]) -> int:
    """Run one try as described by argv[1] (JSON); print the report; exit 0 if ready."""
    spec: Mapping[str, object] = json.loads(argv[1])
    timeout_s = float(str(spec["timeout_s"]))
    # The alarm's default action ends the process: a try can never outlive its timeout
    # by much, whatever a system call does.
    signal.alarm(math.ceil(timeout_s) + 1)
    raw_target = spec["target"]
    assert isinstance(raw_target, dict)
    target = Target(
        host=str(raw_target["host"]), port=int(raw_target["port"]), unix=str(raw_target["unix"])
    )
    raw_statuses = spec["statuses"]
    assert isinstance(raw_statuses, list)
    statuses = tuple((int(low), int(high)) for low, high in raw_statuses)
    try:
        report = try_once(
            Pid(int(str(spec["worker"]))), target, str(spec["path"]), statuses, timeout_s
        )
    except socket_diag.DiagUnavailable as exc:
        report = Report(ok=False, detail=f"cannot tell who accepted the connection: {exc}")
    sys.stdout.buffer.write(report.encode())
    sys.stdout.flush()
    return 0 if report.ok else 1


def command(
    worker: Pid, target: Target, path: str, statuses: StatusRanges, timeout_s: float
) -> list[str]:
    """The argv that runs one try."""
    spec = {
        "worker": int(worker),
        "target": target.as_dict(),
        "path": path,
        "statuses": [list(pair) for pair in statuses],
        "timeout_s": timeout_s,
    }
    return [sys.executable, "-m", "handoff.system.http_probe", json.dumps(spec)]


if __name__ == "__main__":
    sys.exit(main(sys.argv))
