"""Reload drills: a real handoff master under load, reloaded again and again.

Not part of the master: `handoff demo`, the benchmarks in bench/ and the integration tests
use it to show with numbers that a reload refuses no connection and that a broken release
never replaces a working one. The master runs as a child process (master_process), exactly
as an operator would start it; its JSON log lines are the only thing the drill relies on.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from handoff.demo.load import LoadConfig, LoadGenerator, LoadStats
from handoff.demo.master_process import (
    KILL_WAIT_S,
    MasterOutput,
    bound_port,
    event_number,
    kill_everything,
    start_master,
    stop_master,
)
from handoff.formats import worker_contract
from handoff.formats.log_events import EventName


@dataclass(frozen=True, slots=True, kw_only=True)
class DrillConfig:
    """What to run under handoff and how to reload it."""

    command: tuple[str, ...]
    workers: int = 2
    reloads: int = 5
    ready: str = "notify"
    settle_s: float = 1.0  # load time before each reload and after the last one
    extra_args: tuple[str, ...] = ()  # more `handoff run` options
    keepalive_clients: int = 8
    fresh_clients: int = 4
    request_timeout_s: float = 5.0
    startup_timeout_s: float = 60.0
    reload_timeout_s: float = 60.0
    stop_timeout_s: float = 60.0
    env: Mapping[str, str] | None = None  # added to (and overriding) our environment
    before_reload: Callable[[int], None] | None = None  # called with the reload number
    # Reload through this control socket (as `handoff reload --wait` does) instead of
    # SIGHUP, showing its progress lines; None: SIGHUP.
    control_path: str | None = None
    after_reloads: Callable[[], None] | None = None  # called once the last reload settled


@dataclass(slots=True, kw_only=True)
class ReloadRecord:
    """One SIGHUP and how it ended."""

    number: int
    gen: int | None
    ok: bool
    duration_s: float | None  # as the master reported it
    observed_s: float  # from SIGHUP until the master's reload.succeeded/failed line
    served_after_s: float | None  # from SIGHUP until the load first saw the new generation
    reason: str | None
    hup_at: float = field(repr=False)  # time.monotonic()

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-serialisable form."""
        return {
            "number": self.number,
            "gen": self.gen,
            "ok": self.ok,
            "duration_s": self.duration_s,
            "observed_s": round(self.observed_s, 6),
            "served_after_s": self.served_after_s,
            "reason": self.reason,
        }


