"""Users and groups: ``--user``/``--group`` and the owners of unix sockets, resolved.

The one module that looks names up (pwd, grp, getgrouplist: NSS, which may read files,
ask LDAP or sssd, and take locks). It runs in the master only, at a fresh start: the
forked child switches to the resolved numbers (system/children.py) and looks nothing up,
since NSS in a copy of the master could deadlock on a lock another thread held at fork
or hang on a directory server. A master re-executed in place takes the value it carried
in its environment (formats/identity.py) and looks nothing up either.

What switching needs: CAP_SETUID to change the uid and CAP_SETGID to change the gid or
the supplementary groups, and CAP_KILL to signal workers of another uid at all (root has
them all). A master that already is the user it is asked to switch to needs none.
Without CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH it cannot read their /proc entries:
``--ready auto`` then waits for READY=1, old workers are stopped by the signal alone,
``status`` shows no connections (docs/systemd.md, Hardening).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
from collections.abc import Iterable, MutableMapping
from typing import Final

from handoff.errors import BindError, ConfigError, HandoffError
from handoff.formats.identity import IDENTITY_VARIABLE, WorkerIdentity, decode_identity
from handoff.formats.options import BindKind, BindSpec, is_decimal
from handoff.system.runtime_files import FileId

CAP_CHOWN: Final = 0
CAP_KILL: Final = 5
CAP_SETGID: Final = 6
CAP_SETUID: Final = 7
_MAX_ID: Final = (1 << 32) - 2  # (uid_t)-1 means "unchanged" to the kernel
_SWITCH_HINT: Final = (
    "run handoff as root, or give it CAP_SETUID, CAP_SETGID and CAP_KILL "
    "(AmbientCapabilities= in a unit: docs/systemd.md); or leave out --user/--group"
)


def find_user(text: str, *, what: str) -> pwd.struct_passwd:
    """A user by name or uid; its passwd entry is required (home, shell, primary group)."""
    try:
        if is_decimal(text):
            return pwd.getpwuid(_number(text, what=what))
        return pwd.getpwnam(text)
    except KeyError:
        raise ConfigError(
            f"{what}: no such user '{text}'",
            hint="check the name (see: getent passwd), or create the user first",
        ) from None


def find_group(text: str, *, what: str) -> int:
    """A group's gid by name; a number is taken as it is (a gid needs no entry)."""
    if is_decimal(text):
        return _number(text, what=what)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ConfigError(
            f"{what}: no such group '{text}'",
            hint="check the name (see: getent group), or give a gid",
        ) from None


def _number(text: str, *, what: str) -> int:
    value = int(text)
    if value > _MAX_ID:
        raise ConfigError(f"{what}: {text} is not a valid uid or gid (0 to {_MAX_ID})")
    return value


def resolve_identity(user: str | None, group: str | None) -> WorkerIdentity | None:
    """Who the workers run as, or None to keep the master's user.

    --user alone: the user's uid, its primary group, and its supplementary groups
    (initgroups). --user with --group: that group instead of the primary one, plus the
    user's supplementary groups. --group alone: the master's uid, that group as the gid
    and the only supplementary group (none of the master's groups are kept).
    """
    if user is None and group is None:
        return None
    gid = None if group is None else find_group(group, what=f"--group {group}")
    if user is None:
        assert gid is not None
        return WorkerIdentity(uid=os.geteuid(), gid=gid, groups=(gid,))
    entry = find_user(user, what=f"--user {user}")
    primary = entry.pw_gid if gid is None else gid
    try:
        groups = os.getgrouplist(entry.pw_name, primary)
    except OSError as exc:
        raise ConfigError(
            f"--user {user}: cannot list the groups of '{entry.pw_name}': {exc.strerror}",
            hint="check the system's group database (see: id " + entry.pw_name + ")",
        ) from None
    return WorkerIdentity(
        uid=entry.pw_uid,
        gid=primary,
        groups=tuple(dict.fromkeys(groups)),  # in order, without repeats
        user=entry.pw_name,
        home=entry.pw_dir,
        shell=entry.pw_shell,
    )


