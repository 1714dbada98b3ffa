"""Integration harness: a real ``handoff run`` master, its JSON events, and real load.

The master's stderr is read by a thread into a list; tests wait for events with
deadlines (never fixed sleeps). Every process a test starts is killed in teardown: the
master's process group, and each worker's process group (workers have their own).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

from handoff.demo.load import LoadConfig, LoadGenerator, LoadStats

APPS = Path(__file__).parent / "apps"
Event = dict[str, Any]


class Master:
    """One ``python -m handoff run`` process and the events it logged."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        args: Sequence[str] = (),
        binds: Sequence[str] = ("127.0.0.1:0",),
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        argv = [sys.executable, "-m", "handoff", "run", "--log-format", "json"]
        for bind in binds:
            argv += ["--bind", bind]
        argv += [*args, "--", *command]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
        full_env.update(env or {})
        self.events: list[Event] = []
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._workers: dict[int, psutil.Process] = {}
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self._take(raw)
        with self._changed:
            self._changed.notify_all()

    def _take(self, raw: bytes) -> None:
        """Keep one line of the master's output (and its event, if it is one)."""
        line = raw.decode(errors="replace").rstrip("\n")
        event = None
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                event = json.loads(line)
        with self._changed:
            self.lines.append(line)
            if isinstance(event, dict) and "event" in event:
                self.events.append(event)
                if event["event"] == "worker.spawned":
                    with contextlib.suppress(psutil.Error):
                        self._workers[event["pid"]] = psutil.Process(event["pid"])
            self._changed.notify_all()

    # -- waiting -----------------------------------------------------------------------

    def wait_for(
        self,
        name: str,
        timeout: float = 30.0,
        *,
        after: int = 0,
        where: Callable[[Event], bool] = lambda e: True,
    ) -> Event:
        """The first event named `name` at index >= after matching `where`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self.events[after:]:
                    if event["event"] == name and where(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (
                    self.process.poll() is not None and not self._reader.is_alive()
                ):
                    raise AssertionError(self.diagnose(f"no {name} event within {timeout} s"))
                self._changed.wait(remaining)

    def wait_for_any(
        self, where: Callable[[Event], bool], timeout: float = 30.0, *, after: int = 0
    ) -> Event:
        """The first event, whatever its name, at index >= after matching `where`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self.events[after:]:
                    if where(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (
                    self.process.poll() is not None and not self._reader.is_alive()
                ):
                    raise AssertionError(self.diagnose(f"no matching event within {timeout} s"))
                self._changed.wait(remaining)

    def mark(self) -> int:
        """An index to wait for events logged from now on."""
        with self._changed:
            return len(self.events)

    def named(self, name: str, after: int = 0) -> list[Event]:
        with self._changed:
            return [e for e in self.events[after:] if e["event"] == name]

    def port(self) -> int:
        return int(self.wait_for("listener.bound")["port"])

    def wait_ready(self, timeout: float = 60.0) -> int:
        self.wait_for("master.ready", timeout)
        return self.port()

    def reload(self, timeout: float = 60.0) -> Event:
        """HUP and return the reload's outcome event (reload.succeeded or reload.failed)."""
        mark = self.mark()
        self.signal(signal.SIGHUP)
        return self._wait_outcome(mark, timeout)

    def _wait_outcome(self, mark: int, timeout: float) -> Event:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self.events[mark:]:
                    if event["event"] in ("reload.succeeded", "reload.failed"):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.process.poll() is not None:
                    raise AssertionError(self.diagnose(f"no reload outcome within {timeout} s"))
                self._changed.wait(remaining)

    def diagnose(self, problem: str) -> str:
        """The problem, the master's process tree with states, and the last output lines."""
        tree = []
        with contextlib.suppress(psutil.Error):
            master = psutil.Process(self.pid)
            for proc in [master, *master.children(recursive=True)]:
                with contextlib.suppress(psutil.Error), open(f"/proc/{proc.pid}/wchan") as f:
                    tree.append(f"  {proc.pid} {proc.status()} wchan={f.read()} {proc.name()}")
        tail = "\n".join(self.lines[-80:])
        return f"{problem}\nprocesses:\n" + "\n".join(tree) + f"\noutput:\n{tail}"

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = 60.0) -> int:
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        return code

    # -- processes ---------------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        with self._changed:
            return list(self._workers)

    def live_workers(self) -> list[psutil.Process]:
        with self._changed:
            procs = list(self._workers.values())
        return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def kill(self) -> None:
        """Teardown: SIGKILL the master's group and every worker's group still alive."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        for proc in self.live_workers():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


@contextlib.contextmanager
def running(command: Sequence[str], **kwargs: Any) -> Iterator[Master]:
    master = Master(command, **kwargs)
    try:
        yield master
    finally:
        master.kill()


class Load:
    """The project's asyncio load generator running in a background thread."""

    def __init__(
        self,
        port: int,
        *,
        keepalive: int = 4,
        fresh: int = 2,
        timeout_s: float = 10.0,
        host: str = "127.0.0.1",
    ) -> None:
        self.generator = LoadGenerator(
            LoadConfig(
                host=host,
                port=port,
                keepalive_clients=keepalive,
                fresh_clients=fresh,
                timeout_s=timeout_s,
            )
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def stats(self) -> LoadStats:
        return self.generator.stats

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._started.set()
            await self.generator.run(self._stop)

        asyncio.run(main())

    def __enter__(self) -> Load:
        self._thread.start()
        assert self._started.wait(10)
        return self

    def wait_for_requests(self, count: int, timeout: float = 30.0) -> None:
        """Block until `count` more requests have succeeded."""
        target = self.stats.ok + count
        deadline = time.monotonic() + timeout
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(
            self.generator.wait_until(lambda s: s.ok >= target), self._loop
        )
        future.result(max(0.0, deadline - time.monotonic()))

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "load generator did not stop"
