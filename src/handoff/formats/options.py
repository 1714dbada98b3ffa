"""Validated run configuration and the pure parsers behind the command-line options.

Pure: no sockets are opened here; ``system/sockets.py`` turns a ``BindSpec`` into a
listener. Every parser raises ``ConfigError`` with a message that names the accepted forms.
"""

from __future__ import annotations

import ipaddress
import math
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Final

from handoff.errors import ConfigError
from handoff.formats.http_check import (
    DEFAULT_STATUSES,
    DEFAULT_TRY_TIMEOUT_S,
    StatusRanges,
    parse_path,
)
from handoff.formats.identity import WorkerIdentity
from handoff.formats.rescue_request import RescueOptions

BIND_FORMS: Final = "HOST:PORT, [V6]:PORT, :PORT, unix:PATH, fd:N, fd:NAME"
DEFAULT_BIND: Final = "127.0.0.1:8000"
# Workers per generation: --workers, handoff scale, TTIN/TTOU, the control protocol.
MIN_WORKERS: Final = 1
MAX_WORKERS: Final = 1024
# Between taking an old worker off the listening socket and its stop signal: time for the
# connections it accepted just before to be read. 0: signal at once.
DEFAULT_SETTLE_S: Final = 0.25


class BindKind(StrEnum):
    TCP = "tcp"
    UNIX = "unix"
    FD = "fd"


@dataclass(frozen=True, slots=True, kw_only=True)
class BindSpec:
    """One listening address as the operator wrote it."""

    kind: BindKind
    text: str
    host: str = ""
    port: int = 0
    path: str = ""
    fd: int = -1
    name: str = ""  # fd:NAME, a socket systemd passed with that name
    # unix:PATH,mode=0660,owner=USER,group=GROUP: set on the socket file before listen().
    mode: int | None = None
    owner: str = ""  # a user name or uid, resolved when the socket is bound
    group: str = ""  # a group name or gid, likewise


def parse_bind(text: str) -> BindSpec:
    """Parse one ``--bind`` value."""
    if text.startswith("unix:"):
        return _parse_unix(text)
    if text.startswith("fd:"):
        number = text.removeprefix("fd:")
        if is_decimal(number):
            return BindSpec(kind=BindKind.FD, text=text, fd=int(number))
        if not _NAME.fullmatch(number):
            raise ConfigError(
                f"'{text}': fd: needs a file descriptor number or a socket name "
                f"(forms: {BIND_FORMS})"
            )
        return BindSpec(kind=BindKind.FD, text=text, name=number)
    host, port_text = _split_host_port(text)
    if not is_decimal(port_text) or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"'{text}': port must be an integer 0-65535 (forms: {BIND_FORMS})")
    return BindSpec(kind=BindKind.TCP, text=text, host=host, port=int(port_text))


UNIX_OPTIONS: Final = "mode=OCTAL, owner=USER, group=GROUP"
# The options start at the first ',' followed by NAME=, so a path with a plain comma in
# it binds as it always did.
_UNIX_OPTIONS_START: Final = re.compile(r",(?=[A-Za-z_]+=)")


def _parse_unix(text: str) -> BindSpec:
    rest = text.removeprefix("unix:")
    found = _UNIX_OPTIONS_START.search(rest)
    path, options = (rest, "") if found is None else (rest[: found.start()], rest[found.end() :])
    if not path:
        raise ConfigError(f"'{text}': unix: needs a path (forms: {BIND_FORMS})")
    if "\0" in path:
        raise ConfigError(f"'{text}': a unix socket path cannot contain NUL")
    values: dict[str, str] = {}
    for item in options.split(",") if options else ():
        key, sep, value = item.partition("=")
        if not sep or key not in ("mode", "owner", "group"):
            raise ConfigError(f"'{text}': unknown unix socket option '{item}' ({UNIX_OPTIONS})")
        if key in values:
            raise ConfigError(f"'{text}': {key}= is given twice")
        if not value or value != value.strip() or "\0" in value:
            raise ConfigError(f"'{text}': {key}= needs a name or a number ({UNIX_OPTIONS})")
        values[key] = value
    mode = None
    if "mode" in values:
        digits = values["mode"]
        if not (digits.isascii() and 1 <= len(digits) <= 4 and set(digits) <= set("01234567")):
            raise ConfigError(f"'{text}': mode= takes octal permissions such as 0660")
        mode = int(digits, 8)
        if mode > 0o777:
            raise ConfigError(f"'{text}': mode= takes permission bits only, 0000 to 0777")
    return BindSpec(
        kind=BindKind.UNIX,
        text=text,
        path=path,
        mode=mode,
        owner=values.get("owner", ""),
        group=values.get("group", ""),
    )


