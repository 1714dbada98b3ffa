"""``handoff upgrade``: the pre-flight that decides whether the master may exec new code.

The master runs the code now on disk as a child, with the same command line and the
state it would hand over (``HANDOFF_PREFLIGHT``): the new code must import, parse the
options, read the state and say so on its stdout within ``PREFLIGHT_TIMEOUT_S``. Only
then does the master exec it in place (master/reexec.py). A failed pre-flight leaves the
running master as it was, and its reason goes to the log and to ``handoff upgrade``.

The child side is ``run_preflight``, called by ``handoff run`` when the variable is set.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Final, TextIO

from handoff.core.model import Pid
from handoff.core.snapshot import SnapshotError
from handoff.errors import SpawnError
from handoff.formats.log_events import EventName, Level
from handoff.formats.worker_contract import FIRST_LISTEN_FD
from handoff.master.logs import emit
from handoff.master.reexec import exec_in_place
from handoff.master.resume_state import (
    PREFLIGHT_VARIABLE,
    ResumeState,
    take,
    this_version,
    write_memfd,
)
from handoff.master.sources import Source, Sources, Watch
from handoff.master.system import System
from handoff.system.children import Child, SpawnRequest

PREFLIGHT_TIMEOUT_S: Final = 30.0
_MAX_OUTPUT: Final = 64 * 1024
_MARK: Final = "handoff-preflight"


@dataclass(slots=True)
class Preflight:
    child: Child
    output: int  # the read end of its stdout and stderr
    deadline: float


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    version: str
    reason: str


def start(system: System, state: ResumeState, environ: Mapping[str, str], now: float) -> Preflight:
    """Run the code on disk against this state; raise SpawnError if it cannot start."""
    memfd = write_memfd(state)
    read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        env = {**environ, PREFLIGHT_VARIABLE: str(FIRST_LISTEN_FD)}
        child = system.spawn(
            SpawnRequest(
                executable=sys.executable,
                argv=sys.orig_argv,
                env=env,
                listen_fds=[memfd],  # the state lands on fd 3
                output=write_end,
            )
        )
    except SpawnError:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
        os.close(memfd)
    return Preflight(child, read_end, now + PREFLIGHT_TIMEOUT_S)


def verdict(preflight: Preflight, exit_code: int | None, *, timed_out: bool = False) -> Verdict:
    """Read what the pre-flight said (bounded) and decide."""
    data = b""
    with contextlib.suppress(OSError):
        while len(data) <= _MAX_OUTPUT and (chunk := os.read(preflight.output, 8192)):
            data += chunk
    with contextlib.suppress(OSError):
        os.close(preflight.output)
    lines = [line.strip() for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    said: dict[str, object] = {}
    for line in lines:
        with contextlib.suppress(ValueError):
            parsed = json.loads(line)
            if isinstance(parsed, dict) and _MARK in parsed:
                said = parsed
    version = str(said.get("version", ""))
    if timed_out:
        return Verdict(
            False, version, f"the pre-flight did not finish in {PREFLIGHT_TIMEOUT_S:g} s"
        )
    if exit_code == 0 and said.get(_MARK) == "ok":
        return Verdict(True, version, "")
    reason = str(said.get("reason") or (lines[-1] if lines else ""))
    how = f"exited {exit_code}" if exit_code is not None else "was killed"
    return Verdict(False, version, f"the new code failed its pre-flight ({how}): {reason}"[:1000])


def run_preflight(environ: MutableMapping[str, str], out: TextIO) -> int:
    """The child side: read the state the master would hand over; say ok or why not."""
    try:
        state = take(environ, PREFLIGHT_VARIABLE)
        reason = "no state given" if state is None else ""
    except SnapshotError as exc:
        state, reason = None, str(exc)
    if state is None:
        out.write(json.dumps({_MARK: "failed", "reason": reason, "version": this_version()}))
        out.write("\n")
        return 1
    out.write(json.dumps({_MARK: "ok", "version": this_version(), "was": state.version}) + "\n")
    return 0


class Upgrades:
    """The upgrade pre-flight in progress, if one is: started, watched, judged, and on a
    pass the exec. capture builds the state to hand over; answer tells the control
    clients waiting for the upgrade how it ended."""

    def __init__(
        self,
        system: System,
        sources: Sources,
        capture: Callable[[], ResumeState],
        answer: Callable[..., None],
    ) -> None:
        self._system = system
        self._sources = sources
        self._capture = capture
        self._answer = answer
        self._running: Preflight | None = None

    def succeeded(self, was: str) -> None:
        """This master is the upgrade's new code, taken over: say so, to the clients too."""
        emit(EventName.UPGRADE_SUCCEEDED, version=this_version(), was=was)
        self._answer(ok=True, version=this_version(), was=was)

    def pids(self) -> list[Pid]:
        return [] if self._running is None else [self._running.child.pid]

    def next_deadline(self) -> float | None:
        return None if self._running is None else self._running.deadline

    def request(self, source: str, *, stopping: bool, now: float) -> str | None:
        """Start the pre-flight, unless one runs already; why not, if it cannot."""
        if stopping:
            refused = "the master is stopping"
            emit(EventName.UPGRADE_REFUSED, Level.WARNING, source=source, reason=refused)
            return refused
        if self._running is not None:
            return None
        emit(EventName.UPGRADE_REQUESTED, source=source, version=this_version())
        try:
            self._running = start(self._system, self._capture(), os.environ, now)
        except (SpawnError, OSError) as exc:
            reason = exc.message if isinstance(exc, SpawnError) else exc.strerror or str(exc)
            self._failed(f"cannot start the pre-flight: {reason}")
            return reason
        self._sources.watch(self._running.child.pidfd, Watch(Source.UPGRADE))
        return None

    def on_exit(self) -> None:
        """The pre-flight's pidfd is readable: judge it once it has exited."""
        running = self._running
        if running is None:
            return
        status = self._system.reap(running.child)
        if status is not None:
            self._forget(running)
            self._conclude(verdict(running, status.code))

    def expire(self, now: float) -> None:
        running = self._running
        if running is not None and now >= running.deadline:
            self._kill(running)
            self._conclude(verdict(running, None, timed_out=True))

    def cancel(self) -> None:
        running = self._running
        if running is not None:
            self._kill(running)
            os.close(running.output)

    def _conclude(self, judged: Verdict) -> None:
        """Exec the new code if the pre-flight passed (never returns then); else say why."""
        if not judged.ok:
            self._failed(judged.reason)
            return
        emit(EventName.MASTER_REEXECUTING, reason="upgrade", version=judged.version)
        try:
            exec_in_place(self._capture(), os.environ)
        except OSError as exc:
            self._failed(f"cannot exec the new code: {exc.strerror}")

    def _failed(self, reason: str) -> None:
        emit(EventName.UPGRADE_FAILED, Level.ERROR, reason=reason, version=this_version())
        self._answer(ok=False, reason=reason)

    def _kill(self, running: Preflight) -> None:
        self._system.kill_tree(running.child.pid)
        self._system.reap(running.child, block=True)
        self._forget(running)

    def _forget(self, running: Preflight) -> None:
        self._sources.unwatch(running.child.pidfd)
        running.child.close()
        self._running = None
