"""The ``handoff`` command line (click): parsing, error reporting, exit codes.

Every expected failure ends as ``handoff: error: <one line>`` plus a
``hint:`` line and the documented exit code: 0 ok, 1 runtime failure, 2 usage error,
3 the first generation never became ready.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

import click

from handoff import __version__
from handoff.cli import control_commands
from handoff.errors import (
    EXIT_FAILURE,
    EXIT_GAVE_UP,
    EXIT_NEVER_READY,
    EXIT_USAGE,
    ConfigError,
    HandoffError,
)
from handoff.formats import options
from handoff.formats.http_check import StatusRanges, parse_statuses
from handoff.formats.http_request import parse_health_address
from handoff.formats.options import LogFormat, RunConfig, Timeouts
from handoff.master.logs import LEVELS, configure
from handoff.master.resume_state import PREFLIGHT_VARIABLE, RESUME_VARIABLE
from handoff.master.serve import serve
from handoff.master.upgrade import run_preflight
from handoff.system import deploy_paths, users


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


class _HandoffGroup(click.Group):
    """Reports click's usage errors in handoff's one-line format, with a hint."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: object,
    ) -> int:
        try:
            result = super().main(
                args, prog_name or "handoff", complete_var, standalone_mode=False, **extra
            )
            code = result if isinstance(result, int) else 0
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.format_message(), err=True)
            code = EXIT_USAGE
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "handoff"
            code = _report(exc.format_message(), f"see '{where} --help'", EXIT_USAGE)
        except click.ClickException as exc:
            code = _report(exc.format_message(), None, exc.exit_code)
        except click.Abort:
            code = _report("aborted", None, EXIT_FAILURE)
        except HandoffError as exc:
            code = _report(exc.message, exc.hint, exc.exit_code)
        if standalone_mode:
            sys.exit(code)
        return code


def _report(message: str, hint: str | None, code: int) -> int:
    click.echo(f"handoff: error: {message}", err=True)
    if hint:
        click.echo(f"hint: {hint}", err=True)
    return code


@click.group(cls=_HandoffGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="handoff")
def cli() -> None:
    """Supervise a server's workers on sockets handoff owns; reload with no refused connection."""


