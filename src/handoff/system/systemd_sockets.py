"""Sockets systemd passes to the master: socket activation and the fd store.

systemd passes sockets as fds 3.. with LISTEN_FDS, LISTEN_PID (it
must be our pid) and LISTEN_FDNAMES: those of a .socket unit (named after FileDescriptorName=,
or the unit), and those the master stored in the fd store (FDSTORE=1, named by us
"handoff_" + the --bind text) before a crash or restart. Stored ones are adopted instead
of binding again, so the port never closes; activated ones are used when no --bind is
given, or picked with --bind fd:NAME.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, MutableMapping

from handoff.errors import ConfigError
from handoff.formats.options import DEFAULT_BIND, BindKind, BindSpec, is_decimal, parse_bind
from handoff.formats.worker_contract import FDSTORE_PREFIX, FIRST_LISTEN_FD, fd_name


def passed_sockets(environ: MutableMapping[str, str], pid: int) -> dict[str, int]:
    """name -> fd of the sockets systemd passed to pid; the LISTEN_* variables are removed.

    A name passed more than once gets ``.2``, ``.3``, ... from its second fd on."""
    count = environ.pop("LISTEN_FDS", "")
    listen_pid = environ.pop("LISTEN_PID", "")
    names = environ.pop("LISTEN_FDNAMES", "")
    if not is_decimal(count) or listen_pid != str(pid):
        return {}
    listed = names.split(":") if names else []
    passed: dict[str, int] = {}
    for index in range(int(count)):
        fd = FIRST_LISTEN_FD + index
        name = listed[index] if index < len(listed) and listed[index] else f"fd{fd}"
        try:
            os.set_inheritable(fd, False)  # ours; workers get their own copies at fd 3..
        except OSError:
            raise ConfigError(
                f"LISTEN_FDS={count} but file descriptor {fd} is not open",
                hint="whatever started handoff passed fewer sockets than it announced",
            ) from None
        # A .socket unit with several ListenStream= passes them all under its one name:
        # the second is NAME.2, the third NAME.3, so none is lost (or leaked).
        unique, repeat = name, 1
        while unique in passed:
            repeat += 1
            unique = f"{name}.{repeat}"
        passed[unique] = fd
    return passed


def store_name(spec: BindSpec) -> str:
    """The fd store name of a listener handoff bound itself (systemd: no ':', ≤ 255).

    Brackets become '_' here (unlike in LISTEN_FDNAMES), as they always have: a socket
    stored by an earlier master must be found under the same name after an upgrade. A
    unix socket is named by its path alone: its mode=, owner= and group= may change
    between starts, and it is the same socket.
    """
    text = f"unix:{spec.path}" if spec.path else spec.text
    return fd_name(FDSTORE_PREFIX + text.translate(_NO_BRACKETS))


_NO_BRACKETS = str.maketrans("[]", "__")


def resolve(specs: tuple[BindSpec, ...], passed: Mapping[str, int]) -> tuple[BindSpec, ...]:
    """What to listen on: the --bind specs, with passed sockets adopted where they fit."""
    if not specs:
        activated = [
            (name, fd) for name, fd in passed.items() if not name.startswith(FDSTORE_PREFIX)
        ]
        if activated:
            return tuple(
                BindSpec(kind=BindKind.FD, text=f"fd:{name}", fd=fd, name=name)
                for name, fd in activated
            )
        specs = (parse_bind(DEFAULT_BIND),)
    return tuple(_adopt_passed(spec, passed) for spec in specs)


def _adopt_passed(spec: BindSpec, passed: Mapping[str, int]) -> BindSpec:
    if spec.kind is BindKind.FD and spec.name:
        if spec.name not in passed:
            known = ", ".join(passed) or "none"
            raise ConfigError(
                f"--bind {spec.text}: systemd passed no socket named '{spec.name}' "
                f"(passed: {known})",
                hint="name it with FileDescriptorName= in the .socket unit, or use fd:N",
            )
        return BindSpec(kind=BindKind.FD, text=spec.text, fd=passed[spec.name], name=spec.name)
    stored = passed.get(store_name(spec))
    if stored is not None and spec.kind is not BindKind.FD:
        # The fd store gave our own listener back (a crash or restart): adopt, do not bind.
        # A unix socket keeps its path and options: its file gets this start's mode=,
        # owner= and group= (sockets.py).
        return BindSpec(
            kind=BindKind.FD,
            text=spec.text,
            fd=stored,
            name=store_name(spec),
            path=spec.path,
            mode=spec.mode,
            owner=spec.owner,
            group=spec.group,
        )
    return spec


def close_unused(passed: Mapping[str, int], used: tuple[BindSpec, ...]) -> list[str]:
    """Close the passed sockets no spec took; return their names."""
    taken = {spec.fd for spec in used if spec.kind is BindKind.FD}
    unused = [name for name, fd in passed.items() if fd not in taken]
    for name in unused:
        with contextlib.suppress(OSError):
            os.close(passed[name])
    return unused
