"""``handoff reload``, ``rollback``, ``promote``, ``status``, ``stop``, ``scale``,
``upgrade`` and ``probe``: control clients.

Failures raise HandoffError; the CLI group prints them as
``handoff: error: …`` with a hint and exits with their code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

import click

from handoff.cli.control_client import exchange, locate, wait_for_exit
from handoff.cli.status_view import last_output, render_status
from handoff.errors import HandoffError
from handoff.formats.options import MAX_WORKERS, MIN_WORKERS

F = TypeVar("F", bound=Callable[..., Any])


def _locating(command: F) -> F:
    """The options that name the master: --control, --pidfile, --name."""
    for option in (
        click.option("--name", default=None, help="The master's --name (default paths)."),
        click.option(
            "--pidfile",
            type=click.Path(dir_okay=False, readable=False),
            default=None,
            help="The master's --pidfile.",
        ),
        click.option(
            "--control",
            type=click.Path(dir_okay=False, readable=False),
            default=None,
            help="The master's control socket.",
        ),
    ):
        command = option(command)
    return command


def _waiting(what: str) -> Callable[[F], F]:
    """--wait/--no-wait (what waiting means) and --timeout for the result."""

    def add(command: F) -> F:
        command = click.option(
            "--timeout",
            type=click.FloatRange(min=0.1),
            default=None,
            help=f"Seconds to wait for the result. Default {DEFAULT_TIMEOUT_S:g} (with "
            "--verify: as long as the window lasts).",
        )(command)
        return click.option("--wait/--no-wait", default=True, show_default=True, help=what)(command)

    return add


DEFAULT_TIMEOUT_S: Final = 120.0
_WINDOW_TIMEOUT_S: Final = 7 * 24 * 3600.0  # the master answers when the window ends


def _timeout(given: float | None, *, long: bool = False) -> float:
    if given is not None:
        return given
    return _WINDOW_TIMEOUT_S if long else DEFAULT_TIMEOUT_S


def _path(control: str | None, pidfile: str | None, name: str | None) -> str:
    return locate(control=control, pidfile=pidfile, name=name, environ=os.environ, uid=os.geteuid())


def _fail_on_error(line: Mapping[str, object]) -> None:
    if line.get("type") == "error":
        raise HandoffError(
            str(line.get("error")), hint=str(line["hint"]) if line.get("hint") else None
        )


@click.command()
@_waiting("Stream progress and wait until the new generation serves or fails.")
@click.option(
    "--verify",
    is_flag=True,
    help="With --keep-previous: wait through the window too; exit 1 if it was rolled back.",
)
@click.option(
    "--canary",
    metavar="K",
    type=click.IntRange(min=1, max=MAX_WORKERS),
    default=None,
    help="Start K new workers beside the old ones (both serve; the kernel picks who "
    "accepts), then wait for 'handoff promote' or 'handoff rollback'.",
)
@_locating
def reload(
    *,
    wait: bool,
    timeout: float | None,
    verify: bool,
    canary: int | None,
    control: str | None,
    pidfile: str | None,
    name: str | None,
) -> int:
    """Reload: start a new generation; exit 0 once it serves, 1 if it failed."""
    if verify and not wait:
        raise HandoffError("--verify waits for the window: it cannot go with --no-wait")
    path = _path(control, pidfile, name)
    request = {"cmd": "reload", "wait": wait, "verify": verify, "canary": canary or 0}
    line = _result(path, request, _timeout(timeout, long=verify))
    if not wait:
        click.echo(f"reload {line.get('accepted')}")
        return 0
    return _reload_result(line)


def _result(path: str, request: Mapping[str, object], timeout_s: float) -> Mapping[str, object]:
    """Send request; print its progress lines as they come; return its result line."""
    for line in exchange(path, request, timeout_s):
        _fail_on_error(line)
        if line.get("type") == "progress":
            click.echo(f"  {line.get('message')}")
        elif line.get("type") == "result":
            return line
    raise HandoffError(f"the master closed the connection before the {request['cmd']} ended")


def _reload_result(line: Mapping[str, object]) -> int:
    gen = line.get("gen")
    if line.get("canary"):
        click.echo(
            f"canary serving: generation {gen}, {line.get('workers')} workers beside "
            f"generation {line.get('beside')}; now 'handoff promote' or 'handoff rollback'"
        )
        return 0
    if line.get("confirmed"):
        click.echo(
            f"reload confirmed: generation {gen} served through the window "
            f"({line.get('checks')} checks passed); generation {line.get('previous')} drains"
        )
        return 0
    if line.get("rolled_back"):
        raise HandoffError(
            f"reload {line.get('reason')}",
            hint=f"generation {line.get('to')} serves again; see 'handoff status' and the log",
        )
    if line.get("ok"):
        click.echo(f"reload succeeded: generation {gen} serving ({line.get('duration_s')} s)")
        return 0
    output = last_output(line)
    for shown in output:
        click.echo(shown, err=True)  # under systemd: in the journal, in `status`
    raise HandoffError(
        f"reload failed: {line.get('reason')}",
        hint="the old generation is still serving; the worker's last output is "
        + ("above" if output else "in the master's log"),
    )


@click.command()
@_waiting("Wait until the rollback is done (a restart: until the generation serves).")
@_locating
def rollback(
    wait: bool, timeout: float | None, control: str | None, pidfile: str | None, name: str | None
) -> int:
    """Roll back to the previous generation: put its parked workers back on the socket
    (--keep-previous), or start its release again; undo a reload, canary or rollout in
    progress. Exit 0 once the previous generation serves, 1 if it could not."""
    path = _path(control, pidfile, name)
    return _rollback_result(_result(path, {"cmd": "rollback", "wait": wait}, _timeout(timeout)))


_PATHS: Final = {
    "reattach": "its parked workers put back on the socket",
    "restart": "its release started again",
    "cancel": "the reload in progress undone",
}


def _rollback_result(line: Mapping[str, object]) -> int:
    path, gen = str(line.get("path")), line.get("gen")
    if line.get("accepted"):
        click.echo(f"rollback started: {_PATHS.get(path, path)} as generation {gen}")
        return 0
    if line.get("ok"):
        took = (
            f"{line.get('duration_s')} s"
            if line.get("switch_ms") is None
            else f"switched in {line.get('switch_ms')} ms"
        )
        click.echo(
            f"rolled back ({path}): generation {gen} serving, {_PATHS.get(path, path)} "
            f"({took}); generation {line.get('from')} drains"
        )
        return 0
    raise HandoffError(
        f"rollback failed ({path}): {line.get('reason')}",
        hint="the generation that served before the rollback still serves",
    )


@click.command()
@_waiting("Wait until the promoted generation serves (or fails).")
@_locating
def promote(
    wait: bool, timeout: float | None, control: str | None, pidfile: str | None, name: str | None
) -> int:
    """Promote the canary: start the rest of its workers; once all are ready it replaces
    the old generation, as a reload does. Exit 0 once it serves, 1 if it failed."""
    path = _path(control, pidfile, name)
    line = _result(path, {"cmd": "promote", "wait": wait}, _timeout(timeout))
    if not wait:
        click.echo(f"promoted: generation {line.get('gen')} grows to {line.get('workers')}")
        return 0
    return _reload_result(line)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@_locating
def status(as_json: bool, control: str | None, pidfile: str | None, name: str | None) -> int:
    """Show the master, its generations and workers, and the last reload."""
    path = _path(control, pidfile, name)
    for line in exchange(path, {"cmd": "status"}, 30.0):
        _fail_on_error(line)
        report = line.get("status")
        if isinstance(report, dict):
            click.echo(json.dumps(report, indent=2) if as_json else render_status(report))
            return 0
    raise HandoffError("the master sent no status")


@click.command()
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="Seconds to wait for the master to exit.",
)
@_locating
def stop(timeout: float, control: str | None, pidfile: str | None, name: str | None) -> int:
    """Stop the master gracefully and wait until it has exited."""
    path = _path(control, pidfile, name)
    pid = None
    for line in exchange(path, {"cmd": "stop"}, 30.0):
        _fail_on_error(line)
        pid = line.get("pid")
    if not isinstance(pid, int):
        raise HandoffError("the master did not confirm the stop")
    click.echo(f"stopping the master (pid {pid})")
    if not wait_for_exit(pid, timeout):
        raise HandoffError(
            f"the master (pid {pid}) is still stopping after {timeout:g} s",
            hint="it may be in its --shutdown-delay, or its workers draining (--drain-timeout)",
        )
    click.echo("stopped")
    return 0


@click.command()
@click.argument("workers", type=click.IntRange(min=MIN_WORKERS, max=MAX_WORKERS))
@_locating
def scale(workers: int, control: str | None, pidfile: str | None, name: str | None) -> int:
    """Set the number of workers per generation (the serving one now)."""
    path = _path(control, pidfile, name)
    for line in exchange(path, {"cmd": "scale", "workers": workers}, 30.0):
        _fail_on_error(line)
        if line.get("type") == "result":
            click.echo(f"workers: {line.get('was')} -> {line.get('workers')}")
            return 0
    raise HandoffError("the master did not confirm the scale")


@click.command()
@_waiting("Wait until the master runs the new code (or the pre-flight failed).")
@_locating
def upgrade(
    wait: bool, timeout: float | None, control: str | None, pidfile: str | None, name: str | None
) -> int:
    """Upgrade the master itself to the handoff installed now: same pid, workers untouched.

    The new code first runs as a pre-flight; only if it passes does the master exec it.
    Exit 0 once the master runs it, 1 if the pre-flight failed (the old master runs on).
    """
    path = _path(control, pidfile, name)
    for line in exchange(path, {"cmd": "upgrade", "wait": wait}, _timeout(timeout)):
        _fail_on_error(line)
        if line.get("type") != "result":
            continue
        if not wait:
            click.echo(f"upgrade {line.get('accepted')}")
            return 0
        if line.get("ok"):
            click.echo(
                f"upgraded: the master (pid {line.get('pid')}) runs handoff "
                f"{line.get('version')} (was {line.get('was')})"
            )
            return 0
        raise HandoffError(
            f"upgrade failed: {line.get('reason')}",
            hint="the master runs on with the code it had; its workers were not touched",
        )
    raise HandoffError("the master closed the connection before the upgrade ended")


@click.command()
@click.option("--ready", "what", flag_value="ready", default=True, help="Is it ready (default)?")
@click.option("--live", "what", flag_value="live", help="Is the master's loop turning?")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds to wait for the answer.",
)
@_locating
def probe(
    what: str, timeout: float, control: str | None, pidfile: str | None, name: str | None
) -> int:
    """Exit 0 if the master is ready (--live: answers at all), else 1: for Docker
    HEALTHCHECK and Kubernetes exec probes. Ready is what the health endpoint's /readyz says.
    """
    path = _path(control, pidfile, name)
    for line in exchange(path, {"cmd": "probe"}, timeout):
        _fail_on_error(line)
        if line.get("type") != "result":
            continue
        if what == "live":
            click.echo("live")
            return 0
        if line.get("ready") is True:
            click.echo("ready")
            return 0
        raise HandoffError(f"not ready: {line.get('reason')}")
    raise HandoffError("the master sent no answer")