def _split_host_port(text: str) -> tuple[str, str]:
    if text.startswith("["):
        closing = text.find("]")
        if closing < 0 or text[closing + 1 : closing + 2] != ":":
            raise ConfigError(
                f"'{text}': IPv6 addresses are written [V6]:PORT (forms: {BIND_FORMS})"
            )
        host = text[1:closing]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(
                f"'{text}': '{host}' is not an IPv6 address (forms: {BIND_FORMS})"
            ) from None
        return host, text[closing + 2 :]
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ConfigError(f"'{text}': missing ':PORT' (forms: {BIND_FORMS})")
    if host != host.strip():
        raise ConfigError(f"'{text}': the host has surrounding spaces (forms: {BIND_FORMS})")
    if ":" in host:
        raise ConfigError(
            f"'{text}': put IPv6 addresses in brackets, [V6]:PORT (forms: {BIND_FORMS})"
        )
    return host or "0.0.0.0", port  # noqa: S104 - ':PORT' means every interface, as in gunicorn


# A systemd socket name (FileDescriptorName=): printable ASCII without ':'; we also want
# it to start like a name, so that fd:-1 is not taken for one.
_NAME: Final = re.compile(r"[A-Za-z_][!-9;-~]{0,254}")


def is_decimal(text: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²', which int() refuses."""
    return text.isascii() and text.isdigit()


def parse_signal(text: str) -> signal.Signals:
    """Parse a signal name (TERM, SIGTERM, sigterm) or number."""
    candidate = text.strip().upper()
    if is_decimal(candidate):
        try:
            sig = signal.Signals(int(candidate))
        except ValueError:
            raise ConfigError(f"'{text}': no such signal number") from None
    else:
        name = candidate if candidate.startswith("SIG") else f"SIG{candidate}"
        try:
            sig = signal.Signals[name]
        except KeyError:
            raise ConfigError(
                f"'{text}': unknown signal (examples: TERM, QUIT, INT, USR1)"
            ) from None
    if sig in (signal.SIGKILL, signal.SIGSTOP):
        raise ConfigError(
            f"'{text}': {sig.name} cannot be a stop signal; a worker cannot drain on it"
        )
    return sig


def parse_duration(text: str, *, what: str) -> float:
    """Parse a non-negative number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{what} must be a number of seconds, not '{text}'") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{what} must be a finite number of seconds >= 0, not '{text}'")
    return value


class ReadyMode(StrEnum):
    AUTO = "auto"
    NOTIFY = "notify"
    DELAY = "delay"
    EXEC = "exec"
    HTTP = "http"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadySpec:
    """How a worker proves it is ready. READY=1 over the notify socket counts in every mode
    but http: (there the worker must answer)."""

    mode: ReadyMode
    delay_s: float = 0.0
    command: str = ""
    path: str = ""  # http:PATH
    statuses: StatusRanges = DEFAULT_STATUSES  # --ready-status
    try_timeout_s: float = DEFAULT_TRY_TIMEOUT_S  # --ready-try-timeout

    def describe(self) -> str:
        match self.mode:
            case ReadyMode.DELAY:
                return f"delay:{self.delay_s:g}"
            case ReadyMode.EXEC:
                return f"exec:{self.command}"
            case ReadyMode.HTTP:
                return f"http:{self.path}"
            case _:
                return self.mode.value


READY_FORMS: Final = "auto, notify, delay:SECONDS, exec:COMMAND, http:PATH"


def parse_ready(text: str) -> ReadySpec:
    """Parse ``--ready``."""
    mode, _, argument = text.partition(":")
    match mode:
        case "notify" if not argument:
            return ReadySpec(mode=ReadyMode.NOTIFY)
        case "delay":
            return ReadySpec(mode=ReadyMode.DELAY, delay_s=parse_duration(argument, what="delay:"))
        case "exec" if argument.strip():
            return ReadySpec(mode=ReadyMode.EXEC, command=argument)
        case "exec":
            raise ConfigError(
                f"'{text}': exec: needs a command, "
                "e.g. exec:'test -e /run/app/$HANDOFF_WORKER_PID.ready'"
            )
        case "auto" if not argument:
            return ReadySpec(mode=ReadyMode.AUTO)
        case "http":
            return ReadySpec(mode=ReadyMode.HTTP, path=parse_path(argument))
        case _:
            raise ConfigError(f"'{text}': unknown readiness mode (choose {READY_FORMS})")


def with_http_options(
    ready: ReadySpec, statuses: StatusRanges | None, try_timeout_s: float | None
) -> ReadySpec:
    """--ready-status and --ready-try-timeout, which only --ready http:PATH takes."""
    if ready.mode is not ReadyMode.HTTP:
        given = "--ready-status" if statuses is not None else "--ready-try-timeout"
        if statuses is not None or try_timeout_s is not None:
            raise ConfigError(
                f"{given} only applies to --ready http:PATH (not --ready {ready.describe()})",
                hint="e.g. --ready http:/healthz --ready-status 200-299 --ready-try-timeout 2",
            )
        return ready
    if try_timeout_s is not None and try_timeout_s <= 0:
        raise ConfigError(
            f"--ready-try-timeout must be above 0 seconds, not {try_timeout_s:g}",
            hint="one try connects, sends GET PATH and reads the answer: e.g. 2",
        )
    return replace(
        ready,
        statuses=ready.statuses if statuses is None else statuses,
        try_timeout_s=ready.try_timeout_s if try_timeout_s is None else try_timeout_s,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifySpec:
    """--verify: how the new generation is checked during the --keep-previous window."""

    mode: ReadyMode  # HTTP (GET PATH through the listening socket) or EXEC (COMMAND exits 0)
    path: str = ""
    command: str = ""

    def describe(self) -> str:
        return f"http:{self.path}" if self.mode is ReadyMode.HTTP else f"exec:{self.command}"


VERIFY_FORMS: Final = "http:PATH, exec:COMMAND"


def parse_verify(text: str) -> VerifySpec:
    """Parse ``--verify``."""
    mode, _, argument = text.partition(":")
    if mode == "http":
        return VerifySpec(mode=ReadyMode.HTTP, path=parse_path(argument))
    if mode == "exec" and argument.strip():
        return VerifySpec(mode=ReadyMode.EXEC, command=argument)
    raise ConfigError(
        f"'{text}': --verify takes {VERIFY_FORMS}",
        hint="e.g. --verify http:/healthz, or --verify exec:'curl -fsS localhost:8000/ok'",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutSpec:
    """--rollout: how many new workers at a time (a count, or a percentage)."""

    count: int = 0
    percent: int = 0

    def describe(self) -> str:
        return f"{self.percent}%" if self.percent else str(self.count)


def parse_rollout(text: str) -> RolloutSpec:
    """Parse ``--rollout``: a whole number of workers (1, 2, ...) or a percentage (25%)."""
    number = text.removesuffix("%")
    if is_decimal(number) and 0 < int(number) <= (100 if text.endswith("%") else MAX_WORKERS):
        value = int(number)
        return RolloutSpec(percent=value) if text.endswith("%") else RolloutSpec(count=value)
    raise ConfigError(
        f"--rollout must be a number of workers from 1 to {MAX_WORKERS} or a percentage "
        f"from 1% to 100%, not '{text}'",
        hint="e.g. --rollout 1 (one worker at a time) or --rollout 25%",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RollbackOptions:
    """--keep-previous, --verify, --verify-interval, --rollback-after, --rollout
    (docs/rollback.md)."""

    keep_previous_s: float = 0.0
    verify: VerifySpec | None = None
    verify_interval_s: float = 1.0
    rollback_after: int = 3
    rollout: RolloutSpec = RolloutSpec()  # --rollout

    def __post_init__(self) -> None:
        if self.verify is not None and self.keep_previous_s <= 0:
            raise ConfigError(
                "--verify needs --keep-previous: the checks run while the previous "
                "generation is kept to roll back to",
                hint="e.g. --keep-previous 60 --verify http:/healthz",
            )
        if self.verify is not None and self.verify_interval_s <= 0:
            raise ConfigError("--verify-interval must be above 0 seconds", hint="e.g. 1")


class LogFormat(StrEnum):
    AUTO = "auto"
    CONSOLE = "console"
    JSON = "json"


class WorkerOutput(StrEnum):
    """--worker-output: where a worker's stdout and stderr go."""

    ATTRIBUTED = "attributed"  # a pipe per worker, read by the master, lines attributed
    DIRECT = "direct"  # the master's own stdout and stderr, untouched (no cost, no last words)


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    ready_s: float = 60.0
    drain_s: float = 30.0
    settle_s: float = DEFAULT_SETTLE_S
    shutdown_delay_s: float = 0.0  # --shutdown-delay


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """Everything ``handoff run`` needs, validated."""

    command: tuple[str, ...]
    binds: tuple[BindSpec, ...]
    backlog: int | None
    workers: int
    ready: ReadySpec
    timeouts: Timeouts
    stop_signal: signal.Signals
    pidfile: str | None
    name: str
    control_path: str | None = None
    control_group: int | None = None
    identity: WorkerIdentity | None = None  # --user, --group: who the workers run as
    # Where each worker is started (--chdir, else the start directory by name), changed
    # into by the worker itself at every spawn; None: the master's own directory.
    workdir: str | None = None
    env_files: tuple[str, ...] = ()  # --env-file, absolute; read at each generation's start
    worker_output: WorkerOutput = WorkerOutput.ATTRIBUTED
    health: BindSpec | None = None  # --health: the health endpoint
    give_up_after: int = 0  # --give-up-after: crashes in a row of every worker; 0: never
    rollback: RollbackOptions = RollbackOptions()  # --keep-previous, --verify, ...
    rescue: RescueOptions = field(default_factory=RescueOptions)  # --rescue-keepalive, ...


def parse_group(text: str) -> int:
    """A group name or number, as its gid."""
    import grp  # noqa: PLC0415 - reads /etc/group: the one lookup this module does

    if text.isascii() and text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ConfigError(f"'{text}': no such group") from None


def default_control_path(environ: Mapping[str, str], uid: int, name: str) -> str:
    """Where the control socket goes when --control is not given (docs/control.md)."""
    if environ.get("RUNTIME_DIRECTORY"):
        # systemd may list several directories, separated by ':'; the first is ours.
        return f"{environ['RUNTIME_DIRECTORY'].split(':')[0]}/handoff.sock"
    if environ.get("XDG_RUNTIME_DIR"):
        return f"{environ['XDG_RUNTIME_DIR']}/handoff/{name}.handoff.sock"
    # A 0700 directory that must belong to the user (master/serve.py checks).
    return f"/tmp/handoff-{uid}/{name}.handoff.sock"  # noqa: S108
