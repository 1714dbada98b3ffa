"""The server matrix: one JSON line per server test run, rendered into docs/servers.md.

Each server test under load with reloads calls `record` once, after its load has stopped.
It appends one line to `<repo>/.matrix/results.jsonl` (set HANDOFF_MATRIX_FILE to write
elsewhere). `bench/servers_table.py` renders the newest line per (server, variant) into
the markdown table of docs/servers.md.

A line holds the totals and, for keep-alive and fresh-connection clients separately, the
failed requests per reload (total / reloads), overall and by failure class.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from handoff.demo.load import FailureClass, LoadStats
from tests.integration.harness import Event, Load, Master
from tests.integration.http import get

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / ".matrix" / "results.jsonl"
SCHEMA = 1


def results_path() -> Path:
    """Where `record` appends: HANDOFF_MATRIX_FILE, else <repo>/.matrix/results.jsonl."""
    override = os.environ.get("HANDOFF_MATRIX_FILE")
    return Path(override) if override else RESULTS


def _by_class(counter: Mapping[FailureClass, int]) -> dict[str, int]:
    return {str(c): int(n) for c, n in sorted(counter.items()) if n}


def _per_reload(counts: Mapping[str, int], reloads: int) -> dict[str, float]:
    return {c: round(n / reloads, 3) for c, n in counts.items()}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def entry(
    *,
    server: str,
    variant: str,
    command: Sequence[str],
    reloads: int,
    stats: LoadStats,
    ready_via: str,
    ready_detail: str,
    detach_path: str,
    notes: str = "",
) -> dict[str, Any]:
    """The JSON object `record` writes (separate so that it can be checked without I/O)."""
    if reloads <= 0:
        raise ValueError(f"reloads must be positive, got {reloads}")
    keepalive = _by_class(stats.failures_keepalive)
    fresh = _by_class(stats.failures_fresh)
    failed_keepalive = sum(keepalive.values())
    failed_fresh = sum(fresh.values())
    return {
        "schema": SCHEMA,
        "server": server,
        "variant": variant,
        "command": list(command),
        "reloads": reloads,
        "requests": stats.ok + stats.total_failures(),
        "ok": stats.ok,
        "ok_keepalive": stats.ok_keepalive,
        "ok_fresh": stats.ok_fresh,
        "refused": int(stats.failures.get(FailureClass.REFUSED, 0)),
        "failed": stats.total_failures(),
        "failed_keepalive": failed_keepalive,
        "failed_fresh": failed_fresh,
        "failed_keepalive_per_reload": round(failed_keepalive / reloads, 3),
        "failed_fresh_per_reload": round(failed_fresh / reloads, 3),
        "failed_keepalive_by_class": keepalive,
        "failed_fresh_by_class": fresh,
        "failed_keepalive_per_reload_by_class": _per_reload(keepalive, reloads),
        "failed_fresh_per_reload_by_class": _per_reload(fresh, reloads),
        "idle_closes": stats.idle_closes,
        "generations_seen": len(stats.by_generation),
        "duration_s": round(stats.duration_s() or 0.0, 3),
        "p50_latency_ms": _rounded(stats.latency_percentile_ms(50)),
        "p99_latency_ms": _rounded(stats.latency_percentile_ms(99)),
        "max_latency_ms_sampled": _rounded(stats.latency_percentile_ms(100)),
        "ready_via": ready_via,
        "ready_detail": ready_detail,
        "detach_path": detach_path,
        "notes": notes,
        "recent_errors": list(stats.recent_errors)[-5:],
        "recorded_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "test": os.environ.get("PYTEST_CURRENT_TEST", "").removesuffix(" (call)"),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "argv0": sys.argv[0],
    }


def record(
    *,
    server: str,
    variant: str,
    command: list[str],
    reloads: int,
    stats: LoadStats,
    ready_via: str,
    ready_detail: str,
    detach_path: str,
    notes: str = "",
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Append one run's measurements to the matrix results file (one JSON line); extra:
    fields of a suite's own (test_rescue.py's)."""
    line = entry(
        server=server,
        variant=variant,
        command=command,
        reloads=reloads,
        stats=stats,
        ready_via=ready_via,
        ready_detail=ready_detail,
        detach_path=detach_path,
        notes=notes,
    )
    line.update(extra or {})
    path = results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # One write of one line in append mode: concurrent test processes do not interleave.
    data = (json.dumps(line, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# -- shared by the server matrix tests ----------------------------------------------------

RELOADS = 5
RESCUE_RELOADS = 10  # tests/integration/test_rescue.py, for the servers that race
PER_RELOAD = 100  # successful requests between reloads (the load never stops)


def listener_backlog(port: int) -> int | None:
    """The listening socket's accept queue limit (ss's Send-Q), None without ss."""
    if shutil.which("ss") is None:
        return None
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    return int(out[2]) if len(out) >= 3 else None


def _summary(values: list[str]) -> str:
    """One value if all agree, else each with its count, most common first."""
    counts = collections.Counter(values)
    if len(counts) == 1:
        return values[0]
    return ", ".join(f"{value} x{n}" for value, n in counts.most_common())


def readiness(ready: list[Event]) -> tuple[str, str]:
    """How the reloads' workers were proved ready: (via, most common detail)."""
    via = _summary([str(e.get("via", "?")) for e in ready])
    details = collections.Counter(str(e["detail"]) for e in ready if e.get("detail"))
    return via, details.most_common(1)[0][0] if details else ""


def detach_path(detached: list[Event]) -> str:
    """How old workers were told to stop accepting, from worker.detached events."""
    if not detached:
        return "signal-only (no worker.detached event)"
    paths = []
    for event in detached:
        path = str(event.get("path", "?"))
        if path == "signal-only" and event.get("reason"):
            path = f"signal-only ({event['reason']})"
        paths.append(path)
    return _summary(paths)


def reload_under_load(
    master: Master,
    version: Path,
    port: int,
    *,
    reloads: int = RELOADS,
    keepalive: int = 4,
    fresh: int = 2,
) -> tuple[Load, int]:
    """Reloads under load (keep-alive and fresh clients); the new version answers after
    each. Returns (load, mark)."""
    with Load(port, keepalive=keepalive, fresh=fresh) as load:
        load.wait_for_requests(PER_RELOAD)
        first = master.mark()
        for number in range(1, reloads + 1):
            version.write_text(f"v{number}")
            outcome = master.reload()
            assert outcome["event"] == "reload.succeeded", outcome
            master.wait_for("generation.gone", where=lambda e, g=outcome["gen"] - 1: e["gen"] == g)
            for _ in range(3):
                status, body = get(port)
                assert (status, body.get("version")) == (200, f"v{number}")
            load.wait_for_requests(PER_RELOAD)
    return load, first


def record_run(
    master: Master,
    *,
    server: str,
    variant: str,
    command: list[str],
    notes: str,
    stats: LoadStats,
    mark: int,
) -> tuple[str, str, str]:
    """Record one server's run in the matrix; return (ready via, ready detail, detach path)."""
    via, detail = readiness(master.named("worker.ready", after=mark))
    detached = detach_path(master.named("worker.detached", after=mark))
    record(
        server=server,
        variant=variant,
        command=command,
        reloads=RELOADS,
        stats=stats,
        ready_via=via,
        ready_detail=detail,
        detach_path=detached,
        notes=notes,
    )
    return via, detail, detached


def record_rescue(
    master: Master,
    *,
    server: str,
    variant: str,
    command: list[str],
    rescue: bool,
    reloads: int,
    clients: int,
    stats: LoadStats,
    totals: Mapping[str, Any],
    mark: int,
) -> None:
    """Record one run of the keep-alive rescue suite (test_rescue.py): its own rows;
    totals: ``rescue_totals`` of the run's rescue.finished events."""
    via, detail = readiness(master.named("worker.ready", after=mark))
    record(
        server=server,
        variant=variant,
        command=command,
        reloads=reloads,
        stats=stats,
        ready_via=via,
        ready_detail=detail,
        detach_path=detach_path(master.named("worker.detached", after=mark)),
        extra={
            "suite": "rescue",
            "rescue": rescue,
            "keepalive_clients": clients,
            "rescue_copied": totals["copied"],
            "rescue_handed": totals["handed"],
            "rescue_released": totals["released"],
        },
    )


def rescue_totals(finished: list[Event]) -> dict[str, Any]:
    """A run's rescue.finished events summed: copied, handed, released by reason."""
    released: collections.Counter[str] = collections.Counter()
    for event in finished:
        released.update(event["released"])
    return {
        "copied": sum(int(e["copied"]) for e in finished),
        "handed": sum(int(e["handed"]) for e in finished),
        "released": dict(sorted(released.items())),
    }


def assert_nothing_refused_or_lost(stats: LoadStats, backlog: int | None) -> None:
    """The bar for every server: nothing refused, no fresh request failed, every reload
    served, and the shared backlog left at the kernel maximum."""
    summary = stats.to_dict()
    assert stats.failures.get(FailureClass.REFUSED, 0) == 0, summary
    assert sum(stats.failures_fresh.values()) == 0, summary
    assert {f"{g}" for g in range(2, RELOADS + 2)} <= set(stats.by_generation), summary
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert backlog in (None, somaxconn), f"the server lowered the backlog to {backlog}"


def assert_stops_cleanly(master: Master) -> None:
    master.signal(signal.SIGTERM)
    assert master.wait_exit(60) == 0
    _, alive = psutil.wait_procs(master.live_workers(), timeout=5)
    assert not alive
