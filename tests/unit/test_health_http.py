"""The health endpoint's pure parts: the request-head parser, the responses, --health
parsing, and what /livez and /readyz answer for each state of the master."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from handoff.core.actions import report
from handoff.core.model import Generation, GenerationState, GenId, MasterState
from handoff.errors import ConfigError
from handoff.formats.http_request import (
    MAX_HEAD,
    BadHttpRequest,
    Request,
    parse_head,
    parse_health_address,
    response,
)
from handoff.formats.log_events import EventName
from handoff.formats.netstat import parse_netstat
from handoff.formats.options import BindKind
from handoff.master.health_server import answer, not_ready
from handoff.master.metrics import EventCounts, render


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n", Request("GET", "/readyz")),
        (b"HEAD /livez HTTP/1.0\r\n\r\n", Request("HEAD", "/livez")),
        (b"GET /readyz?full=1 HTTP/1.1\r\n\r\n", Request("GET", "/readyz")),
        (b"GET /livez HTTP/1.1\n\n", Request("GET", "/livez")),  # bare LF (printf | nc)
        (b"GET /livez HTTP/1.1\r\nHost: x\r\n", None),  # incomplete: wait for more
        (b"", None),
    ],
)
def test_parses_a_request_head(data: bytes, expected: Request | None) -> None:
    assert parse_head(data) == expected


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"garbage\r\n\r\n", 400),
        (b"GET readyz HTTP/1.1\r\n\r\n", 400),
        (b"GET /readyz SPDY/3\r\n\r\n", 400),
        (b"GET /\xff HTTP/1.1\r\n\r\n", 400),
        (b"POST /readyz HTTP/1.1\r\n\r\n", 405),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD, 431),  # too long, never ended
        (b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n", 431),
    ],
)
def test_refuses_what_it_cannot_answer(data: bytes, status: int) -> None:
    with pytest.raises(BadHttpRequest) as caught:
        parse_head(data)
    assert caught.value.status == status
    assert "\n" not in caught.value.message


def test_responses_close_the_connection_and_head_has_no_body() -> None:
    full = response(200, b"ready\n")
    assert full.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close\r\n" in full
    assert b"Content-Length: 6\r\n" in full
    assert full.endswith(b"\r\n\r\nready\n")
    head = response(200, b"ready\n", head_only=True)
    assert head.endswith(b"\r\n\r\n")
    assert b"Content-Length: 6\r\n" in head


def test_parses_the_health_address() -> None:
    assert parse_health_address("127.0.0.1:9000").port == 9000
    assert parse_health_address("unix:/run/app/health.sock").kind is BindKind.UNIX
    for bad in ("fd:3", "unix:/run/h.sock,mode=0600", "localhost:http"):
        with pytest.raises(ConfigError):
            parse_health_address(bad)


@dataclass
class View:
    """A master's state as the endpoint reads it (what Supervisor provides)."""

    state: MasterState
    gens: list[GenerationState] = field(default_factory=list)
    stop_reason: str = ""

    @property
    def generations(self) -> Mapping[GenId, Generation]:
        return {
            GenId(number): Generation(id=GenId(number), size=1, state=state, started_at=0.0)
            for number, state in enumerate(self.gens, 1)
        }


@pytest.mark.parametrize(
    ("view", "reason"),
    [
        (View(MasterState.STARTING, [GenerationState.STARTING]), "starting"),
        (View(MasterState.RUNNING, [GenerationState.ACTIVE]), None),
        (View(MasterState.RELOADING, [GenerationState.ACTIVE, GenerationState.STARTING]), None),
        (View(MasterState.STOPPING, [GenerationState.DRAINING]), "stopping"),
        (View(MasterState.LEAVING, [GenerationState.ACTIVE]), "leaving"),  # --shutdown-delay
        (View(MasterState.STOPPING, [GenerationState.ACTIVE]), "stopping"),
        (View(MasterState.STOPPING, [GenerationState.FAILED]), "stopping"),
    ],
)
def test_ready_only_while_a_generation_serves_and_not_stopping(
    view: View, reason: str | None
) -> None:
    got = not_ready(view)
    assert (got if got is None else got.split(":")[0]) == reason
    status = answer(Request("GET", "/readyz"), view).split(b" ")[1]
    assert status == (b"200" if reason is None else b"503")
    assert answer(Request("GET", "/livez"), view).split(b" ")[1] == b"200"


def test_unknown_paths_get_a_hint() -> None:
    answered = answer(Request("GET", "/nope"), View(MasterState.RUNNING))
    assert answered.startswith(b"HTTP/1.1 404 ")
    assert answered.endswith(b"hint: the paths are /livez, /readyz, /metrics\n")


def test_a_failing_scrape_is_a_500_never_an_exception() -> None:
    def broken() -> tuple[bytes, str]:
        raise ValueError("a collector broke")

    answered = answer(Request("GET", "/metrics"), View(MasterState.RUNNING), scrape=broken)
    assert answered.startswith(b"HTTP/1.1 500 ")
    assert answered.endswith(b"metrics failed: ValueError: a collector broke\n")