def check_switch(identity: WorkerIdentity, capabilities: Iterable[int] | None = None) -> None:
    """Raise ConfigError if this process cannot make its children this identity.

    capabilities: the effective set (default: this process's, from /proc/self/status).
    """
    have = effective_capabilities() if capabilities is None else set(capabilities)
    uids, gids = os.getresuid(), os.getresgid()
    same_groups = set(os.getgroups()) == set(identity.groups)
    who = f"uid {identity.uid}{f' ({identity.user})' if identity.user else ''}"
    if any(uid != identity.uid for uid in uids) and CAP_SETUID not in have:
        raise ConfigError(
            f"handoff runs as uid {os.geteuid()} and cannot switch its workers to {who}",
            hint=_SWITCH_HINT,
        )
    if identity.uid != os.geteuid() and CAP_KILL not in have:
        # Not even PR_SET_PDEATHSIG reaches them: the kernel checks the dying parent's
        # right to signal. Workers nobody can stop must not be started.
        raise ConfigError(
            f"handoff runs as uid {os.geteuid()} without CAP_KILL: it could not stop "
            f"workers running as {who}",
            hint="give handoff CAP_KILL as well (AmbientCapabilities=), or run it as root",
        )
    gid_changes = any(gid != identity.gid for gid in gids) or not same_groups
    if gid_changes and CAP_SETGID not in have:
        raise ConfigError(
            f"handoff runs as gid {os.getegid()} and cannot switch its workers to "
            f"gid {identity.gid} with groups {','.join(map(str, identity.groups)) or 'none'}",
            hint=_SWITCH_HINT,
        )


def effective_capabilities() -> set[int]:
    """The numbers of the capabilities in this process's effective set."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    mask = int(line.split()[1], 16)
                    return {bit for bit in range(64) if mask >> bit & 1}
    except (OSError, ValueError, IndexError):
        pass
    return {CAP_SETUID, CAP_SETGID, CAP_CHOWN, CAP_KILL} if os.geteuid() == 0 else set()


def identity_for_run(
    user: str | None, group: str | None, environ: MutableMapping[str, str], *, fresh: bool
) -> WorkerIdentity | None:
    """--user/--group for ``handoff run``: resolved and checked at a fresh start, and
    carried in environ (IDENTITY_VARIABLE) for the master re-executed in place, which
    takes it from there instead of looking the names up again."""
    if not fresh and (user is not None or group is not None):
        carried = environ.get(IDENTITY_VARIABLE)
        if carried is not None:
            with contextlib.suppress(ConfigError):  # not ours after all: look up again
                return decode_identity(carried)
    environ.pop(IDENTITY_VARIABLE, None)
    identity = resolve_identity(user, group)
    if identity is not None:
        check_switch(identity)
        environ[IDENTITY_VARIABLE] = identity.encode()
    return identity


def socket_owner(spec: BindSpec) -> tuple[int, int]:
    """(uid, gid) a unix socket's owner= and group= name; -1 where unchanged."""
    uid = gid = -1
    if spec.owner:
        what = f"--bind {spec.text}: owner="
        uid = (
            _number(spec.owner, what=what)
            if is_decimal(spec.owner)
            else find_user(spec.owner, what=what).pw_uid
        )
    if spec.group:
        gid = find_group(spec.group, what=f"--bind {spec.text}: group=")
    return uid, gid


def check_socket_owners(specs: Iterable[BindSpec]) -> None:
    """At a fresh start, before anything runs: the owner= and group= names exist."""
    for spec in specs:
        if spec.kind is BindKind.UNIX:
            socket_owner(spec)


def set_permissions(
    spec: BindSpec, created: FileId, mode: int | None, owner: tuple[int, int]
) -> None:
    """Give the socket file we bound (created: its id) its mode and owner.

    Through an O_PATH fd of the file itself, checked to be the one we bound: chmod and
    chown of its /proc/self/fd link reach that inode, never a symlink or another file
    put at the path meanwhile (fchmod and fchown refuse O_PATH fds; glibc's fchmodat
    with AT_SYMLINK_NOFOLLOW does the same). The mode first: after a chown to another
    user, only root could still change it.
    """
    path = spec.path
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise BindError(
            f"--bind {spec.text}: cannot set the socket file's mode and owner: {exc.strerror}"
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISSOCK(info.st_mode) or (info.st_dev, info.st_ino & _INODE_MASK) != (
            created[0],
            created[1] & _INODE_MASK,
        ):
            raise HandoffError(
                f"--bind {spec.text}: the socket file was replaced while it was being set up",
                hint="someone else can write to its directory: choose another path",
            )
        link = f"/proc/self/fd/{fd}"
        if mode is not None:
            os.chmod(link, mode)
        if owner != (-1, -1):
            os.chown(link, *owner)
    except PermissionError:
        raise ConfigError(
            f"--bind {spec.text}: not permitted to give the socket file that owner or group",
            hint="only root (or CAP_CHOWN) gives a file to another user, or to a group "
            "handoff's user is not a member of",
        ) from None
    finally:
        os.close(fd)


# sock_diag reports 32 bits of a socket file's inode: compare those where it is a source.
_INODE_MASK: Final = 0xFFFFFFFF


def notify_senders(identity: WorkerIdentity | None) -> frozenset[int]:
    """The uids whose datagrams on the workers' notify socket count: the master's own,
    root, and the workers' (--user)."""
    return frozenset({os.geteuid(), 0, *(() if identity is None else (identity.uid,))})
