"""The health endpoint's /metrics: the master's counters in Prometheus' text format.

Rendered with prometheus_client (the optional extra ``handoff[metrics]``) through a
custom collector that reads everything at scrape time: no background thread, no
registry of live metric objects, and prometheus_client's own HTTP server is never used.
Event counts (reloads by outcome, respawns, ...) are kept in ``Holdings.metric_counts``,
which a re-exec in place carries over, so counters never go back. docs/health.md lists
every metric.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Final, Protocol

from handoff.core import actions as act
from handoff.core.model import Generation, GenerationState, GenId, MasterState, WorkerState
from handoff.core.rollback import AUTOMATIC
from handoff.formats.log_events import EventName
from handoff.formats.rescue_rules import Release
from handoff.system.listen_queue import accept_queue, listen_drops
from handoff.system.process_tree import tree_usage
from handoff.system.sockets import Listener

try:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
    from prometheus_client.registry import Collector, CollectorRegistry
except ImportError:  # the extra is not installed: /metrics answers 404 with a hint
    AVAILABLE = False
else:
    AVAILABLE = True

MISSING_HINT: Final = "install the extra: pip install 'handoff[metrics]' (prometheus_client)"
# Events counted, and the counter each one adds to (carried across re-execs by name).
COUNTED: Final[Mapping[EventName, str]] = {
    EventName.RELOAD_SUCCEEDED: "reloads_succeeded",
    EventName.RELOAD_FAILED: "reloads_failed",
    EventName.WORKER_RESPAWN_SCHEDULED: "respawns",
    EventName.WORKER_CRASH_LOOP: "crash_loops",
    EventName.WORKER_KILLED: "workers_killed",
    EventName.RELOAD_CONFIRMED: "reloads_confirmed",
    EventName.VERIFY_FAILED: "verify_failures",
}
# Events counted by their path field: the family's stored prefix, and the paths.
DETACH_PATHS: Final = ("epoll", "signal-only")
ROLLBACK_PATHS: Final = ("reattach", "restart", "cancel")
BY_PATH: Final[Mapping[EventName, tuple[str, tuple[str, ...]]]] = {
    EventName.WORKER_DETACHED: ("workers_detached", DETACH_PATHS),
    EventName.RELOAD_ROLLED_BACK: ("rollbacks", ROLLBACK_PATHS),
}
# Events whose duration_s goes into a histogram, and the histogram's stored name.
TIMED: Final[Mapping[EventName, str]] = {
    EventName.RELOAD_SUCCEEDED: "reload_seconds",
    EventName.WORKER_READY: "ready_seconds",
}
BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _bucket_key(histogram: str, index: int) -> str:
    return f"{histogram}_bucket_{index}"  # index len(BUCKETS): above the last bound


def _sum_key(histogram: str) -> str:
    return f"{histogram}_sum_ms"


def _path_key(prefix: str, path: str) -> str:
    return f"{prefix}_{path}"


def _stored_names() -> Iterator[str]:
    yield from COUNTED.values()
    yield "rollbacks_automatic"
    for prefix, paths in BY_PATH.values():
        yield from (_path_key(prefix, path) for path in paths)
    for histogram in TIMED.values():
        yield _sum_key(histogram)
        yield from (_bucket_key(histogram, i) for i in range(len(BUCKETS) + 1))


class MetricsView(Protocol):
    @property
    def state(self) -> MasterState: ...

    @property
    def generations(self) -> Mapping[GenId, Generation]: ...


class EventCounts:
    """What the master counts from its own reports, in a store a re-exec carries."""

    def __init__(self, store: MutableMapping[str, int], carried: Mapping[str, int]) -> None:
        self._store = store
        for name in _stored_names():
            store.setdefault(name, carried.get(name, 0))

    def on_report(self, report: act.Report) -> None:
        name = COUNTED.get(report.event)
        if name is not None:
            self._store[name] += 1
        path = report.fields.get("path")
        prefix, paths = BY_PATH.get(report.event, ("", ()))
        if path in paths:
            self._store[_path_key(prefix, str(path))] += 1
        if (
            report.event is EventName.RELOAD_ROLLED_BACK
            and report.fields.get("source") == AUTOMATIC
        ):
            self._store["rollbacks_automatic"] += 1
        histogram = TIMED.get(report.event)
        duration = report.fields.get("duration_s")
        if histogram is not None and isinstance(duration, int | float):
            index = next((i for i, bound in enumerate(BUCKETS) if duration <= bound), len(BUCKETS))
            self._store[_bucket_key(histogram, index)] += 1
            self._store[_sum_key(histogram)] += round(duration * 1000)

    def get(self, name: str) -> int:
        return self._store.get(name, 0)


def render(
    view: MetricsView,
    counts: EventCounts,
    counters: Mapping[str, int],
    listeners: Sequence[Listener],
) -> tuple[bytes, str]:
    """(body, content type) of one scrape; only when AVAILABLE."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(lambda: _families(view, counts, counters, listeners)))
    return generate_latest(registry), CONTENT_TYPE_LATEST


