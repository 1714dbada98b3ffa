"""Reload drills: a real handoff master under load, reloaded again and again.

Not part of the master: `handoff demo`, bench/reload.py and the integration tests use it
to show the promise of design §2 with numbers. The master runs as a child process in its
own session, exactly as an operator would start it; its JSON log lines on stderr are the
only thing the drill relies on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from handoff.demo.load import LoadConfig, LoadGenerator, LoadStats
from handoff.formats import worker_contract as protocol
from handoff.formats.log_events import EventName

_TAIL_LINES: Final = 50
_LINE_LIMIT: Final = 1024 * 1024
_OUTPUT_DRAIN_S: Final = 1.0
_KILL_WAIT_S: Final = 10.0

Event = dict[str, object]


class DrillError(Exception):
    """The drill could not run: the master did not start, or died under it."""

    def __init__(self, message: str, output_tail: list[str]) -> None:
        super().__init__(message)
        self.output_tail = output_tail


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


def clean_environment(extra: Mapping[str, str] | None) -> dict[str, str]:
    """Return our environment without the outer service manager's variables, plus extra.

    A master (or bare server) that inherited LISTEN_* or NOTIFY_SOCKET would adopt
    systemd's sockets or tell systemd it is ready.
    """
    env = protocol.clean_environment(os.environ)
    env.update(extra or {})
    return env


def _parse_event(line: str) -> Event | None:
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    if isinstance(value, dict) and isinstance(value.get("event"), str):
        return value
    return None


def _number(event: Event, key: str) -> float | None:
    value = event.get(key)
    return float(value) if isinstance(value, int | float) else None


def _port_of(event: Event) -> int:
    port = event.get("port")
    if isinstance(port, int):
        return port
    address = str(event.get("address", ""))
    _, _, tail = address.rpartition(":")
    if tail.isdigit():
        return int(tail)
    raise ValueError(f"listener.bound has no port: {event!r}")


class _MasterOutput:
    """The master's stdout and stderr: events queued, recent lines kept for errors."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self.worker_pids: set[int] = set()
        # None means the master process has exited.
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._exited = False
        self._readers = [
            asyncio.create_task(self._pump(stream))
            for stream in (process.stdout, process.stderr)
            if stream is not None
        ]
        self._watcher = asyncio.create_task(self._watch_exit())

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        # Read without pause: the master writes its log synchronously, so a full pipe
        # would stall it in the middle of a reload.
        while True:
            try:
                raw = await stream.readline()
            except ValueError:
                self.tail.append("<a line longer than 1 MiB>")
                continue
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.tail.append(line)
            event = _parse_event(line)
            if event is not None:
                if event["event"] == EventName.WORKER_SPAWNED and isinstance(event.get("pid"), int):
                    self.worker_pids.add(int(str(event["pid"])))
                self._events.put_nowait(event)

    async def _watch_exit(self) -> None:
        await self.process.wait()
        # The pipes may still hold its last words (a traceback); give them a moment.
        # Workers that outlive the master keep the pipes open, hence the bound.
        await asyncio.wait(self._readers, timeout=_OUTPUT_DRAIN_S)
        self._events.put_nowait(None)

    def error(self, message: str) -> DrillError:
        return DrillError(message, list(self.tail))

    async def next_event(self, names: frozenset[str], deadline: float, what: str) -> Event:
        """Return the next event named in names; TimeoutError past deadline (monotonic)."""
        while True:
            if self._exited:
                code = self.process.returncode
                raise self.error(f"the master exited (status {code}) while waiting for {what}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {what}")
            try:
                event = await asyncio.wait_for(self._events.get(), remaining)
            except TimeoutError:
                raise TimeoutError(f"no {what}") from None
            if event is None:
                self._exited = True
            elif event["event"] in names:
                return event

    async def watch(self, seconds: float) -> None:
        """Let seconds pass; raise DrillError if the master exits meanwhile."""
        with contextlib.suppress(TimeoutError):
            await self.next_event(frozenset(), time.monotonic() + seconds, "nothing")

    async def close(self) -> None:
        for task in (*self._readers, self._watcher):
            task.cancel()
        await asyncio.gather(*self._readers, self._watcher, return_exceptions=True)


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
    output: _MasterOutput,
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
    output: _MasterOutput,
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
    gen = _number(event, "gen")
    reason = event.get("reason")
    return ReloadRecord(
        number=number,
        gen=int(gen) if gen is not None else None,
        ok=event["event"] == EventName.RELOAD_SUCCEEDED,
        duration_s=_number(event, "duration_s"),
        observed_s=time.monotonic() - hup_at,
        served_after_s=None,
        reason=str(reason) if reason is not None else None,
        hup_at=hup_at,
    )


async def _stop_master(process: asyncio.subprocess.Process, timeout_s: float) -> int | None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(process.wait(), timeout_s)
    except TimeoutError:
        return None


async def _kill_everything(process: asyncio.subprocess.Process, output: _MasterOutput) -> None:
    """Leave nothing behind, whatever state the master is in."""
    killed = process.returncode is None
    if killed:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), _KILL_WAIT_S)
    if killed or process.returncode != 0:
        # The master did not clean up: its workers run in their own sessions, so
        # killing its group did not reach them. A pid is checked to still lead its own
        # group (as a worker does) before the group is killed.
        for pid in output.worker_pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
    await output.close()


async def run_drill(
    config: DrillConfig,
    progress: Callable[[str], None] | None = None,
    *,
    on_load_started: Callable[[LoadStats], None] | None = None,
) -> DrillResult:
    """Start a master, put it under load, reload it config.reloads times, stop it.

    progress receives one line per step; on_load_started receives the live load
    statistics once the load runs (for a progress display).

    Raises:
        DrillError: the master never became ready, or exited in the middle.
    """
    say = progress or (lambda _line: None)
    process = await asyncio.create_subprocess_exec(
        *_master_argv(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_environment(config.env),
        start_new_session=True,
        limit=_LINE_LIMIT,
    )
    output = _MasterOutput(process)
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
        port = _port_of(bound)
        say(f"master {process.pid} ready on 127.0.0.1:{port} with {config.workers} workers")

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
        stats = await asyncio.wait_for(load_task, config.request_timeout_s + _KILL_WAIT_S)
        say("stopping the master (SIGTERM)")
        exit_code = await _stop_master(process, config.stop_timeout_s)
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
        await _kill_everything(process, output)


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
    if not protocol.names_sockets_in_argv(command):
        child_env |= {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",  # the trampoline needs nothing from the user's site or PYTHON* variables
        "-c",
        _TRAMPOLINE,
        str(fd),
        *protocol.expand_placeholders(command, 1),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=output,
        stderr=output,
        pass_fds=(fd,),
        env=child_env,
        start_new_session=True,
    )
