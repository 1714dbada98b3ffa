"""``handoff reload``, ``status``, ``stop``, ``scale``, ``upgrade`` and ``probe``: control
clients.

Failures raise HandoffError; the CLI group prints them as
``handoff: error: …`` with a hint and exits with their code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click

from handoff.cli.control_client import exchange, locate, wait_for_exit
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
            default=120.0,
            show_default=True,
            help="Seconds to wait for the result.",
        )(command)
        return click.option("--wait/--no-wait", default=True, show_default=True, help=what)(command)

    return add


def _path(control: str | None, pidfile: str | None, name: str | None) -> str:
    return locate(control=control, pidfile=pidfile, name=name, environ=os.environ, uid=os.geteuid())


def _fail_on_error(line: Mapping[str, object]) -> None:
    if line.get("type") == "error":
        raise HandoffError(
            str(line.get("error")), hint=str(line["hint"]) if line.get("hint") else None
        )


@click.command()
@_waiting("Stream progress and wait until the new generation serves or fails.")
@_locating
def reload(
    wait: bool, timeout: float, control: str | None, pidfile: str | None, name: str | None
) -> int:
    """Reload: start a new generation; exit 0 once it serves, 1 if it failed."""
    path = _path(control, pidfile, name)
    for line in exchange(path, {"cmd": "reload", "wait": wait}, timeout):
        _fail_on_error(line)
        if line.get("type") == "progress":
            click.echo(f"  {line.get('message')}")
        elif line.get("type") == "result":
            if not wait:
                click.echo(f"reload {line.get('accepted')}")
                return 0
            if line.get("ok"):
                gen, duration = line.get("gen"), line.get("duration_s")
                click.echo(f"reload succeeded: generation {gen} serving ({duration} s)")
                return 0
            output = last_output(line)
            for shown in output:
                click.echo(shown, err=True)  # under systemd: in the journal, in `status`
            raise HandoffError(
                f"reload failed: {line.get('reason')}",
                hint="the old generation is still serving; the worker's last output is "
                + ("above" if output else "in the master's log"),
            )
    raise HandoffError("the master closed the connection before the reload ended")


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
    wait: bool, timeout: float, control: str | None, pidfile: str | None, name: str | None
) -> int:
    """Upgrade the master itself to the handoff installed now: same pid, workers untouched.

    The new code first runs as a pre-flight; only if it passes does the master exec it.
    Exit 0 once the master runs it, 1 if the pre-flight failed (the old master runs on).
    """
    path = _path(control, pidfile, name)
    for line in exchange(path, {"cmd": "upgrade", "wait": wait}, timeout):
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


def last_output(result: Mapping[str, object]) -> list[str]:
    """The failing worker's last lines in a reload's result (``output``), indented under a
    heading that names it; none if the master did not read them (direct output)."""
    output = result.get("output")
    if not isinstance(output, list) or not output:
        return []
    who = f"worker {result.get('worker')} (pid {result.get('pid')})" if "pid" in result else ""
    heading = f"  last output of {who or 'the worker'}, generation {result.get('gen')}:"
    return [heading, *(f"  | {text}" for text in output)]


def render_status(report: Mapping[str, Any]) -> str:
    """The status as a readable table."""
    master = report["master"]
    sockets = ", ".join(s["address"] for s in master["sockets"])
    lines = [
        f"master   pid {master['pid']}  {master['name']}  {master['state']}  "
        f"up {master['uptime_s']:.0f} s  ready={master['ready']}  workers={master['workers']}",
        f"sockets  {sockets}",
        f"control  {master['control']}",
    ]
    last = report.get("last_reload")
    if last:
        outcome = "ok" if last["ok"] else f"failed: {last['reason']}"
        lines.append(f"reload   generation {last['gen']} {outcome} ({last['duration_s']} s)")
        lines.extend(last_output(last))
    lines.append("")
    lines.append(
        f"{'gen':>4} {'state':<9} {'worker':>6} {'pid':>8} {'state':<9} {'age s':>8} "
        f"{'cpu s':>7} {'rss MiB':>8} {'conns':>6} {'procs':>5}"
    )
    for gen in report["generations"]:
        for worker in gen["workers"] or [None]:
            if worker is None:
                lines.append(f"{gen['gen']:>4} {gen['state']:<9} {'-':>6}")
                continue
            lines.append(
                f"{gen['gen']:>4} {gen['state']:<9} {worker['worker']:>6} {worker['pid']:>8} "
                f"{worker['state']:<9} {worker['age_s']:>8.1f} {worker['cpu_s']:>7.2f} "
                f"{worker['rss_bytes'] / 1048576:>8.1f} {worker['connections']:>6} "
                f"{worker['processes']:>5}"
            )
    return "\n".join(lines)