if AVAILABLE:

    class _Collector(Collector):
        def __init__(self, families: Callable[[], Iterator[Metric]]) -> None:
            self._families = families

        def collect(self) -> Iterator[Metric]:
            return self._families()


def _families(
    view: MetricsView,
    counts: EventCounts,
    counters: Mapping[str, int],
    listeners: Sequence[Listener],
) -> Iterator[Metric]:
    reloads = CounterMetricFamily("handoff_reloads", "Reloads by outcome.", labels=["outcome"])
    reloads.add_metric(["succeeded"], counts.get("reloads_succeeded"))
    reloads.add_metric(["failed"], counts.get("reloads_failed"))
    reloads.add_metric(["confirmed"], counts.get("reloads_confirmed"))  # the window passed
    yield reloads
    yield _histogram(
        counts,
        "reload_seconds",
        "handoff_reload_duration_seconds",
        "Successful reloads: from the new generation's start until it serves.",
    )
    yield _histogram(
        counts,
        "ready_seconds",
        "handoff_worker_ready_duration_seconds",
        "Workers that became ready: from their spawn until ready.",
    )
    detached = CounterMetricFamily(
        "handoff_workers_detached", "Old workers taken off the sockets, by path.", labels=["path"]
    )
    for path in DETACH_PATHS:
        detached.add_metric([path], counts.get(_path_key("workers_detached", path)))
    yield detached
    rollbacks = CounterMetricFamily("handoff_rollbacks", "Rollbacks, by path.", labels=["path"])
    for path in ROLLBACK_PATHS:
        rollbacks.add_metric([path], counts.get(_path_key("rollbacks", path)))
    yield rollbacks
    for name, help_text, key in (
        ("handoff_worker_respawns", "Workers respawned after a crash.", "respawns"),
        ("handoff_worker_crash_loops", "Worker slots given up on (crash loop).", "crash_loops"),
        (
            "handoff_workers_killed",
            "Workers SIGKILLed (drain timeout, fast stop).",
            "workers_killed",
        ),
        ("handoff_log_lines_dropped", "Log lines dropped (slow reader).", "log_lines_dropped"),
        ("handoff_master_reexecs", "Re-executions of the master in place.", "reexecs"),
        (
            "handoff_rollbacks_automatic",
            "Rollbacks handoff decided itself (crashes, --verify).",
            "rollbacks_automatic",
        ),
        ("handoff_verify_failures", "Failed --verify checks.", "verify_failures"),
    ):
        ours = key in COUNTED.values() or key == "rollbacks_automatic"
        value = counts.get(key) if ours else counters.get(key, 0)
        yield CounterMetricFamily(name, help_text, value=value)
    yield from _rescue(counters)
    state = GaugeMetricFamily("handoff_master_state", "The master's state.", labels=["state"])
    for each in MasterState:
        state.add_metric([each.value], 1.0 if view.state is each else 0.0)
    yield state
    gens: Counter[str] = Counter(gen.state.value for gen in view.generations.values())
    workers: Counter[str] = Counter(
        worker.state.value for gen in view.generations.values() for worker in gen.live_workers()
    )
    for name, help_text, enum, counted in (
        ("handoff_generations", "Generations by state.", GenerationState, gens),
        ("handoff_workers", "Workers by state.", WorkerState, workers),
    ):
        family = GaugeMetricFamily(name, help_text, labels=["state"])
        for member in enum:
            family.add_metric([member.value], counted.get(member.value, 0))
        yield family
    queue = GaugeMetricFamily(
        "handoff_listener_accept_queue", "Connections waiting to be accepted.", labels=["address"]
    )
    limit = GaugeMetricFamily(
        "handoff_listener_accept_queue_limit", "The accept queue's limit.", labels=["address"]
    )
    for listener in listeners:
        found = accept_queue(listener.sock)
        if found is not None:
            queue.add_metric([listener.address], found[0])
            limit.add_metric([listener.address], found[1])
    yield queue
    yield limit
    yield from _usage(view)
    for name, value in listen_drops().items():
        yield CounterMetricFamily(
            f"handoff_host_tcp_{name.lower()}",
            f"The kernel's TcpExt {name} (the whole network namespace).",
            value=value,
        )