@dataclass(slots=True, kw_only=True)
class DrillResult:
    """Everything a drill measured."""

    load: LoadStats
    reloads: list[ReloadRecord]
    expected_reloads: int
    generations_seen: dict[str, int]
    master_exit_code: int | None
    port: int
    output_tail: list[str]

    def ok(self) -> bool:
        """Return True for zero failed requests, every reload done and ok, exit 0."""
        return (
            self.load.total_failures() == 0
            and len(self.reloads) == self.expected_reloads
            and all(record.ok for record in self.reloads)
            and self.master_exit_code == 0
        )

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-serialisable form."""
        return {
            "ok": self.ok(),
            "port": self.port,
            "master_exit_code": self.master_exit_code,
            "load": self.load.to_dict(),
            "reloads": [record.to_dict() for record in self.reloads],
            "generations_seen": dict(self.generations_seen),
        }


def child_environment(extra: Mapping[str, str] | None) -> dict[str, str]:
    """Return our environment without the outer service manager's variables, plus extra.

    A master (or bare server) that inherited LISTEN_* or NOTIFY_SOCKET would adopt
    systemd's sockets or tell systemd it is ready.
    """
    env = worker_contract.clean_environment(os.environ)
    env.update(extra or {})
    return env


def _master_argv(config: DrillConfig) -> list[str]:
    fixed: tuple[str, ...] = (
        *("--log-format", "json", "--bind", "127.0.0.1:0", "--workers", str(config.workers)),
        *(("--control", config.control_path) if config.control_path is not None else ()),
    )
    return [
        *(sys.executable, "-m", "handoff", "run", *fixed, "--ready", config.ready),
        *(*config.extra_args, "--", *config.command),
    ]


async def _ask_reload(
    config: DrillConfig,
    process: asyncio.subprocess.Process,
    output: MasterOutput,
    number: int,
    say: Callable[[str], None],
) -> ReloadRecord:
    """One reload, by SIGHUP or over the control socket; its record from the events."""
    if config.control_path is None:
        say(f"reload {number}: SIGHUP")
        return await _reload(process, output, number, config.reload_timeout_s)
    say(f"reload {number}: handoff reload --wait")
    asked = asyncio.to_thread(_control_reload, config.control_path, say, config.reload_timeout_s)
    record, _ = await asyncio.gather(
        _reload(process, output, number, config.reload_timeout_s, signal_it=False), asked
    )
    return record


def _control_reload(path: str, say: Callable[[str], None], timeout_s: float) -> None:
    """Ask for a reload over the control socket and show its progress lines."""
    from handoff.cli.control_client import exchange  # noqa: PLC0415

    for line in exchange(path, {"cmd": "reload", "wait": True}, timeout_s):
        if line.get("type") == "progress":
            say(f"  {line.get('message')}")


async def _reload(
    process: asyncio.subprocess.Process,
    output: MasterOutput,
    number: int,
    timeout_s: float,
    *,
    signal_it: bool = True,
) -> ReloadRecord:
    hup_at = time.monotonic()
    if signal_it:
        process.send_signal(signal.SIGHUP)
    outcomes = frozenset({EventName.RELOAD_SUCCEEDED, EventName.RELOAD_FAILED})
    try:
        event = await output.next_event(outcomes, hup_at + timeout_s, "reload outcome")
    except TimeoutError:
        event = {"event": "-", "reason": f"no {' or '.join(sorted(outcomes))} in {timeout_s:g} s"}
    gen = event_number(event, "gen")
    reason = event.get("reason")
    return ReloadRecord(
        number=number,
        gen=int(gen) if gen is not None else None,
        ok=event["event"] == EventName.RELOAD_SUCCEEDED,
        duration_s=event_number(event, "duration_s"),
        observed_s=time.monotonic() - hup_at,
        served_after_s=None,
        reason=str(reason) if reason is not None else None,
        hup_at=hup_at,
    )


async def run_drill(
    config: DrillConfig,
    progress: Callable[[str], None] | None = None,
    *,
    on_load_started: Callable[[LoadStats], None] | None = None,
    on_ready: Callable[[int], None] | None = None,
) -> DrillResult:
    """Start a master, put it under load, reload it config.reloads times, stop it.

    progress receives one line per step; on_load_started receives the live load
    statistics once the load runs (for a progress display); on_ready the master's pid once
    its first generation serves (to look at the master from outside: bench/soak.py).

    Raises:
        DrillError (from master_process): the master never became ready, or exited in the
            middle.
    """
    say = progress or (lambda _line: None)
    process, output = await start_master(_master_argv(config), child_environment(config.env))
    stop = asyncio.Event()
    load_task: asyncio.Task[LoadStats] | None = None
    try:
        deadline = time.monotonic() + config.startup_timeout_s
        try:
            bound = await output.next_event(
                frozenset({EventName.LISTENER_BOUND}), deadline, EventName.LISTENER_BOUND
            )
            await output.next_event(
                frozenset({EventName.GENERATION_ACTIVE}), deadline, "ready workers"
            )
        except TimeoutError as exc:
            raise output.error(f"{exc} within {config.startup_timeout_s:g} s of start") from None
        port = bound_port(bound)
        say(f"master {process.pid} ready on 127.0.0.1:{port} with {config.workers} workers")
        if on_ready is not None:
            on_ready(process.pid)

        generator = LoadGenerator(
            LoadConfig(
                port=port,
                keepalive_clients=config.keepalive_clients,
                fresh_clients=config.fresh_clients,
                timeout_s=config.request_timeout_s,
            )
        )
        if on_load_started is not None:
            on_load_started(generator.stats)
        load_task = asyncio.create_task(generator.run(stop))
        records: list[ReloadRecord] = []
        for number in range(1, config.reloads + 1):
            await output.watch(config.settle_s)
            if config.before_reload is not None:
                config.before_reload(number)
            record = await _ask_reload(config, process, output, number, say)
            records.append(record)
            outcome = "ok" if record.ok else f"FAILED ({record.reason})"
            say(f"reload {number}: generation {record.gen} {outcome} in {record.observed_s:.2f} s")
            if record.gen is None:
                break  # the master is in an unknown state: more reloads prove nothing
        await output.watch(config.settle_s)
        if config.after_reloads is not None:
            await asyncio.to_thread(config.after_reloads)

        stop.set()
        stats = await asyncio.wait_for(load_task, config.request_timeout_s + KILL_WAIT_S)
        say("stopping the master (SIGTERM)")
        exit_code = await stop_master(process, config.stop_timeout_s)
        for record in records:
            seen = stats.first_seen.get(str(record.gen))
            if seen is not None and seen >= record.hup_at:
                record.served_after_s = seen - record.hup_at
        return DrillResult(
            load=stats,
            reloads=records,
            expected_reloads=config.reloads,
            generations_seen=dict(stats.by_generation),
            master_exit_code=exit_code,
            port=port,
            output_tail=list(output.tail),
        )
    finally:
        stop.set()
        if load_task is not None and not load_task.done():
            load_task.cancel()
            await asyncio.gather(load_task, return_exceptions=True)
        await kill_everything(process, output)


# Bare runs: the same command without handoff, for comparison. The socket is bound by
# the caller and handed over exactly as handoff would: at fd 3, and either named in the
# arguments ({fd}) or described by LISTEN_FDS with LISTEN_PID. LISTEN_PID must be the
# server's own pid, which only the child knows: a tiny Python trampoline moves the socket
# to fd 3, sets LISTEN_PID to its pid, and execs the command, which keeps that pid.
_TRAMPOLINE: Final = """\
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
if "LISTEN_FDS" in os.environ:
    os.environ["LISTEN_PID"] = str(os.getpid())
os.execvp(sys.argv[2], sys.argv[2:])
"""


async def spawn_with_listener(
    command: tuple[str, ...],
    listener: socket.socket,
    env: Mapping[str, str],
    *,
    quiet: bool = False,
) -> asyncio.subprocess.Process:
    """Start command in a new session with listener at fd 3, the way handoff does.

    {fd} placeholders in command become 3; without any, LISTEN_FDS=1 and LISTEN_PID
    describe the socket instead (both at once would make gunicorn adopt it twice).
    quiet sends the command's stdout and stderr to /dev/null instead of ours.
    """
    fd = listener.fileno()
    output = asyncio.subprocess.DEVNULL if quiet else None
    child_env = {k: v for k, v in env.items() if k not in ("LISTEN_FDS", "LISTEN_PID")}
    if not worker_contract.names_sockets_in_argv(command):
        child_env |= {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",  # the trampoline needs nothing from the user's site or PYTHON* variables
        "-c",
        _TRAMPOLINE,
        str(fd),
        *worker_contract.expand_placeholders(command, 1),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=output,
        stderr=output,
        pass_fds=(fd,),
        env=child_env,
        start_new_session=True,
    )
