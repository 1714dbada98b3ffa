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
from handoff.cli.run_options import run_options
from handoff.errors import (
    EXIT_FAILURE,
    EXIT_GAVE_UP,
    EXIT_NEVER_READY,
    EXIT_USAGE,
    ConfigError,
    HandoffError,
)
from handoff.formats import options
from handoff.formats.http_check import StatusRanges
from handoff.formats.options import LogFormat, RunConfig, Timeouts
from handoff.formats.rescue_request import Forwarded, RescueOptions
from handoff.master.logs import configure
from handoff.master.resume_state import PREFLIGHT_VARIABLE, RESUME_VARIABLE
from handoff.master.serve import serve
from handoff.master.upgrade import run_preflight
from handoff.system import deploy_paths, users


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
@run_options
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
    keep_previous: float,
    verify: options.VerifySpec | None,
    verify_interval: float,
    rollback_after: int,
    rollout: options.RolloutSpec | None,
    rescue_keepalive: bool,
    rescue_hold: float,
    rescue_forwarded: str,
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
        rollback=options.RollbackOptions(
            keep_previous_s=keep_previous,
            verify=verify,
            verify_interval_s=verify_interval,
            rollback_after=rollback_after,
            rollout=rollout or options.RolloutSpec(),
        ),
        rescue=RescueOptions(
            enabled=rescue_keepalive,
            hold_s=rescue_hold,
            forwarded=Forwarded(rescue_forwarded),
        ),
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
    control_commands.rollback,
    control_commands.promote,
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