@cli.command(context_settings={"allow_interspersed_args": False})
@click.option(
    "-b",
    "--bind",
    "binds",
    multiple=True,
    type=_Parsed("ADDRESS", options.parse_bind),
    help=f"Listen here (repeatable): {options.BIND_FORMS}. Default {options.DEFAULT_BIND}.",
)
@click.option(
    "--backlog",
    type=click.IntRange(min=1),
    default=None,
    help="Listen backlog. Default: the kernel maximum (net.core.somaxconn).",
)
@click.option(
    "-w",
    "--workers",
    type=click.IntRange(min=options.MIN_WORKERS, max=options.MAX_WORKERS),
    default=1,
    show_default=True,
    help="Worker processes per generation.",
)
@click.option(
    "--ready",
    type=_Parsed("MODE", options.parse_ready),
    default="auto",
    show_default=True,
    help=f"How a worker proves it is ready: {options.READY_FORMS}.",
)
@click.option(
    "--ready-timeout",
    type=_duration("--ready-timeout"),
    default="60",
    show_default=True,
    help="Seconds a new worker has to become ready before its generation fails.",
)
@click.option(
    "--ready-status",
    type=_Parsed("CODES", parse_statuses),
    default=None,
    help="With --ready http:PATH, the answers that count as ready. Default 200-299.",
)
@click.option(
    "--ready-try-timeout",
    type=_duration("--ready-try-timeout"),
    default=None,
    help="With --ready http:PATH, seconds one try may take. Default 2.",
)
@click.option(
    "--stop-signal",
    type=_Parsed("SIGNAL", options.parse_signal),
    default="TERM",
    show_default=True,
    help="Signal that tells a worker to stop accepting and drain.",
)
@click.option(
    "--drain-timeout",
    type=_duration("--drain-timeout"),
    default="30",
    show_default=True,
    help="Seconds after the stop signal before the worker's process tree is killed.",
)
@click.option(
    "--settle",
    type=_duration("--settle"),
    default=str(options.DEFAULT_SETTLE_S),
    show_default=True,
    help="Seconds between taking an old worker off the listening socket and its stop signal.",
)
@click.option(
    "--shutdown-delay",
    type=_duration("--shutdown-delay"),
    default="0",
    show_default=True,
    help="Seconds the workers go on serving after TERM, INT or `handoff stop` (the master "
    "is `leaving`: /readyz answers 503) before they drain; a second stop skips the rest.",
)
@click.option(
    "--give-up-after",
    metavar="CRASHES",
    type=click.IntRange(min=0, max=1000),
    default=0,
    show_default=True,
    help="Stop and exit 4 once every worker has crashed this many times in a row and none "
    "serves, so that an orchestrator restarts or replaces handoff. 0: respawn for ever.",
)
@click.option(
    "--chdir",
    metavar="DIR",
    default=None,
    help="The workers' directory, entered by each worker as it starts (a reload follows a "
    "flipped release symlink). Default: where handoff was started, by name ($PWD).",
)
@click.option(
    "--env-file",
    "env_files",
    metavar="PATH",
    multiple=True,
    help="Set the workers' variables from this file (repeatable; systemd EnvironmentFile= "
    "syntax), read again at every reload.",
)
@click.option(
    "--pidfile", type=click.Path(dir_okay=False), default=None, help="Write the master's pid here."
)
@click.option(
    "--health",
    type=_Parsed("ADDRESS", parse_health_address),
    default=None,
    help="Serve /livez, /readyz and /metrics on this address (HOST:PORT or unix:PATH; "
    "docs/health.md). Default: off.",
)
@click.option(
    "--control",
    "control_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Control socket path. Default: $RUNTIME_DIRECTORY/handoff.sock under systemd, "
    "else a per-user runtime path from --name (docs/control.md).",
)
@click.option(
    "--control-group",
    type=_Parsed("GROUP", options.parse_group),
    default=None,
    help="Also let members of this group use the control socket.",
)
@click.option(
    "--user",
    metavar="USER",
    default=None,
    help="Run the workers (and exec: probes) as this user (name or uid), with its groups; "
    "handoff keeps its own privileges and the sockets.",
)
@click.option(
    "--group",
    metavar="GROUP",
    default=None,
    help="The workers' group (name or gid). Default with --user: the user's primary group.",
)
@click.option(
    "--name", default=None, help="Name in process titles and logs. Default: COMMAND's basename."
)
@click.option(
    "--log-format",
    type=click.Choice([f.value for f in LogFormat]),
    default="auto",
    show_default=True,
    help="auto: console on a terminal, JSON lines otherwise.",
)
@click.option("--log-level", type=click.Choice(LEVELS), default="info", show_default=True)
@click.option(
    "--worker-output",
    type=click.Choice([mode.value for mode in options.WorkerOutput]),
    default=options.WorkerOutput.ATTRIBUTED.value,
    show_default=True,
    help="attributed: each worker's stdout and stderr go through the master, every line "
    "tagged with its generation and worker, and a failed reload shows the worker's last "
    "lines; direct: the workers write to handoff's own stdout and stderr, untouched.",
)
@click.argument("command", nargs=-1, required=True, metavar="-- COMMAND [ARG]...")
def run(
    binds: tuple[options.BindSpec, ...],
    backlog: int | None,
    workers: int,
    ready: options.ReadySpec,
    ready_timeout: float,
    ready_status: StatusRanges | None,
    ready_try_timeout: float | None,
    stop_signal: signal.Signals,
    drain_timeout: float,
    settle: float,
    shutdown_delay: float,
    give_up_after: int,
    chdir: str | None,
    env_files: tuple[str, ...],
    pidfile: str | None,
    control_path: str | None,
    control_group: int | None,
    user: str | None,
    group: str | None,
    name: str | None,
    log_format: str,
    log_level: str,
    worker_output: str,
    health: options.BindSpec | None,
    command: tuple[str, ...],
) -> int:
    """Run COMMAND as supervised workers on sockets handoff owns.

    \b
    Placeholders in COMMAND: {fd} is the first socket's fd, {fd1} the second's, ...
    Signals: HUP reload; TERM, INT graceful stop; QUIT fast stop; USR1 passed to workers.
    """
    # Only at a fresh start: a master re-executed in place (or its upgrade's pre-flight)
    # must not stop serving because the release it started from is gone by now, nor
    # wait on a hung mount to look; its workers look the command up themselves.
    fresh = RESUME_VARIABLE not in os.environ and PREFLIGHT_VARIABLE not in os.environ
    start = deploy_paths.start_directory(os.environ, fresh=fresh)
    workdir = deploy_paths.workers_directory(chdir, start, fresh=fresh)
    env_files = deploy_paths.absolute_paths(env_files, start)
    if fresh:
        deploy_paths.read_env_files(env_files)  # a missing or malformed file: exit 2
    if fresh and shutil.which(deploy_paths.in_directory(command[0], workdir)) is None:
        raise ConfigError(
            f"command not found: '{command[0]}' (searched PATH)",
            hint="check the spelling, or give the full path to the executable",
        )
    # Resolved once, here; a master re-executed in place takes what it carried.
    identity = users.identity_for_run(user, group, os.environ, fresh=fresh)
    if fresh:
        users.check_socket_owners(binds)  # unix:PATH,owner=,group= names exist
    run_config = RunConfig(
        command=command,
        binds=binds,
        backlog=backlog,
        workers=workers,
        ready=options.with_http_options(ready, ready_status, ready_try_timeout),
        timeouts=Timeouts(
            ready_s=ready_timeout,
            drain_s=drain_timeout,
            settle_s=settle,
            shutdown_delay_s=shutdown_delay,
        ),
        stop_signal=stop_signal,
        pidfile=pidfile,
        name=name or os.path.basename(command[0]),
        control_path=control_path
        or options.default_control_path(
            os.environ, os.geteuid(), name or os.path.basename(command[0])
        ),
        control_group=control_group,
        identity=identity,
        workdir=workdir,
        env_files=env_files,
        worker_output=options.WorkerOutput(worker_output),
        health=health,
        give_up_after=give_up_after,
    )
    if PREFLIGHT_VARIABLE in os.environ:  # this is the pre-flight of an upgrade
        return run_preflight(os.environ, sys.stdout)
    log = configure(LogFormat(log_format), log_level)
    code, reason = serve(run_config, log)
    if code == EXIT_NEVER_READY:
        _report(
            f"the first generation never became ready: {reason}",
            "the worker's own output is above; check that the server listens on the handed "
            "socket ({fd} or LISTEN_FDS), and --ready and --ready-timeout",
            code,
        )
    elif code == EXIT_GAVE_UP:
        _report(
            f"gave up: {reason}",
            "the workers' own output is above; a reload with a fixed release would have "
            "replaced them (--give-up-after)",
            code,
        )
    return code


@cli.command()
@click.option("--reloads", type=click.IntRange(min=1, max=100), default=5, show_default=True)
@click.option("-w", "--workers", type=click.IntRange(min=1, max=64), default=2, show_default=True)
def demo(reloads: int, workers: int) -> int:
    """Run a built-in app under handoff with live load and reloads (exit 0: zero failures)."""
    from handoff.demo.run import run_demo  # noqa: PLC0415 - keeps asyncio out of 'handoff run'

    return run_demo(reloads=reloads, workers=workers, out=sys.stdout)


for _command in (
    control_commands.reload,
    control_commands.status,
    control_commands.stop,
    control_commands.scale,
    control_commands.upgrade,
    control_commands.probe,
):
    cli.add_command(_command)


def main() -> NoReturn:
    cli.main()
    raise AssertionError("unreachable")  # pragma: no cover
