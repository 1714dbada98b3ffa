"""The files the master leaves on disk while it runs: socket files, the control
socket's directory, the pidfile; and who a client may believe at a control socket.

- A socket file is removed at exit only if it is still the one bound (device and inode):
  a successor's file at the same path is never ours.
- The default control directories (``$XDG_RUNTIME_DIR/handoff``, ``/tmp/handoff-UID``)
  have predictable names anyone could create first; the master uses one only if it is a
  real directory of its own user, closed to others (docs/control.md).
- The pidfile is locked (flock) for the master's whole life and replaced atomically: a
  second master with the same --pidfile fails instead of overwriting it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import struct
import tempfile
from collections.abc import Mapping
from typing import Final

from handoff.errors import ConfigError, HandoffError

# (st_dev, st_ino) of a file: what tells our socket file or pidfile from a successor's.
FileId = tuple[int, int]
_DIRECTORY_HINT: Final = "set XDG_RUNTIME_DIR to a directory of your own, or choose --control PATH"


def file_id(info: os.stat_result) -> FileId:
    return info.st_dev, info.st_ino


# -- socket files ----------------------------------------------------------------------


def close_unix_socket(sock: socket.socket, path: str, created: FileId | None) -> None:
    """Close a socket we bound at path, and remove path if it is still that socket's file.

    created: the file's id recorded after bind; None (a re-executed master) asks the
    kernel which file the socket is bound to, and keeps the file if it cannot tell.
    """
    # sock_diag reports 32 bits of the inode: compare those only when it is the source.
    mask = -1 if created is not None else 0xFFFFFFFF
    created = created or bound_file(sock)
    sock.close()
    if created is None:
        return
    try:
        info = os.lstat(path)
        if stat.S_ISSOCK(info.st_mode) and (info.st_dev, info.st_ino & mask) == created:
            os.unlink(path)
    except OSError:
        pass


# sock_diag (NETLINK_SOCK_DIAG, unix_diag): the file a unix socket is bound to.
_NETLINK_SOCK_DIAG: Final = 4
_SOCK_DIAG_BY_FAMILY: Final = 20
_UDIAG_SHOW_VFS: Final = 2
_UNIX_DIAG_VFS: Final = 1
_NLMSG: Final = struct.Struct("=IHHII")
_UNIX_DIAG_REQ: Final = struct.Struct("=BBHIIIII")
_UNIX_DIAG_MSG_SIZE: Final = 16
_MINOR_BITS: Final = 20  # the kernel's dev_t: MAJOR << 20 | MINOR


def bound_file(sock: socket.socket) -> FileId | None:
    """(st_dev, st_ino) of the file sock is bound to, from the kernel; None if unknown
    (no unix_diag, AF_NETLINK filtered by RestrictAddressFamilies=, an abstract name)."""
    try:
        inode = os.fstat(sock.fileno()).st_ino
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as diag:
            diag.settimeout(1.0)
            request = _UNIX_DIAG_REQ.pack(
                socket.AF_UNIX, 0, 0, 0xFFFFFFFF, inode, _UDIAG_SHOW_VFS, 0xFFFFFFFF, 0xFFFFFFFF
            )
            header = _NLMSG.pack(_NLMSG.size + len(request), _SOCK_DIAG_BY_FAMILY, 1, 1, 0)
            diag.send(header + request)
            reply = diag.recv(8192)
    except OSError:
        return None
    if len(reply) < _NLMSG.size:
        return None
    length, kind, _, _, _ = _NLMSG.unpack_from(reply)
    offset = _NLMSG.size + _UNIX_DIAG_MSG_SIZE
    while kind == _SOCK_DIAG_BY_FAMILY and offset + 4 <= min(length, len(reply)):
        size, attribute = struct.unpack_from("=HH", reply, offset)
        if size < 4:
            return None
        if attribute == _UNIX_DIAG_VFS and size >= 12:
            vfs_inode, vfs_dev = struct.unpack_from("=II", reply, offset + 4)
            major, minor = vfs_dev >> _MINOR_BITS, vfs_dev & ((1 << _MINOR_BITS) - 1)
            return os.makedev(major, minor), vfs_inode
        offset += (size + 3) & ~3
    return None


# -- the control socket's directory ----------------------------------------------------


def prepare_control_directory(path: str, environ: Mapping[str, str]) -> None:
    """Make sure the control socket's directory is safe to bind in; create it if missing.

    A default directory must be a real directory (no symlink) of this user, mode 0700 or
    stricter (it is made so if created now). A directory named with --control or by
    systemd (RUNTIME_DIRECTORY) is the operator's choice: it must belong to this user or
    root. Raise ConfigError otherwise.
    """
    directory = os.path.dirname(path) or "."
    euid = os.geteuid()
    if os.path.normpath(directory) in _default_directories(environ, euid):
        _check_private(directory, euid)
        return
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        owner = os.stat(directory).st_uid
    except OSError as exc:
        raise ConfigError(
            f"cannot create the control socket directory {directory}: {exc.strerror}",
            hint="choose another place with --control PATH",
        ) from None
    if owner not in (euid, 0):
        raise ConfigError(
            f"the control socket directory {directory} belongs to uid {owner}, "
            f"not to this user (uid {euid}) or root",
            hint="choose another place with --control PATH",
        )


def _default_directories(environ: Mapping[str, str], euid: int) -> set[str]:
    """The directories formats.options.default_control_path names under a fixed path."""
    found = {f"/tmp/handoff-{euid}"}  # noqa: S108 - checked by _check_private
    if environ.get("XDG_RUNTIME_DIR"):
        found.add(os.path.normpath(f"{environ['XDG_RUNTIME_DIR']}/handoff"))
    return found


def _check_private(directory: str, euid: int) -> None:
    created = False
    try:
        os.mkdir(directory, 0o700)
        created = True
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(
            f"cannot create the control socket directory {directory}: {exc.strerror}",
            hint=_DIRECTORY_HINT,
        ) from None
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        problem = (
            "is a symlink or not a directory"
            if exc.errno in (errno.ELOOP, errno.ENOTDIR)
            else f"cannot be opened ({exc.strerror})"
        )
        raise ConfigError(
            f"the control socket directory {directory} {problem}", hint=_DIRECTORY_HINT
        ) from None
    try:
        info = os.fstat(fd)
        mode = stat.S_IMODE(info.st_mode)
        if file_id(info) != file_id(os.lstat(directory)):
            problem = "was replaced while it was being checked"
        elif info.st_uid != euid:
            problem = f"belongs to uid {info.st_uid}, not to this user (uid {euid})"
        elif created:
            os.fchmod(fd, 0o700)  # whatever the umask: the owner needs all of rwx
            return
        elif mode & 0o077:
            problem = f"is mode {mode:04o}: other users may use it (it must be 0700)"
        else:
            return
    except OSError as exc:
        problem = f"cannot be checked ({exc.strerror})"
    finally:
        os.close(fd)
    raise ConfigError(
        f"the control socket directory {directory} {problem}",
        hint=f"someone else may have made it: look inside, remove it or chmod 700 it; "
        f"or {_DIRECTORY_HINT}",
    )


# -- who answers at a control socket ---------------------------------------------------


def untrusted_peer(path: str, peer_uid: int, own_uid: int) -> str | None:
    """Why the process at path (running as peer_uid) is not to be believed, or None.

    Root and our own uid are. Another uid (a master with --control-group) only if path
    is a file only it or root could have put there: the socket file belongs to it (or
    root), and so does every directory on the way, none of them writable by group or
    others (a squatted /tmp/handoff-UID lives in /tmp, which everyone can write to).
    """
    if peer_uid in (own_uid, 0):
        return None
    trusted = (peer_uid, 0)
    try:
        owner = os.stat(path).st_uid  # connect() followed symlinks too
        if owner not in trusted:
            return f"it runs as uid {peer_uid} but the socket file belongs to uid {owner}"
        absolute = os.path.abspath(path)
        for route in (absolute, os.path.realpath(absolute)):
            for directory in _ancestors(route):
                info = os.lstat(directory)
                if info.st_uid not in trusted:
                    return f"it runs as uid {peer_uid} and {directory} belongs to uid {info.st_uid}"
                if not stat.S_ISLNK(info.st_mode) and info.st_mode & 0o022:
                    return f"it runs as uid {peer_uid} and {directory} is writable by others"
    except OSError as exc:
        return f"its socket file cannot be checked ({exc.strerror})"
    return None


def _ancestors(path: str) -> list[str]:
    """The directories that lead to path: '/', '/a', '/a/b' for '/a/b/c'."""
    parts = path.strip("/").split("/")[:-1]
    return ["/", *("/" + "/".join(parts[: i + 1]) for i in range(len(parts)))]


# -- the pidfile -----------------------------------------------------------------------


class PidFile:
    """A pidfile this master holds: an flock on it for the master's life (CLOEXEC fd).

    It is written to a fresh temporary file (mkstemp: O_EXCL, O_NOFOLLOW) in the same
    directory, locked, and then put in place: linked (refused if someone made the path
    meanwhile) or renamed over a pidfile whose lock we took (a stale one).
    A master re-executed in place (same pid) takes it again: the file already names our
    pid; if the lock fd survived the exec (re-exec may keep it open: ``fd``), that fd is
    found in /proc/self/fd and kept, else the now free lock is taken again.
    """

    def __init__(self, path: str, fd: int, ident: FileId) -> None:
        self.path = path
        self.fd = fd
        self.ident = ident

    @classmethod
    def take(cls, path: str) -> PidFile:
        """Raise HandoffError if another master holds it, or it cannot be written."""
        for _ in range(16):  # another master replacing it at the same moment: look again
            try:
                taken = cls._try_take(path)
            except OSError as exc:
                raise HandoffError(
                    f"cannot write --pidfile {path}: {exc.strerror}",
                    hint="check the directory exists and is writable",
                ) from None
            if taken is not None:
                return taken
        raise HandoffError(f"--pidfile {path} keeps changing", hint="is another master starting?")

    @classmethod
    def _try_take(cls, path: str) -> PidFile | None:
        old = _open_existing(path)
        try:
            if old is not None:
                inherited = _lock_existing(path, old)
                if inherited is not None:
                    return inherited
                if file_id(os.fstat(old)) != _lstat_id(path):
                    return None  # replaced after we opened it
            return cls._write_new(path, replace=old is not None)
        finally:
            if old is not None:
                os.close(old)  # the lock on the replaced file goes with it

    @classmethod
    def _write_new(cls, path: str, *, replace: bool) -> PidFile | None:
        directory, base = os.path.split(path)
        fd, temporary = tempfile.mkstemp(dir=directory or ".", prefix=f".{base}.", suffix=".tmp")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fchmod(fd, 0o644)
            if replace:
                os.rename(temporary, path)
            else:
                try:
                    os.link(temporary, path)
                except FileExistsError:
                    os.close(fd)
                    return None
                finally:
                    os.unlink(temporary)
            return cls(path, fd, file_id(os.fstat(fd)))
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def release(self) -> None:
        """Remove the pidfile if it is still ours, then let go of the lock."""
        try:
            if _lstat_id(self.path) == self.ident:
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(self.fd)


def _open_existing(path: str) -> int | None:
    # O_NONBLOCK: a FIFO planted at the path must not block the open.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        problem = (
            "is a symlink" if exc.errno == errno.ELOOP else f"cannot be opened ({exc.strerror})"
        )
        raise HandoffError(
            f"--pidfile {path} {problem}", hint="give a path to a regular file, or none yet"
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise HandoffError(
            f"--pidfile {path} is not a regular file", hint="give a path to a regular file"
        )
    return fd


def _lock_existing(path: str, fd: int) -> PidFile | None:
    """Lock the pidfile found at path; a PidFile if it is our own, inherited across an
    exec; None if the lock was free (the file is stale, or our own from before the exec)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pass
    else:
        return None
    pid = _read_pid(fd)
    ident = file_id(os.fstat(fd))
    kept = _own_fd_for(ident, besides=fd) if pid == os.getpid() else None
    if kept is None:
        holder = f" (pid {pid})" if pid is not None else ""
        raise HandoffError(
            f"--pidfile {path} is held by another running master{holder}",
            hint="stop that master first, or give this one another --pidfile",
        )
    os.set_inheritable(kept, False)
    return PidFile(path, kept, ident)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _own_fd_for(ident: FileId, *, besides: int) -> int | None:
    """Another fd of this process open on that file (a lock fd kept across execve)."""
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError, ValueError):
            fd = int(name)
            if fd != besides and file_id(os.fstat(fd)) == ident:
                return fd
    return None


def _lstat_id(path: str) -> FileId | None:
    try:
        return file_id(os.lstat(path))
    except OSError:
        return None


# The pidfile this process holds, by path: the lock lives as long as the master.
_held: dict[str, PidFile] = {}


def hold_pidfile(path: str) -> PidFile:
    """Take path as this master's pidfile (once per process; again after a re-exec)."""
    held = _held.get(path)
    if held is None:
        held = _held[path] = PidFile.take(path)
    return held


def release_pidfile(path: str) -> None:
    held = _held.pop(path, None)
    if held is not None:
        held.release()


def pidfile_lock_fds() -> list[int]:
    """The lock fds a re-exec in place may keep open (clear close-on-exec) so that the
    lock never lapses; the new code finds them again (PidFile.take)."""
    return [held.fd for held in _held.values()]