def test_metrics_without_prometheus_client_is_a_404_with_a_hint() -> None:
    answered = answer(Request("GET", "/metrics"), View(MasterState.RUNNING), scrape=None)
    assert answered.startswith(b"HTTP/1.1 404 ")
    assert b"pip install 'handoff[metrics]'" in answered


def test_counts_carry_over_and_the_histogram_is_cumulative() -> None:
    store: dict[str, int] = {}
    counts = EventCounts(store, carried={"reloads_succeeded": 5, "respawns": 2})
    counts.on_report(report(EventName.RELOAD_SUCCEEDED, gen=7, duration_s=0.3))
    counts.on_report(report(EventName.RELOAD_FAILED, gen=8, reason="x"))
    counts.on_report(report(EventName.WORKER_RESPAWN_SCHEDULED, gen=7))
    counts.on_report(report(EventName.MASTER_READY))  # not counted
    counts.on_report(report(EventName.WORKER_READY, gen=7, worker=0, duration_s=0.08))
    counts.on_report(report(EventName.WORKER_DETACHED, gen=6, worker=0, path="epoll"))
    counts.on_report(report(EventName.WORKER_DETACHED, gen=6, worker=1, path="signal-only"))
    counts.on_report(report(EventName.WORKER_DETACHED, gen=6, worker=2, path="epoll"))
    assert counts.get("reloads_succeeded") == 6
    assert counts.get("reloads_failed") == 1
    assert counts.get("respawns") == 3
    view = View(MasterState.RUNNING, [GenerationState.ACTIVE])
    text = render(view, counts, {"reexecs": 2, "log_lines_dropped": 0}, [])[0].decode()
    assert 'handoff_reloads_total{outcome="succeeded"} 6.0' in text
    assert 'handoff_reload_duration_seconds_bucket{le="0.25"} 0.0' in text
    assert 'handoff_reload_duration_seconds_bucket{le="0.5"} 1.0' in text
    assert 'handoff_reload_duration_seconds_bucket{le="+Inf"} 1.0' in text
    assert "handoff_master_reexecs_total 2.0" in text
    assert 'handoff_worker_ready_duration_seconds_bucket{le="0.1"} 1.0' in text
    assert "handoff_worker_ready_duration_seconds_sum 0.08" in text
    assert 'handoff_workers_detached_total{path="epoll"} 2.0' in text
    assert 'handoff_workers_detached_total{path="signal-only"} 1.0' in text
    assert 'handoff_generations{state="active"} 1.0' in text
    assert 'handoff_master_state{state="running"} 1.0' in text


def test_rollbacks_are_counted_by_path_and_the_automatic_ones_apart() -> None:
    counts = EventCounts({}, carried={"rollbacks_reattach": 1})
    counts.on_report(report(EventName.RELOAD_ROLLED_BACK, gen=3, path="reattach", source="control"))
    counts.on_report(
        report(EventName.RELOAD_ROLLED_BACK, gen=4, path="restart", source="automatic")
    )
    counts.on_report(report(EventName.RELOAD_CONFIRMED, gen=5, previous=4))
    counts.on_report(report(EventName.VERIFY_FAILED, gen=5, detail="HTTP 500"))
    view = View(MasterState.RUNNING, [GenerationState.ACTIVE, GenerationState.PARKED])
    text = render(view, counts, {}, [])[0].decode()
    assert 'handoff_rollbacks_total{path="reattach"} 2.0' in text
    assert 'handoff_rollbacks_total{path="restart"} 1.0' in text
    assert 'handoff_rollbacks_total{path="cancel"} 0.0' in text
    assert "handoff_rollbacks_automatic_total 1.0" in text
    assert 'handoff_reloads_total{outcome="confirmed"} 1.0' in text
    assert "handoff_verify_failures_total 1.0" in text
    assert 'handoff_generations{state="parked"} 1.0' in text


def test_keepalive_rescue_is_counted_from_the_masters_counters() -> None:
    counters = {
        "rescue_copied": 32,
        "rescue_connections": 30,
        "rescue_handed": 29,
        "rescue_released_quiet": 2,
        "rescue_cpu_us": 31_000,
    }
    view = View(MasterState.RUNNING, [GenerationState.ACTIVE])
    text = render(view, EventCounts({}, carried={}), counters, [])[0].decode()
    assert "handoff_rescue_connections_copied_total 32.0" in text
    assert "handoff_rescue_connections_taken_over_total 30.0" in text
    assert "handoff_rescue_requests_handed_total 29.0" in text
    assert 'handoff_rescue_released_total{reason="quiet"} 2.0' in text
    assert 'handoff_rescue_released_total{reason="busy"} 0.0' in text
    assert "handoff_rescue_cpu_seconds_total 0.031" in text


def test_parses_proc_net_netstat() -> None:
    text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 7 9\nIpExt: A\nIpExt: 1\n"
    assert parse_netstat(text) == {
        "TcpExt.SyncookiesSent": 0,
        "TcpExt.ListenOverflows": 7,
        "TcpExt.ListenDrops": 9,
        "IpExt.A": 1,
    }