def _rescue(counters: Mapping[str, int]) -> Iterator[Metric]:
    """--rescue-keepalive (docs/rescue.md): connections copied, requests handed on,
    connections let go by reason, and the master's CPU time spent on it."""
    for name, help_text, key in (
        (
            "handoff_rescue_connections_copied",
            "Old workers' connections copied before their stop signal.",
            "rescue_copied",
        ),
        (
            "handoff_rescue_connections_taken_over",
            "Copied connections the old worker let go of at a request boundary.",
            "rescue_connections",
        ),
        (
            "handoff_rescue_requests_handed",
            "Rescued requests handed to the new generation and answered.",
            "rescue_handed",
        ),
    ):
        yield CounterMetricFamily(name, help_text, value=counters.get(key, 0))
    released = CounterMetricFamily(
        "handoff_rescue_released",
        "Copied connections let go (the client sees what it would have without rescue).",
        labels=["reason"],
    )
    for reason in Release:
        released.add_metric([reason.value], counters.get(f"rescue_released_{reason}", 0))
    yield released
    yield CounterMetricFamily(
        "handoff_rescue_cpu_seconds",
        "The master's CPU time spent on keep-alive rescue.",
        value=counters.get("rescue_cpu_us", 0) / 1_000_000,
    )


def _histogram(counts: EventCounts, stored: str, name: str, help_text: str) -> Metric:
    cumulative, buckets = 0, []
    for index, bound in enumerate((*map(str, BUCKETS), "+Inf")):
        cumulative += counts.get(_bucket_key(stored, index))
        buckets.append((bound, cumulative))
    return HistogramMetricFamily(
        name, help_text, buckets=buckets, sum_value=counts.get(_sum_key(stored)) / 1000
    )


def _usage(view: MetricsView) -> Iterator[Metric]:
    """Memory and CPU of each generation's workers (their whole process trees)."""
    labels = ["gen", "state"]
    rss = GaugeMetricFamily(
        "handoff_generation_rss_bytes", "Resident memory of a generation's workers.", labels=labels
    )
    # A gauge: the sum falls when one of the generation's workers exits.
    cpu = GaugeMetricFamily(
        "handoff_generation_cpu_seconds",
        "CPU time used so far by a generation's live workers.",
        labels=labels,
    )
    for gen in view.generations.values():
        used = [tree_usage(worker.pid, ()) for worker in gen.live_workers()]
        values = [str(gen.id), gen.state.value]
        rss.add_metric(values, sum(u.rss_bytes for u in used))
        cpu.add_metric(values, round(sum(u.cpu_s for u in used), 2))
    yield rss
    yield cpu
