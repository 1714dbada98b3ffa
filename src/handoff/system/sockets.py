"""Listening sockets: bind them once from BindSpecs, close them (and our unix files) at exit.

The master never accepts on these; workers inherit them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Final

from handoff.errors import BindError, ConfigError
from handoff.formats.options import BindKind, BindSpec
from handoff.formats.worker_contract import FDSTORE_PREFIX, fd_name

# struct ucred, as SO_PEERCRED and SCM_CREDENTIALS give it: pid, uid, gid.
UCRED: Final = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected unix socket."""
    pid, uid, gid = UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size))
    return pid, uid, gid


@dataclass(slots=True, kw_only=True)
class Listener:
    spec: BindSpec
    sock: socket.socket
    address: str
    name: str
    created_path: str | None = None

    def fileno(self) -> int:
        return self.sock.fileno()


def default_backlog() -> int:
    """The kernel's maximum accept queue (net.core.somaxconn); a larger value is capped anyway."""
    try:
        with open("/proc/sys/net/core/somaxconn", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return socket.SOMAXCONN


def open_listeners(specs: tuple[BindSpec, ...], backlog: int) -> list[Listener]:
    """Bind and listen on every spec; on any failure close what was opened and raise."""
    listeners: list[Listener] = []
    try:
        for spec in specs:
            listeners.append(_open(spec, backlog))
    except BaseException:
        close_listeners(listeners)
        raise
    return listeners


def close_listeners(listeners: list[Listener]) -> None:
    for listener in listeners:
        listener.sock.close()
        if listener.created_path is not None:
            # Only remove the path if it is still the socket we bound (not a successor's).
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(listener.created_path).st_mode):
                    os.unlink(listener.created_path)


def _open(spec: BindSpec, backlog: int) -> Listener:
    match spec.kind:
        case BindKind.TCP:
            return _open_tcp(spec, backlog)
        case BindKind.UNIX:
            return _open_unix(spec, backlog)
        case BindKind.FD:
            return _adopt_fd(spec, backlog)


def _open_tcp(spec: BindSpec, backlog: int) -> Listener:
    try:
        infos = socket.getaddrinfo(
            spec.host, spec.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise BindError(
            f"cannot resolve '{spec.host}' for --bind {spec.text}: {exc.strerror}",
            hint="use an IP address such as 127.0.0.1, 0.0.0.0 or [::]",
        ) from None
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # [::] should not also claim IPv4, so '--bind 0.0.0.0:P --bind [::]:P' works.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Accepted sockets inherit TCP_NODELAY on Linux; servers that wrap an inherited fd
        # (uvicorn --fd) never set it themselves, and keep-alive latency suffers ~40x without.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise _bind_error(spec, exc) from None
    host, port = sock.getsockname()[:2]
    address = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    return Listener(spec=spec, sock=sock, address=address, name=fd_name(address))


def _open_unix(spec: BindSpec, backlog: int) -> Listener:
    path = spec.path
    remove_stale_unix_socket(path, spec.text)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise _bind_error(spec, exc) from None
    return Listener(
        spec=spec,
        sock=sock,
        address=f"unix:{path}",
        name=fd_name(f"unix:{path}"),
        created_path=path,
    )


def remove_stale_unix_socket(path: str, what: str) -> None:
    """Remove path if it is a socket nobody listens on; refuse anything else there."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise BindError(f"cannot bind {what}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise BindError(
            f"cannot bind {what}: the path exists and is not a socket",
            hint="choose another path; handoff only replaces stale socket files",
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a stale socket left by a crashed process
        return
    finally:
        probe.close()
    raise BindError(
        f"cannot bind {what}: address already in use (a process is listening on it)",
        hint="stop the other process, or choose another path",
    )


def _adopt_fd(spec: BindSpec, backlog: int) -> Listener:
    try:
        mode = os.fstat(spec.fd).st_mode
    except OSError:
        raise ConfigError(
            f"--bind {spec.text}: file descriptor {spec.fd} is not open",
            hint="fd:N adopts a listening socket the caller passed to handoff",
        ) from None
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"--bind {spec.text}: file descriptor {spec.fd} is not a socket")
    sock = socket.socket(fileno=spec.fd)
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ConfigError(f"--bind {spec.text}: file descriptor {spec.fd} is not a stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.listen(backlog)
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        address = f"unix:{name if isinstance(name, str) else name.decode(errors='replace')}"
    elif sock.family == socket.AF_INET6:
        address = f"[{name[0]}]:{name[1]}"
    else:
        address = f"{name[0]}:{name[1]}"
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A socket systemd passed keeps its name (LISTEN_FDNAMES), except our own stored ones.
    keep = spec.name and not spec.name.startswith(FDSTORE_PREFIX)
    return Listener(
        spec=spec, sock=sock, address=address, name=spec.name if keep else fd_name(address)
    )


def _bind_error(spec: BindSpec, exc: OSError) -> BindError:
    code = errno.errorcode.get(exc.errno or 0, "?")
    what = f"cannot bind {spec.text}"
    match exc.errno:
        case errno.EADDRINUSE:
            port = f" 'sport = :{spec.port}'" if spec.kind is BindKind.TCP else ""
            return BindError(
                f"{what}: address already in use ({code})",
                hint=f"another process listens there (see: ss -ltnp{port}); "
                "stop it or choose another --bind",
            )
        case errno.EACCES | errno.EPERM if spec.kind is BindKind.TCP:
            return BindError(
                f"{what}: permission denied ({code})",
                hint="ports below 1024 need root or CAP_NET_BIND_SERVICE "
                "(AmbientCapabilities= in a unit), or let systemd pass the socket",
            )
        case errno.EACCES | errno.EPERM:
            return BindError(
                f"{what}: permission denied ({code})", hint="check the directory's permissions"
            )
        case errno.EADDRNOTAVAIL:
            return BindError(
                f"{what}: address not available ({code})",
                hint="the host is not an address of this machine; try 127.0.0.1 or 0.0.0.0",
            )
        case errno.ENOENT:
            return BindError(
                f"{what}: directory does not exist ({code})", hint="create the directory first"
            )
        case _:
            return BindError(f"{what}: {exc.strerror} ({code})")
