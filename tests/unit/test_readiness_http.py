"""--ready http:PATH in the machine: the scan first, then HTTP tries, each on its backoff;
READY=1 counts for nothing; a ready timeout says the worker's last answer."""

from __future__ import annotations

import dataclasses

import pytest

from handoff.core import actions as act
from handoff.core import events as ev
from handoff.core.model import GenId, MasterState
from handoff.core.timers import TimerKey, TimerKind
from handoff.formats.options import ReadyMode, ReadySpec
from tests.unit.test_machine import FakeLoop, make_policy, names, of_type, report

HTTP = ReadySpec(mode=ReadyMode.HTTP, path="/healthz")
SCAN_FAILED = "accepting in 0 of 1 processes (none)"
ANSWER = "HTTP 503 Service Unavailable"


def retry_delay(out: list[act.Action]) -> float:
    (retry,) = of_type(out, act.StartTimer)
    assert retry.key.kind is TimerKind.PROBE_RETRY
    return retry.delay_s


def test_scans_retry_on_the_scan_backoff_and_tries_on_the_http_backoff() -> None:
    loop = FakeLoop(make_policy(workers=1, ready=HTTP))
    out = loop.start()
    pid = loop.pid(1, 0)
    assert of_type(out, act.RunProbe) == [act.RunProbe(pid=pid, gen=GenId(1), slot=0)]
    scans = [retry_delay(loop.feed(ev.ProbeFinished(pid=pid, ok=False, detail=SCAN_FAILED)))]
    scans += [retry_delay(loop.feed(ev.ProbeFinished(pid=pid, ok=False, detail=SCAN_FAILED)))]
    assert scans == [pytest.approx(0.005), pytest.approx(0.01)]
    tries = [
        retry_delay(
            loop.feed(
                ev.ProbeFinished(pid=pid, ok=False, detail=f"{ANSWER} from pid 7", asked=True)
            )
        )
        for _ in range(6)
    ]
    assert tries == [pytest.approx(d) for d in (0.05, 0.1, 0.2, 0.4, 0.5, 0.5)]
    out = loop.feed(ev.ProbeFinished(pid=pid, ok=True, detail="HTTP 200 OK from pid 7", asked=True))
    ready = report(out, "worker.ready")
    assert (ready.fields["via"], ready.fields["detail"]) == ("http", "HTTP 200 OK from pid 7")
    assert loop.master_state() is MasterState.RUNNING
    assert len(loop.timers) == 0


def test_ready_1_alone_does_not_make_a_worker_ready() -> None:
    loop = FakeLoop(make_policy(workers=1, ready=HTTP))
    loop.start()
    pid = loop.pid(1, 0)
    out = loop.ready(pid)
    assert "worker.ready" not in names(out)
    assert not of_type(out, act.StartTimer), "no notify grace under http:"
    assert not loop.advance(5), "nothing happens until the probe answers"


@pytest.mark.parametrize(
    ("results", "ends_with"),
    [
        (
            [
                ev.ProbeFinished(
                    pid=0, ok=False, detail=f"{ANSWER} from pid 7", asked=True, answer=ANSWER
                ),
                ev.ProbeFinished(
                    pid=0,
                    ok=False,
                    detail="accepted by a process outside the worker's tree (an older generation)",
                    asked=True,
                ),
            ],
            f"; last answer: {ANSWER}",
        ),
        (
            [ev.ProbeFinished(pid=0, ok=False, detail="not accepted within 2 s", asked=True)],
            "; no answer from it; last try: not accepted within 2 s",
        ),
        (
            [ev.ProbeFinished(pid=0, ok=False, detail=SCAN_FAILED)],
            "; never seen accepting or serving, so never asked",
        ),
    ],
)
def test_a_ready_timeout_says_the_last_answer(
    results: list[ev.ProbeFinished], ends_with: str
) -> None:
    loop = FakeLoop(make_policy(workers=1, ready=HTTP, ready_timeout_s=5))
    loop.start()
    first = loop.pid(1, 0)
    loop.feed(ev.ProbeFinished(pid=first, ok=True, detail="HTTP 200 OK", asked=True))
    loop.reload()
    pid = loop.pid(2, 0)
    for result in results:
        loop.feed(dataclasses.replace(result, pid=pid))
    out = loop.advance(5)
    reason = str(report(out, "reload.failed").fields["reason"])
    assert reason == f"worker 0 (pid {pid}) not ready after 5 s{ends_with}", reason
    assert loop.master_state() is MasterState.RUNNING
    assert first in loop.alive, "the old generation serves on"


def test_other_modes_keep_their_timeout_reason() -> None:
    loop = FakeLoop(make_policy(workers=1, ready=ReadySpec(mode=ReadyMode.AUTO)))
    loop.start()
    out = loop.advance(60)
    assert report(out, "worker.not_ready").fields["reason"] == (
        f"worker 0 (pid {loop.pid(1, 0)}) not ready after 60 s"
    )


def test_a_late_try_after_ready_is_ignored() -> None:
    loop = FakeLoop(make_policy(workers=1, ready=HTTP))
    loop.start()
    pid = loop.pid(1, 0)
    loop.feed(ev.ProbeFinished(pid=pid, ok=True, detail="HTTP 200 OK", asked=True))
    assert not loop.feed(ev.ProbeFinished(pid=pid, ok=False, detail="x", asked=True))
    assert TimerKey(TimerKind.PROBE_RETRY, pid) not in loop.timers
