"""Talk to a running master over its control socket (``handoff reload/status/stop/scale``).

Finds the socket (--control, --pidfile or --name), checks who answers there (SO_PEERCRED:
ourselves, root, or the owner of a path no one else could have made), sends one request
line and yields the JSON lines that come back, within a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping
from typing import Final

from handoff.errors import HandoffError
from handoff.formats.control_protocol import VERSION
from handoff.formats.options import default_control_path
from handoff.system.runtime_files import untrusted_peer
from handoff.system.sockets import peer_credentials

LOCATE_HINT: Final = "is it running? name it with --control PATH, --pidfile FILE or --name NAME"
_LISTENING: Final = 0x00010000  # __SO_ACCEPTCON in /proc/net/unix's Flags column


def locate(
    *,
    control: str | None,
    pidfile: str | None,
    name: str | None,
    environ: Mapping[str, str],
    uid: int,
) -> str:
    """The control socket path of the master the user means."""
    if control:
        return control
    if pidfile:
        return _from_pidfile(pidfile)
    if name:
        return default_control_path(environ, uid, name)
    if environ.get("RUNTIME_DIRECTORY"):
        return default_control_path(environ, uid, "")
    raise HandoffError("which master? no --control, --pidfile or --name given", hint=LOCATE_HINT)


def _from_pidfile(pidfile: str) -> str:
    try:
        with open(pidfile, encoding="ascii") as f:
            pid = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        raise HandoffError(f"cannot read a pid from {pidfile}", hint=LOCATE_HINT) from None
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        with open(f"/proc/{pid}/net/unix", encoding="ascii", errors="replace") as f:
            table = f.read().splitlines()[1:]
    except OSError:
        raise HandoffError(
            f"no handoff master with pid {pid} (from {pidfile})", hint=LOCATE_HINT
        ) from None
    for line in table:
        fields = line.split()
        listening = len(fields) >= 8 and int(fields[3], 16) & _LISTENING
        if listening and f"socket:[{fields[6]}]" in inodes and fields[7].endswith("handoff.sock"):
            return fields[7]
    raise HandoffError(
        f"pid {pid} (from {pidfile}) has no handoff control socket", hint=LOCATE_HINT
    )


def exchange(
    path: str, request: Mapping[str, object], timeout_s: float
) -> Iterator[dict[str, object]]:
    """Send one request; yield each line the master sends back, until it closes."""
    deadline = time.monotonic() + timeout_s
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise HandoffError(f"no handoff master at {path}", hint=LOCATE_HINT) from None
        except PermissionError:
            raise HandoffError(
                f"permission denied on {path}",
                hint="run as the master's user or root (or a --control-group member)",
            ) from None
        _check_peer(sock, path)
        # Refused before our request arrived: its error line is still there to read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall((json.dumps({"v": VERSION, **request}) + "\n").encode())
        pending = b""
        while True:
            # A non-positive timeout would mean "block"; time left is at least 1 ms.
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield json.loads(line)
    except TimeoutError:
        raise HandoffError(
            f"no answer from the master at {path} within {timeout_s:g} s", hint="raise --timeout"
        ) from None
    except (ConnectionResetError, BrokenPipeError):
        raise HandoffError(f"the master at {path} closed the connection") from None
    finally:
        sock.close()


def _check_peer(sock: socket.socket, path: str) -> None:
    """Talk only to a master we may believe: anyone could have made a socket at a path
    we did not choose (docs/control.md, "Who answers")."""
    _, uid, _ = peer_credentials(sock)
    reason = untrusted_peer(path, uid, os.geteuid())
    if reason is not None:
        raise HandoffError(
            f"not trusting the process at {path}: {reason}",
            hint="someone else may have made this socket; a master of another user must "
            "listen in a directory only it or root can write (--control PATH)",
        )


def wait_for_exit(pid: int, timeout_s: float) -> bool:
    """True once pid has exited, False after timeout_s."""
    import select  # noqa: PLC0415

    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout_s)
        return bool(readable)
    finally:
        os.close(pidfd)
