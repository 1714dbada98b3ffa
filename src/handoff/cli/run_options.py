"""``handoff run``'s options (click), and the click types that parse them with the
parsers of ``formats/options.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from handoff.errors import ConfigError
from handoff.formats import options
from handoff.formats.http_check import parse_statuses
from handoff.formats.http_request import parse_health_address
from handoff.formats.options import LogFormat
from handoff.formats.rescue_request import DEFAULT_HOLD_S, Forwarded
from handoff.master.logs import LEVELS

F = TypeVar("F", bound=Callable[..., Any])


class _Parsed(click.ParamType):  # type: ignore[type-arg,unused-ignore]
    """A click type backed by one of the options parsers."""

    def __init__(self, name: str, parse: object) -> None:
        self.name = name
        self._parse = parse

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> object:
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)  # type: ignore[operator]
        except ConfigError as exc:
            self.fail(exc.message, param, ctx)


def _duration(what: str) -> _Parsed:
    return _Parsed("seconds", lambda text: options.parse_duration(text, what=what))


RUN_OPTIONS = [
    click.option(
        "-b",
        "--bind",
        "binds",
        multiple=True,
        type=_Parsed("ADDRESS", options.parse_bind),
        help=f"Listen here (repeatable): {options.BIND_FORMS}. Default {options.DEFAULT_BIND}.",
    ),
    click.option(
        "--backlog",
        type=click.IntRange(min=1),
        default=None,
        help="Listen backlog. Default: the kernel maximum (net.core.somaxconn).",
    ),
    click.option(
        "-w",
        "--workers",
        type=click.IntRange(min=options.MIN_WORKERS, max=options.MAX_WORKERS),
        default=1,
        show_default=True,
        help="Worker processes per generation.",
    ),
    click.option(
        "--ready",
        type=_Parsed("MODE", options.parse_ready),
        default="auto",
        show_default=True,
        help=f"How a worker proves it is ready: {options.READY_FORMS}.",
    ),
    click.option(
        "--ready-timeout",
        type=_duration("--ready-timeout"),
        default="60",
        show_default=True,
        help="Seconds a new worker has to become ready before its generation fails.",
    ),
    click.option(
        "--ready-status",
        type=_Parsed("CODES", parse_statuses),
        default=None,
        help="With --ready http:PATH, the answers that count as ready. Default 200-299.",
    ),
    click.option(
        "--ready-try-timeout",
        type=_duration("--ready-try-timeout"),
        default=None,
        help="With --ready http:PATH, seconds one try may take. Default 2.",
    ),
    click.option(
        "--stop-signal",
        type=_Parsed("SIGNAL", options.parse_signal),
        default="TERM",
        show_default=True,
        help="Signal that tells a worker to stop accepting and drain.",
    ),
    click.option(
        "--drain-timeout",
        type=_duration("--drain-timeout"),
        default="30",
        show_default=True,
        help="Seconds after the stop signal before the worker's process tree is killed.",
    ),
    click.option(
        "--settle",
        type=_duration("--settle"),
        default=str(options.DEFAULT_SETTLE_S),
        show_default=True,
        help="Seconds between taking an old worker off the listening socket and its stop signal.",
    ),
    click.option(
        "--shutdown-delay",
        type=_duration("--shutdown-delay"),
        default="0",
        show_default=True,
        help="Seconds the workers go on serving after TERM, INT or `handoff stop` (the master "
        "is `leaving`: /readyz answers 503) before they drain; a second stop skips the rest.",
    ),
    click.option(
        "--give-up-after",
        metavar="CRASHES",
        type=click.IntRange(min=0, max=1000),
        default=0,
        show_default=True,
        help="Stop and exit 4 once every worker has crashed this many times in a row and none "
        "serves, so that an orchestrator restarts or replaces handoff. 0: respawn for ever.",
    ),
    click.option(
        "--chdir",
        metavar="DIR",
        default=None,
        help="The workers' directory, entered by each worker as it starts (a reload follows a "
        "flipped release symlink). Default: where handoff was started, by name ($PWD).",
    ),
    click.option(
        "--env-file",
        "env_files",
        metavar="PATH",
        multiple=True,
        help="Set the workers' variables from this file (repeatable; systemd EnvironmentFile= "
        "syntax), read again at every reload.",
    ),
    click.option(
        "--pidfile",
        type=click.Path(dir_okay=False),
        default=None,
        help="Write the master's pid here.",
    ),
    click.option(
        "--health",
        type=_Parsed("ADDRESS", parse_health_address),
        default=None,
        help="Serve /livez, /readyz and /metrics on this address (HOST:PORT or unix:PATH; "
        "docs/health.md). Default: off.",
    ),
    click.option(
        "--control",
        "control_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="Control socket path. Default: $RUNTIME_DIRECTORY/handoff.sock under systemd, "
        "else a per-user runtime path from --name (docs/control.md).",
    ),
    click.option(
        "--control-group",
        type=_Parsed("GROUP", options.parse_group),
        default=None,
        help="Also let members of this group use the control socket.",
    ),
    click.option(
        "--user",
        metavar="USER",
        default=None,
        help="Run the workers (and exec: probes) as this user (name or uid), with its groups; "
        "handoff keeps its own privileges and the sockets.",
    ),
    click.option(
        "--group",
        metavar="GROUP",
        default=None,
        help="The workers' group (name or gid). Default with --user: the user's primary group.",
    ),
    click.option(
        "--name", default=None, help="Name in process titles and logs. Default: COMMAND's basename."
    ),
    click.option(
        "--log-format",
        type=click.Choice([f.value for f in LogFormat]),
        default="auto",
        show_default=True,
        help="auto: console on a terminal, JSON lines otherwise.",
    ),
    click.option("--log-level", type=click.Choice(LEVELS), default="info", show_default=True),
    click.option(
        "--worker-output",
        type=click.Choice([mode.value for mode in options.WorkerOutput]),
        default=options.WorkerOutput.ATTRIBUTED.value,
        show_default=True,
        help="attributed: each worker's stdout and stderr go through the master, every line "
        "tagged with its generation and worker, and a failed reload shows the worker's last "
        "lines; direct: the workers write to handoff's own stdout and stderr, untouched.",
    ),
]


# Rollback: docs/rollback.md.
ROLLBACK_OPTIONS = [
    click.option(
        "--keep-previous",
        metavar="SECONDS",
        type=_duration("--keep-previous"),
        default="0",
        show_default=True,
        help="After a reload, keep the replaced generation parked (off the socket, not "
        "stopped) this long, for an instant `handoff rollback`. 0: drain it at once.",
    ),
    click.option(
        "--verify",
        metavar="CHECK",
        type=_Parsed("CHECK", options.parse_verify),
        default=None,
        help=f"During the --keep-previous window, check the new generation "
        f"({options.VERIFY_FORMS}; http: goes through the listening socket) and roll back "
        "by itself on failures.",
    ),
    click.option(
        "--verify-interval",
        metavar="SECONDS",
        type=_duration("--verify-interval"),
        default="1",
        show_default=True,
        help="Seconds between --verify checks.",
    ),
    click.option(
        "--rollback-after",
        metavar="FAILURES",
        type=click.IntRange(min=1, max=1000),
        default=3,
        show_default=True,
        help="In the --keep-previous window: roll back after this many --verify failures in "
        "a row, or this many crashes of the new generation's workers.",
    ),
    click.option(
        "--rollout",
        metavar="BATCH",
        type=_Parsed("BATCH", options.parse_rollout),
        default=None,
        help="Replace the workers BATCH at a time (e.g. 1, or 25%): each batch ready, then "
        "as many old ones off; at most workers + BATCH alive. Default: all at once.",
    ),
]


# Keep-alive rescue: docs/rescue.md.
RESCUE_OPTIONS = [
    click.option(
        "--rescue-keepalive",
        is_flag=True,
        default=False,
        help="At a reload, keep each old worker's keep-alive connections open past its "
        "shutdown and hand the next request on each to the new generation (plain HTTP/1.x "
        "only; needs pidfd_getfd and ptrace rights over the workers).",
    ),
    click.option(
        "--rescue-hold",
        metavar="SECONDS",
        type=_duration("--rescue-hold"),
        default=str(DEFAULT_HOLD_S),
        show_default=True,
        help="How long a rescued idle connection waits for the client's next request; keep "
        "it below the server's own keep-alive timeout.",
    ),
    click.option(
        "--rescue-forwarded",
        type=click.Choice([f.value for f in Forwarded]),
        default=Forwarded.NONE.value,
        show_default=True,
        help="Tell the app the rescued request's client address (it comes from the master).",
    ),
]


_AFTER_GIVE_UP = 12  # the rollback options come after --give-up-after in --help


def run_options(command: F) -> F:
    """Every option of ``handoff run``, in the order --help lists them."""
    after = _AFTER_GIVE_UP
    ordered = [*RUN_OPTIONS[:after], *ROLLBACK_OPTIONS, *RESCUE_OPTIONS, *RUN_OPTIONS[after:]]
    for option in reversed(ordered):
        command = option(command)
    return command
