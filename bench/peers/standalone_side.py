"""A peer tool running the app on its own, reloaded its own way under load (tools.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from handoff.demo.drill import child_environment
from handoff.demo.load import LoadConfig, LoadGenerator, LoadStats

from .measure import Timeline
from .runs import (
    FAILED,
    GONE,
    KILL_WAIT_S,
    OK,
    REQUEST_TIMEOUT_S,
    STARTUP_TIMEOUT_S,
    STOP_TIMEOUT_S,
    PeerError,
    ReloadOutcome,
    RunContext,
    RunResult,
    assess,
)
from .scenarios import BAD_RELOAD, Pair, Scenario
from .server_logs import (
    GUNICORN_NOTABLE,
    LOG_TAIL_LINES,
    lines_of_reload,
    log_tail,
    notable_lines,
    read_lines,
)
from .tools import Tool, circusctl_reload, master_fifo


async def stop_group(process: asyncio.subprocess.Process, timeout_s: float) -> int | None:
    """SIGTERM the process group (gunicorn: graceful stop), SIGKILL it past timeout_s.

    Returns the leader's exit status if it stopped within timeout_s, else None. Whatever
    the leader did, the group (its workers) gets a final SIGKILL so that nothing is left.
    """
    exit_code: int | None = process.returncode
    if exit_code is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            exit_code = await asyncio.wait_for(process.wait(), timeout_s)
        except TimeoutError:
            exit_code = None
    # Workers of a gunicorn whose master died are still in its group (they never call
    # setsid), so this reaches them; ESRCH when the group is already empty.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.returncode is None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), KILL_WAIT_S)
    return exit_code


def version_seen(version: str) -> Callable[[LoadStats], bool]:
    def predicate(stats: LoadStats) -> bool:
        return version in stats.first_seen

    return predicate


class Standalone:
    """A tool (its leader process) started here, in its own process group; on a socket
    bound here when the tool does not own one (listener)."""

    def __init__(
        self,
        tool: Tool,
        argv: list[str],
        listener: socket.socket | None,
        log: Path,
        control_port: int,
    ) -> None:
        self.tool = tool
        self.argv = argv
        self.listener = listener
        self.log = log
        self.control_port = control_port  # circusd's control endpoint
        self.fifo = Path()  # uWSGI's master FIFO (uwsgi-chain)
        self.env: dict[str, str] = {}
        self.commands: list[asyncio.Task[None]] = []  # circusctl runs
        self.process: asyncio.subprocess.Process | None = None
        self.exited: asyncio.Task[int] | None = None
        self.exited_at: float | None = None  # time.monotonic()
        self.exit_code: int | None = None
        self.closed = False

    async def start(self, env: dict[str, str]) -> None:
        self.env = env
        with self.log.open("ab") as log_file:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                pass_fds=() if self.listener is None else (self.listener.fileno(),),
                env=env,
                start_new_session=True,
            )
        self.exited_at = None
        self.exited = asyncio.create_task(self._wait(self.process))

    async def _wait(self, process: asyncio.subprocess.Process) -> int:
        code = await process.wait()
        self.exited_at = time.monotonic()
        return code

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def gone(self) -> bool:
        return self.exited is not None and self.exited.done()

    def status(self) -> int | None:
        assert self.process is not None
        return self.process.returncode

    def check_alive(self, when: str) -> None:
        assert self.exited is not None
        if self.exited.done():
            code = self.exited.result()
            raise PeerError(f"{self.tool.key} exited (status {code}) {when}", log_tail(self.log))

    async def wait_serving(self, port: int) -> None:
        """Return once gunicorn answers one request with 200; the socket queues until then."""
        assert self.exited is not None
        probe = LoadGenerator(
            LoadConfig(port=port, keepalive_clients=1, fresh_clients=0, timeout_s=STARTUP_TIMEOUT_S)
        )
        stop = asyncio.Event()
        task = asyncio.create_task(probe.run(stop))
        # A tool that binds the port itself may not have yet: wait for an answer.
        answered = asyncio.create_task(probe.wait_until(lambda stats: stats.ok > 0))
        try:
            done, _ = await asyncio.wait(
                {answered, self.exited},
                timeout=STARTUP_TIMEOUT_S,
                return_when=asyncio.FIRST_COMPLETED,
            )
            self.check_alive("at start")
            if not done:
                raise PeerError(
                    f"{self.tool.key} did not answer within {STARTUP_TIMEOUT_S:g} s",
                    log_tail(self.log),
                )
        finally:
            answered.cancel()
            stop.set()
            await asyncio.gather(answered, return_exceptions=True)
            await asyncio.wait_for(task, REQUEST_TIMEOUT_S + KILL_WAIT_S)
        if probe.stats.ok == 0:
            errors = list(probe.stats.recent_errors)
            raise PeerError(f"{self.tool.key} failed: {errors}", log_tail(self.log))

    async def reload(
        self, generator: LoadGenerator, number: int, version: str, timeout_s: float
    ) -> ReloadOutcome:
        """Reload the tool its way; wait until the load sees version, the tool exits, or
        timeout_s."""
        assert self.exited is not None
        hup_at = time.monotonic()
        await self._trigger()
        assert self.exited is not None
        seen = asyncio.create_task(generator.wait_until(version_seen(version)))
        await asyncio.wait(
            {seen, self.exited}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        ended_at = time.monotonic()
        seen.cancel()
        await asyncio.gather(seen, return_exceptions=True)
        at = generator.stats.first_seen.get(version)
        took = at - hup_at if at is not None and at >= hup_at else None
        detail: str | None = None
        if took is None:
            if self.gone and self.exited_at is not None:
                detail = (
                    f"{self.tool.key} exited (status {self.status()}) "
                    f"{self.exited_at - hup_at:.2f} s after the reload"
                )
            else:
                detail = f"{version} did not answer within {timeout_s:g} s"
        return ReloadOutcome(
            number=number,
            release=version,
            outcome=OK if took is not None else FAILED,
            answered_after_s=took,
            detail=detail,
            started_at=hup_at,
            ended_at=ended_at,
        )

    async def _trigger(self) -> None:
        """What reloading means for this tool (tools.py)."""
        match self.tool.reload_by:
            case "signal":
                os.kill(self.pid, signal.SIGHUP)
            case "restart":
                assert self.process is not None
                await stop_group(self.process, STOP_TIMEOUT_S)
                await self.start(self.env)
            case "fifo":  # uWSGI's master FIFO: `c` is a chain reload
                fifo = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
                try:
                    os.write(fifo, b"c")
                finally:
                    os.close(fifo)
            case "circusctl":
                # Not awaited: the reload's end is when the load sees the new version.
                command = circusctl_reload(self.control_port)
                self.commands.append(asyncio.create_task(run_quietly(command, self.log)))
            case _:
                raise ValueError(self.tool.reload_by)

    async def reload_all(
        self, generator: LoadGenerator, version_file: Path, scenario: Scenario, ctx: RunContext
    ) -> list[ReloadOutcome]:
        """Each reload after ctx.args.seconds_between of load; none once gunicorn is gone."""
        args = ctx.args
        reloads: list[ReloadOutcome] = []
        for number in range(1, scenario.reloads(args.reloads) + 1):
            await asyncio.sleep(args.seconds_between)
            version = scenario.release(number)
            if self.gone:
                now = time.monotonic()
                reloads.append(
                    ReloadOutcome(
                        number=number,
                        release=version,
                        outcome=GONE,
                        answered_after_s=None,
                        detail=f"not sent: {self.tool.key} exited (status {self.status()}) before",
                        started_at=now,
                        ended_at=now,
                    )
                )
                ctx.say(f"{self.tool.key} reload {number}: {version} not sent, it is gone")
                continue
            version_file.write_text(version, encoding="utf-8")
            outcome = await self.reload(generator, number, version, args.reload_timeout)
            reloads.append(outcome)
            ctx.say(f"{self.tool.key} reload {number}: {version} {outcome.describe()}")
        return reloads

    async def close(self) -> int | None:
        """Stop gunicorn and its workers, whatever their state; return its exit status.

        Idempotent: the group is signalled once, so a later call cannot hit a reused pid.
        """
        if not self.closed:
            self.closed = True
            if self.process is not None:
                self.exit_code = await stop_group(self.process, STOP_TIMEOUT_S)
            if self.exited is not None:
                self.exited.cancel()
                await asyncio.gather(self.exited, return_exceptions=True)
        return self.exit_code


async def run_quietly(argv: list[str], log: Path) -> None:
    """Run a tool's own command to its end (bounded), its output appended to log."""
    with log.open("ab") as log_file:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file
        )
    try:
        await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()


