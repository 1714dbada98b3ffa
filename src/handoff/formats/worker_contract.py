"""What a worker gets: its environment, its argv placeholders, and the notify wire format.

Pure. docs/protocol.md is the user-facing description of the same contract.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Final

from handoff.errors import ConfigError
from handoff.formats.identity import IDENTITY_VARIABLE

FIRST_LISTEN_FD: Final = 3
# Names of the listeners handoff itself stores in systemd's fd store (FDNAME=), told apart
# from the names of sockets a .socket unit passes.
FDSTORE_PREFIX: Final = "handoff_"
# Variables that belong to the master's own supervisor (systemd), never to a worker:
# a worker that inherited them would talk to PID 1 directly (sidekiq#5829). And the
# master's own: the --user it carries across a re-exec.
STRIPPED_VARIABLES: Final = frozenset(
    {"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
     IDENTITY_VARIABLE}
)  # fmt: skip
_PLACEHOLDER = re.compile(r"\{fd(\d*)\}")


def clean_environment(base: Mapping[str, str]) -> dict[str, str]:
    """The master's environment without what belongs to its own supervisor."""
    return {key: value for key, value in base.items() if key not in STRIPPED_VARIABLES}


def names_sockets_in_argv(argv: Sequence[str]) -> bool:
    """True when the command is told its sockets through {fd} placeholders."""
    return any(_PLACEHOLDER.search(arg) for arg in argv)


def worker_environment(
    base: Mapping[str, str],
    *,
    listener_names: Sequence[str],
    notify_socket: str,
    generation: int,
    slot: int,
    listen_fds: bool = True,
    files: Mapping[str, str] | None = None,
    workdir: str | None = None,
) -> dict[str, str]:
    """Build a worker's environment, without LISTEN_PID (only the child knows its pid).

    With listen_fds False (the command names its sockets with {fd} placeholders) the
    LISTEN_* variables are left out: a server that reads both, like gunicorn given
    --bind fd://3, would adopt the same socket twice.

    files (its generation's --env-file variables) override base; handoff's own variables
    override both. workdir: the directory the worker starts in, its PWD.
    """
    env = clean_environment({**base, **(files or {})})
    if workdir is not None:
        env["PWD"] = workdir
    if listen_fds:
        env["LISTEN_FDS"] = str(len(listener_names))
        env["LISTEN_FDNAMES"] = ":".join(listener_names)
    env["NOTIFY_SOCKET"] = notify_socket
    env["HANDOFF_GENERATION"] = str(generation)
    env["HANDOFF_WORKER"] = str(slot)
    return env


def expand_placeholders(argv: Sequence[str], listener_count: int) -> list[str]:
    """Replace ``{fd}`` (first socket) and ``{fdN}`` (socket N) by the worker's fd numbers."""

    def replace(match: re.Match[str]) -> str:
        index = int(match.group(1) or 0)
        if index >= listener_count:
            raise ConfigError(
                f"'{match.group(0)}' names socket {index}, "
                f"but there are only {listener_count} --bind addresses",
                hint="{fd} or {fd0} is the first --bind, {fd1} the second, ...",
            )
        return str(FIRST_LISTEN_FD + index)

    return [_PLACEHOLDER.sub(replace, arg) for arg in argv]


def parse_notify(payload: bytes) -> dict[str, str]:
    """Parse an sd_notify datagram: newline-separated KEY=VALUE assignments."""
    fields: dict[str, str] = {}
    for line in payload.decode("utf-8", "replace").split("\n"):
        key, sep, value = line.partition("=")
        if sep and key:
            fields[key] = value
    return fields


def fd_name(text: str) -> str:
    """A socket name systemd accepts (LISTEN_FDNAMES, FDNAME=): no ':', at most 255 bytes.

    Used for the names workers see and for the names of the listeners handoff keeps in
    systemd's fd store.
    """
    return re.sub(r"[^A-Za-z0-9_.@/\[\]-]", "_", text)[:255] or "socket"
