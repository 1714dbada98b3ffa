"""What ``handoff status`` shows: the master, its generations and workers, as plain data.

Built on request from the machine's records, the master's settings and
each worker's process tree (CPU and RSS from psutil; connections on the listening ports
from one read of /proc/net/tcp and tcp6, matched against the tree's socket fds).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from handoff import __version__
from handoff.core import rollback
from handoff.core.machine import Supervisor
from handoff.core.model import Generation, GenerationState
from handoff.core.policy import ReloadOutcome
from handoff.formats.options import RunConfig
from handoff.formats.worker_contract import FIRST_LISTEN_FD
from handoff.master.resume_state import LastWords
from handoff.system.process_tree import connection_inodes, tree_usage
from handoff.system.sockets import Listener


def build_status(
    *,
    machine: Supervisor,
    config: RunConfig,
    listeners: Sequence[Listener],
    started_at: float,
    now: float,
    counters: Mapping[str, int] | None = None,
    last_failure: LastWords | None = None,
) -> dict[str, object]:
    """counters: what the master counts (``add_counters``), shown as they are;
    last_failure: the last lines of the worker that failed the last failed reload."""
    # One parse of the TCP tables per status, not one per process of every tree.
    connections = connection_inodes(listening_ports(listeners))
    generations = []
    for gen in machine.generations.values():
        workers = []
        for worker in sorted(gen.workers.values(), key=lambda w: w.slot):
            usage = tree_usage(worker.pid, connections)
            workers.append(
                {
                    "worker": worker.slot,
                    "pid": worker.pid,
                    "state": "stopping" if worker.state.stopping else worker.state.value,
                    "phase": worker.state.value,
                    "age_s": round(now - worker.started_at, 1),
                    "cpu_s": usage.cpu_s,
                    "rss_bytes": usage.rss_bytes,
                    "connections": usage.connections,
                    "processes": usage.processes,
                    "notify_status": worker.status,
                }
            )
        generations.append(
            {
                "gen": gen.id,
                "state": gen.state.value,
                "age_s": round(now - gen.started_at, 1),
                "size": gen.size,
                "workers": workers,
                **_progressive(gen, now),
            }
        )
    last = machine.last_reload
    return {
        "master": {
            "pid": os.getpid(),
            "name": config.name,
            "state": machine.state.value,
            "uptime_s": round(now - started_at, 1),
            "version": __version__,
            **add_counters(counters or {}),
            "ready": config.ready.describe(),
            "workers": machine.workers_target,
            "command": list(config.command),
            "sockets": [
                {"address": lst.address, "fd": FIRST_LISTEN_FD + index, "name": lst.name}
                for index, lst in enumerate(listeners)
            ],
            "control": config.control_path or "",
        },
        "generations": generations,
        "last_reload": None if last is None else _last_reload(last, last_failure),
        "rollback": _rollback(machine),
        "rescue": rescue_status(config.rescue.enabled, counters or {}),
    }


def rescue_status(enabled: bool, counters: Mapping[str, int]) -> dict[str, object]:
    """--rescue-keepalive's totals since the master started (docs/rescue.md)."""
    prefix = "rescue_released_"
    released = {k.removeprefix(prefix): n for k, n in counters.items() if k.startswith(prefix)}
    return {
        "enabled": enabled,
        "copied": counters.get("rescue_copied", 0),
        "taken_over": counters.get("rescue_connections", 0),
        "handed": counters.get("rescue_handed", 0),
        "released": dict(sorted((k, n) for k, n in released.items() if n)),
        "cpu_s": round(counters.get("rescue_cpu_us", 0) / 1_000_000, 3),
    }


def _progressive(gen: Generation, now: float) -> dict[str, object]:
    """A generation's part in a rollback or a progressive reload, where it has one."""
    shown: dict[str, object] = {}
    if gen.parked_until is not None:
        shown["parked_for_s"] = round(max(0.0, gen.parked_until - now), 1)
    if gen.canary:
        shown["canary"] = True
    if gen.admitted is not None:
        shown["admitted"] = gen.admitted  # --rollout: the slots asked for so far
    if gen.release_of is not None:
        shown["release_of"] = gen.release_of
    return shown


def _rollback(machine: Supervisor) -> dict[str, object]:
    """What ``handoff rollback`` would do now, and the window under way (docs/rollback.md)."""
    path, to = rollback.next_path(machine)
    shown: dict[str, object] = {"path": path or None, "to": to}
    window = machine.window
    if window is not None:
        shown["window"] = {
            "serving": window.serving,
            "parked": window.parked,
            "checks": window.checks,
            "failures": window.failures,
            "crashes": window.crashes,
        }
    return shown


def _last_reload(last: ReloadOutcome, failure: LastWords | None) -> dict[str, object]:
    """The last reload; a failed one with the last output lines of the worker that failed
    it, when the master read them (``--worker-output attributed``)."""
    shown: dict[str, object] = {
        "gen": last.gen,
        "ok": last.ok,
        "reason": last.reason,
        "duration_s": last.duration_s,
    }
    if not last.ok and failure is not None and failure.gen == last.gen and failure.lines:
        shown.update(worker=failure.worker, pid=failure.pid, output=list(failure.lines))
    return shown


def add_counters(carried: Mapping[str, int], **now: int) -> dict[str, int]:
    """The master's counters: what a re-executed master carried over, plus its own."""
    names = ("log_lines_dropped", "notify_datagrams_dropped", "reexecs")
    return {name: carried.get(name, 0) + now.get(name, 0) for name in names}


def process_title(machine: Supervisor, name: str) -> str:
    """The master's process title: what serves, and the master's state."""
    active = machine.generation_in(GenerationState.ACTIVE)
    serving = (
        f"gen {active.id}, {active.ready_count()}/{active.size} ready"
        if active
        else "no generation serving"
    )
    return f"handoff: master [{name}] {serving}, {machine.state.value}"


def listening_ports(listeners: Sequence[Listener]) -> frozenset[int]:
    """The TCP ports the master listens on (connections on them count in status)."""
    return frozenset(port for lst in listeners if (port := lst.port) is not None)
