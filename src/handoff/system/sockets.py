"""Listening sockets: bind them once from BindSpecs, close them (and our unix files) at exit.

The master never accepts on these; workers inherit them. A unix socket file is removed
only if it is still the one we bound (its device and inode, recorded after bind): a
successor's socket at the same path is never ours to remove.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from handoff.errors import BindError, ConfigError, HandoffError
from handoff.formats.options import BindKind, BindSpec, parse_bind
from handoff.formats.worker_contract import FDSTORE_PREFIX, fd_name
from handoff.system.runtime_files import FileId, bound_file, close_unix_socket, file_id
from handoff.system.users import set_permissions, socket_owner

# struct ucred, as SO_PEERCRED and SCM_CREDENTIALS give it: pid, uid, gid.
UCRED: Final = struct.Struct("3i")
SO_PEERGROUPS: Final = 59  # Linux 4.13; not in Python's socket module
_NGROUPS_MAX: Final = 65536


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected unix socket."""
    pid, uid, gid = UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size))
    return pid, uid, gid


def peer_groups(sock: socket.socket, pid: int) -> set[int]:
    """The peer's supplementary groups as they were when it connected (SO_PEERGROUPS);
    /proc/PID/status only on kernels without it (that pid may be reused, or hidden)."""
    for size in (256, _NGROUPS_MAX):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size * 4)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            break
        return set(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


@dataclass(slots=True, kw_only=True)
class Listener:
    spec: BindSpec
    sock: socket.socket
    address: str
    name: str
    # The unix socket file we bound, removed at exit; None once it belongs to systemd's
    # fd store (master/systemd.py), since a restarted master serves the stored socket
    # through this very path.
    created_path: str | None = None
    created_file: FileId | None = None  # None after a re-exec: asked from the kernel
    # Handed to systemd's fd store (master/systemd.py): systemd holds a copy that outlives
    # this master, so connections waiting in its queue at exit wait for the next one.
    stored: bool = False

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def port(self) -> int | None:
        """The TCP port; None for a unix socket, or one a stop has closed already."""
        if self.sock.family not in (socket.AF_INET, socket.AF_INET6) or self.sock.fileno() < 0:
            return None
        return int(self.sock.getsockname()[1])


def socket_address(sock: socket.socket) -> str:
    """How a bound socket is named in events and status: HOST:PORT, [V6]:PORT, unix:PATH."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name if isinstance(name, str) else name.decode(errors='replace')}"
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"


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
    """Close each listener not closed yet, and remove a unix socket's file if it is ours."""
    for listener in listeners:
        if listener.sock.fileno() < 0:
            continue  # closed already, by a stop (master/listener_closing.py)
        if listener.created_path is None:
            listener.sock.close()
        else:
            close_unix_socket(listener.sock, listener.created_path, listener.created_file)


def listener_inodes(listeners: Iterable[Listener]) -> dict[int, int]:
    """inode -> the master's fd: how /proc names the listening sockets in a worker's tables."""
    return {os.fstat(lst.fileno()).st_ino: lst.fileno() for lst in listeners}


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
    address = socket_address(sock)
    return Listener(spec=spec, sock=sock, address=address, name=fd_name(address))


def _open_unix(spec: BindSpec, backlog: int) -> Listener:
    path = spec.path
    owner = socket_owner(spec)  # unknown names fail before anything is created
    options = spec.mode is not None or owner != (-1, -1)
    remove_stale_unix_socket(path, spec.text)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # With mode=, owner= or group=, the file is created 0600 and given its mode and owner
    # before listen(): no moment in which other users could connect (until listen(),
    # connect() is refused anyway). Without them, the umask decides, as for any file.
    umask = os.umask(0o177) if options else None
    try:
        sock.bind(path)
        created = file_id(os.lstat(path))
    except OSError as exc:
        sock.close()
        raise _bind_error(spec, exc) from None
    finally:
        if umask is not None:
            os.umask(umask)
    try:
        if umask is not None:
            mode = 0o777 & ~umask if spec.mode is None else spec.mode
            set_permissions(spec, created, mode, owner)
        sock.listen(backlog)
    except OSError as exc:
        close_unix_socket(sock, path, created)
        raise _bind_error(spec, exc) from None
    except BaseException:
        close_unix_socket(sock, path, created)
        raise
    return Listener(
        spec=spec,
        sock=sock,
        address=f"unix:{path}",
        name=fd_name(f"unix:{path}"),
        created_path=path,
        created_file=created,
    )


def bind_control_socket(path: str, group: int | None, backlog: int) -> tuple[socket.socket, FileId]:
    """The control socket, mode 0600 (0660 and group-owned with a group), listening and
    non-blocking; and its file's id, for close_unix_socket."""
    what = f"--control {path}"
    remove_stale_unix_socket(path, what)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The mode is set at bind time: no moment in which others could connect.
    previous = os.umask(0o177 if group is None else 0o117)
    try:
        sock.bind(path)
        created = file_id(os.lstat(path))
    except OSError as exc:
        sock.close()
        raise BindError(
            f"cannot bind {what}: {exc.strerror}",
            hint="choose a directory you can write to with --control PATH",
        ) from None
    finally:
        os.umask(previous)
    try:
        if group is not None:
            _give_group(path, group, created)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        close_unix_socket(sock, path, created)
        raise
    return sock, created


def _give_group(path: str, group: int, created: FileId) -> None:
    # Not following symlinks: the file could have been swapped for one since the bind.
    try:
        os.chown(path, -1, group, follow_symlinks=False)
        swapped = file_id(os.lstat(path)) != created
    except PermissionError:
        raise ConfigError(
            f"--control-group {group}: cannot give the control socket to group {group}",
            hint="name a group this user is a member of (see: id), or run as root",
        ) from None
    except OSError as exc:
        raise HandoffError(f"cannot change the group of {path}: {exc.strerror}") from None
    if swapped:
        raise HandoffError(
            f"the control socket {path} was replaced while it was being set up",
            hint="someone else can write to its directory: choose another --control PATH",
        )


def remove_stale_unix_socket(path: str, what: str) -> None:
    """Remove path if it is a socket nobody listens on; refuse anything else there.

    Only ECONNREFUSED means stale. The connect is non-blocking: a live master whose
    queue is full answers EAGAIN at once instead of stalling this start.
    """
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise BindError(f"cannot bind {what}: {exc.strerror}") from None
    if not stat.S_ISSOCK(before.st_mode):
        raise BindError(
            f"cannot bind {what}: the path exists and is not a socket",
            hint="choose another path; handoff only replaces stale socket files",
        )
    code = probe_unix_socket(path)
    if code == errno.ECONNREFUSED:
        try:
            if file_id(os.lstat(path)) == file_id(before):
                os.unlink(path)  # nobody listens: a stale socket left by a crashed process
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise BindError(f"cannot remove the stale socket {path}: {exc.strerror}") from None
        return
    if code == errno.ENOENT:
        return  # removed meanwhile
    if code in (0, errno.EAGAIN, errno.EWOULDBLOCK):
        busy = "a process is listening on it" if code == 0 else "its listener is not accepting"
        raise BindError(
            f"cannot bind {what}: address already in use ({busy})",
            hint="stop the other process, or choose another path",
        )
    reason = os.strerror(code)
    if code in (errno.EACCES, errno.EPERM):
        raise BindError(
            f"cannot bind {what}: a socket file is there and connecting to it is not "
            f"permitted ({reason}), so whether it is in use cannot be told",
            hint="if it is stale, have its owner (or root) remove it; else choose another path",
        )
    raise BindError(f"cannot bind {what}: the socket file there cannot be checked ({reason})")


def probe_unix_socket(path: str) -> int:
    """connect(path) without blocking: 0 if a listener took it, else the errno."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        return probe.connect_ex(path)
    finally:
        probe.close()


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
    if _stored_file_gone(spec, sock.family, sock.getsockname()):
        # systemd removed its directory (RuntimeDirectory= without
        # RuntimeDirectoryPreserve=): nobody can reach the stored socket any more.
        sock.close()
        return _open_unix(parse_bind(spec.text), backlog)
    address = socket_address(sock)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _reapply_permissions(spec, sock)
    # A socket systemd passed keeps its name (LISTEN_FDNAMES), except our own stored ones.
    keep = spec.name and not spec.name.startswith(FDSTORE_PREFIX)
    return Listener(
        spec=spec, sock=sock, address=address, name=spec.name if keep else fd_name(address)
    )


def _reapply_permissions(spec: BindSpec, sock: socket.socket) -> None:
    """A unix socket of ours back from the fd store gets the mode= and owner= of this
    start (they may have changed since): on its file, if the kernel says which it is."""
    owner = socket_owner(spec) if spec.path else (-1, -1)
    if spec.mode is None and owner == (-1, -1):
        return
    created = bound_file(sock)
    if created is not None:
        set_permissions(spec, created, spec.mode, owner)


def _stored_file_gone(spec: BindSpec, family: int, name: object) -> bool:
    """A unix socket of ours, back from the fd store, whose file is gone."""
    if family != socket.AF_UNIX or not spec.name.startswith(FDSTORE_PREFIX):
        return False
    return isinstance(name, str) and name[:1] not in ("", "\0") and not os.path.lexists(name)


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
