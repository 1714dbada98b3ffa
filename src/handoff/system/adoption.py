"""What the kernel shows of the master's children, for a master that re-executed in place.

``execve`` keeps the pid, so every child is still the master's child (it may wait for
them, and pidfds can be opened again). Which worker each one is comes from its own
environment, which the master wrote at spawn: ``HANDOFF_GENERATION`` and
``HANDOFF_WORKER``; an ``exec:`` probe also has ``HANDOFF_WORKER_PID``. A child that
already exited is a zombie with an empty environment: it is reported as unknown, to be
reaped.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Final

from handoff.core.model import GenId, Pid

_MAX_ENVIRON: Final = 1 << 20  # read at most this much of a child's environment


@dataclass(frozen=True, slots=True)
class FoundChild:
    pid: Pid
    gen: GenId | None  # None: not a worker (a probe, the warden, a zombie, a stray)
    slot: int
    probe: bool


def children_of_self() -> list[Pid]:
    """The master's direct children, from /proc/self/task/*/children."""
    pids: set[Pid] = set()
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        try:
            with open(path, encoding="ascii") as f:
                pids.update(Pid(int(token)) for token in f.read().split())
        except (OSError, ValueError):
            continue
    return sorted(pids)


def identify(pid: Pid) -> FoundChild:
    """Which worker (or probe) a child is, from its environment."""
    environ = _environ(pid)
    gen = _number(environ.get(b"HANDOFF_GENERATION"))
    slot = _number(environ.get(b"HANDOFF_WORKER"))
    probe = b"HANDOFF_WORKER_PID" in environ
    if gen is None or slot is None:
        return FoundChild(pid, None, 0, probe)
    return FoundChild(pid, GenId(gen), slot, probe)


def _environ(pid: Pid) -> dict[bytes, bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read(_MAX_ENVIRON)
    except OSError:
        return {}
    pairs = (item.partition(b"=") for item in data.split(b"\0") if item)
    return {key: value for key, sep, value in pairs if sep}


def _number(value: bytes | None) -> int | None:
    if value is None or not value.isdigit() or len(value) > 9:
        return None
    return int(value)
