"""A handoff master run as a child process, as an operator would start it.

The master runs in its own session; its stdout and stderr are read without pause, and
its JSON log lines are the only thing the drill relies on: they arrive here as events.
Stopping it leaves nothing behind, whatever state it is in.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import time
from collections.abc import Mapping
from typing import Final

from handoff.formats.log_events import EventName

KILL_WAIT_S: Final = 10.0
_TAIL_LINES: Final = 50
_LINE_LIMIT: Final = 1024 * 1024
_OUTPUT_DRAIN_S: Final = 1.0

Event = dict[str, object]


class DrillError(Exception):
    """The drill could not run: the master did not start, or died under it."""

    def __init__(self, message: str, output_tail: list[str]) -> None:
        super().__init__(message)
        self.output_tail = output_tail


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


def event_number(event: Event, key: str) -> float | None:
    """Return the event's numeric field key, or None if it is absent or not a number."""
    value = event.get(key)
    return float(value) if isinstance(value, int | float) else None


def bound_port(event: Event) -> int:
    """Return the port of a listener.bound event."""
    port = event.get("port")
    if isinstance(port, int):
        return port
    address = str(event.get("address", ""))
    _, _, tail = address.rpartition(":")
    if tail.isdigit():
        return int(tail)
    raise ValueError(f"listener.bound has no port: {event!r}")


class MasterOutput:
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


async def start_master(
    argv: list[str], env: Mapping[str, str]
) -> tuple[asyncio.subprocess.Process, MasterOutput]:
    """Start the master (argv) in its own session, its output piped to a MasterOutput."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=True,
        limit=_LINE_LIMIT,
    )
    return process, MasterOutput(process)


async def stop_master(process: asyncio.subprocess.Process, timeout_s: float) -> int | None:
    """SIGTERM the master; return its exit status, or None if it ran on past timeout_s."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(process.wait(), timeout_s)
    except TimeoutError:
        return None


async def kill_everything(process: asyncio.subprocess.Process, output: MasterOutput) -> None:
    """Leave nothing behind, whatever state the master is in."""
    killed = process.returncode is None
    if killed:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), KILL_WAIT_S)
    if killed or process.returncode != 0:
        # The master did not clean up: its workers run in their own sessions, so
        # killing its group did not reach them. A pid is checked to still lead its own
        # group (as a worker does) before the group is killed.
        for pid in output.worker_pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
    await output.close()
