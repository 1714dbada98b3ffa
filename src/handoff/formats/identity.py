"""Who the workers run as (``--user``, ``--group``): the resolved value, and its carrying.

Pure. system/users.py resolves names in the master, once, at start (pwd, grp,
getgrouplist); the forked child switches to this value before it execs
(system/children.py) without any lookup of its own: NSS (files, LDAP, sssd) must never
run in a forked copy of the master. A master re-executed in place (``handoff upgrade``,
or after an internal fault) takes the value from IDENTITY_VARIABLE in its own
environment instead of looking the names up again: a lookup that fails then (LDAP
unreachable, the user removed) must not stop a master whose workers serve.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final, TypeGuard

from handoff.errors import ConfigError

# The master's own environment; workers and probes never get it (worker_contract.py).
IDENTITY_VARIABLE: Final = "HANDOFF_WORKER_IDENTITY"
_MAX_ENCODED: Final = 1 << 20  # NGROUPS_MAX (65536) numbers fit with room to spare
_MAX_ID: Final = (1 << 32) - 2  # (uid_t)-1 means "unchanged" to the kernel


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerIdentity:
    """A uid, a gid and the supplementary groups, as setresuid/setresgid/setgroups take
    them; and, with --user, the passwd entry's name, home and shell for the environment."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    user: str = ""  # "" with --group alone: the uid stays the master's
    home: str = ""
    shell: str = ""

    def environment(self) -> dict[str, str]:
        """HOME, USER, LOGNAME and SHELL from the passwd entry, as systemd's User= sets
        them; nothing with --group alone."""
        if not self.user:
            return {}
        return {"HOME": self.home, "USER": self.user, "LOGNAME": self.user, "SHELL": self.shell}

    def describe(self) -> str:
        """'uid 65534 (nobody), gid 65534, groups 65534' for logs and errors."""
        who = f"uid {self.uid} ({self.user})" if self.user else f"uid {self.uid}"
        groups = ",".join(map(str, self.groups)) or "none"
        return f"{who}, gid {self.gid}, groups {groups}"

    def encode(self) -> str:
        return json.dumps(
            {
                "uid": self.uid,
                "gid": self.gid,
                "groups": list(self.groups),
                "user": self.user,
                "home": self.home,
                "shell": self.shell,
            },
            separators=(",", ":"),
        )


def user_environment(identity: WorkerIdentity | None) -> dict[str, str]:
    """What --user sets in a worker's (and an exec: probe's) environment."""
    return {} if identity is None else identity.environment()


def decode_identity(text: str) -> WorkerIdentity:
    """The value encode() wrote; ConfigError if it is anything else."""
    if len(text) > _MAX_ENCODED:
        raise ConfigError(f"{IDENTITY_VARIABLE} is too long")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise ConfigError(f"{IDENTITY_VARIABLE} is not JSON") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{IDENTITY_VARIABLE} is not an object")
    uid, gid, groups = data.get("uid"), data.get("gid"), data.get("groups")
    texts = [data.get(key, "") for key in ("user", "home", "shell")]
    if not (_is_id(uid) and _is_id(gid)) or not isinstance(groups, list):
        raise ConfigError(f"{IDENTITY_VARIABLE} does not describe a user")
    if not all(_is_id(g) for g in groups) or not all(
        isinstance(t, str) and "\0" not in t for t in texts
    ):
        raise ConfigError(f"{IDENTITY_VARIABLE} does not describe a user")
    user, home, shell = texts
    return WorkerIdentity(uid=uid, gid=gid, groups=tuple(groups), user=user, home=home, shell=shell)


def _is_id(value: object) -> TypeGuard[int]:
    return type(value) is int and 0 <= value <= _MAX_ID