def free_port() -> int:
    """A loopback port free now (for a tool that binds its own)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def socket_for(tool: Tool) -> tuple[socket.socket | None, int]:
    """The socket bound here for a tool that does not bind its own, and the port."""
    if tool.owns_socket:
        return None, free_port()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(socket.SOMAXCONN)
    return listener, int(listener.getsockname()[1])


async def run_standalone(tool: Tool, scenario: Scenario, pair: Pair, ctx: RunContext) -> RunResult:
    """The tool alone, reloaded args.reloads times its own way, under load."""
    args, workdir, say, maxima = ctx.args, ctx.workdir, ctx.say, ctx.maxima
    name = f"{scenario.key}-{pair.key}-{tool.key}"
    version_file = workdir / f"version-{name}"
    version_file.write_text(scenario.release(0), encoding="utf-8")
    log = workdir / f"{name}.log"
    log.write_bytes(b"")
    stop = asyncio.Event()
    load_task: asyncio.Task[LoadStats] | None = None
    sampler: asyncio.Task[None] | None = None
    listener, port = socket_for(tool)
    control = (free_port(), free_port())
    argv = tool.argv(port, pair, workdir, listener.fileno() if listener else -1, control)
    server = Standalone(tool, argv, listener, log, control[0])
    server.fifo = master_fifo(workdir, port)
    try:
        await server.start(child_environment({"VERSION_FILE": str(version_file)}))
        if listener is not None:
            # The tool holds the socket now; from here on it is open only while it is.
            listener.close()
        await server.wait_serving(port)
        say(f"{tool.key} {server.pid} serving on 127.0.0.1:{port}")
        generator = LoadGenerator(
            LoadConfig(
                port=port,
                keepalive_clients=args.keepalive_clients,
                fresh_clients=args.fresh_clients,
                timeout_s=REQUEST_TIMEOUT_S,
                generation_header="x-handoff-version",
            )
        )
        maxima.track(generator.stats)
        timeline = Timeline(generator.stats)
        load_task = asyncio.create_task(generator.run(stop))
        sampler = asyncio.create_task(timeline.run())
        reloads = await server.reload_all(generator, version_file, scenario, ctx)
        await asyncio.sleep(scenario.final_load_s(args.reloads, args.seconds_between))
        stop.set()
        stats = await asyncio.wait_for(load_task, REQUEST_TIMEOUT_S + KILL_WAIT_S)
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        timeline.finish()
        exited_during_run = server.gone
        exited_at = server.exited_at
        say(f"stopping {tool.key}" if not server.gone else f"{tool.key} already gone")
        exit_code = await server.close()
        serving_after_bad, serving_at_end, versions, assessed = assess(
            scenario, timeline, reloads, lambda key: key
        )
        lines = read_lines(log)
        return RunResult(
            side=tool.key,
            load=stats,
            reloads=reloads,
            exit_code=exit_code,
            serving_after_bad=serving_after_bad,
            serving_at_end=serving_at_end,
            versions_at_end=versions,
            max_latency_ms=maxima.of(stats),
            longest_gap_s=timeline.longest_gap_s(),
            timeline=timeline,
            detail={
                "command": list(server.argv),
                "port": port,
                "exited_during_run": exited_during_run,
                "load_s_after_exit": (
                    round(stats.stopped_at - exited_at, 3)
                    if exited_during_run and exited_at is not None and stats.stopped_at is not None
                    else None
                ),
                "versions_seen": dict(stats.by_generation),
                **assessed,
                "log_notable": notable_lines(lines, GUNICORN_NOTABLE),
                "log_bad_reload": (
                    lines_of_reload(lines, BAD_RELOAD) if scenario.bad_release else []
                ),
                "log_tail": lines[-LOG_TAIL_LINES:],
            },
        )
    finally:
        stop.set()
        for task in (load_task, sampler, *server.commands):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await server.close()
        if listener is not None:
            listener.close()
