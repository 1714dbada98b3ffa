"""master/probes.py under --ready http:PATH: the auto scan first, then one try per probe
(a process whose report comes back on a pipe), driven through the scripted FakeSystem."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from handoff.core import events as ev
from handoff.core.model import ExitStatus, GenId, Pid
from handoff.formats.http_check import Report
from handoff.formats.options import ReadyMode, ReadySpec, parse_bind
from handoff.master.probes import Probes
from handoff.master.sources import Sources
from handoff.system.accepting_scan import TreeScan
from handoff.system.children import Child, SpawnRequest
from handoff.system.sockets import Listener, close_listeners, open_listeners
from tests.unit.test_scan_probes import ACCEPTING, ScriptedScans

pytestmark = pytest.mark.timeout(30)

WORKER = Pid(500)
HTTP = ReadySpec(mode=ReadyMode.HTTP, path="/healthz", statuses=((200, 204),), try_timeout_s=1.5)
NOBODY = TreeScan(processes=1, accepting=0, kinds=frozenset())


@dataclass
class Tries(ScriptedScans):
    """Each spawned try 'writes' the next of these to its output, as the real one would."""

    writes: list[bytes] = field(default_factory=list)
    requests: list[SpawnRequest] = field(default_factory=list)

    def spawn(self, request: SpawnRequest) -> Child:
        child = super().spawn(request)
        self.requests.append(request)
        if request.output is not None and self.writes:
            os.write(request.output, self.writes.pop(0))
        return child


@pytest.fixture
def listeners() -> Iterator[list[Listener]]:
    opened = open_listeners((parse_bind("127.0.0.1:0"),), 16)
    yield opened
    close_listeners(opened)


@pytest.fixture
def sources() -> Iterator[Sources]:
    made = Sources()
    yield made
    made.close()


def test_tries_start_once_the_worker_is_seen_accepting(
    listeners: list[Listener], sources: Sources
) -> None:
    system = Tries(answers={WORKER: NOBODY})
    probes = Probes(system, sources, HTTP, listeners, {"PATH": "/bin", "PYTHONPATH": "/x"})

    first = probes.run(WORKER, GenId(1), 0)
    assert first == ev.ProbeFinished(pid=WORKER, ok=False, detail=NOBODY.describe())
    assert "spawn" not in system.names()

    system.answers[WORKER] = ACCEPTING
    answer = Report(ok=False, detail="HTTP 503 Service Unavailable from pid 9", answer="HTTP 503")
    system.writes = [answer.encode()]
    assert probes.run(WORKER, GenId(1), 0) is None  # a try started: it answers when it exits
    [request] = system.requests
    assert request.argv[:3] == [sys.executable, "-m", "handoff.system.http_probe"]
    spec = json.loads(request.argv[3])
    port = listeners[0].sock.getsockname()[1]
    assert spec == {
        "worker": WORKER,
        "target": {"host": "127.0.0.1", "port": port, "unix": ""},
        "path": "/healthz",
        "statuses": [[200, 204]],
        "timeout_s": 1.5,
    }
    assert request.env["PYTHONPATH"] == "/x"
    assert request.identity is None  # the master's own user, even with --user

    [pid] = probes.pids()
    system.exit(pid, ExitStatus(code=1))
    assert probes.on_exit(pid) == ev.ProbeFinished(
        pid=WORKER, ok=False, detail=answer.detail, asked=True, answer="HTTP 503"
    )

    # Seen once is enough: the next probe is a try at once, with no scan.
    scans = system.names().count("scan")
    system.writes = [Report(ok=True, detail="HTTP 200 OK from pid 9").encode()]
    assert probes.run(WORKER, GenId(1), 0) is None
    assert system.names().count("scan") == scans
    [pid] = probes.pids()
    system.exit(pid, ExitStatus(code=0))
    result = probes.on_exit(pid)
    assert result is not None
    assert result.ok
    assert result.asked


def test_a_try_that_dies_without_a_report_is_a_failed_try(
    listeners: list[Listener], sources: Sources
) -> None:
    system = Tries(answers={WORKER: ACCEPTING})
    probes = Probes(system, sources, HTTP, listeners, {})
    system.writes = [b"Traceback (most recent call last):\nMemoryError\n"]
    probes.run(WORKER, GenId(1), 0)
    [pid] = probes.pids()
    system.exit(pid, ExitStatus(code=1))
    assert probes.on_exit(pid) == ev.ProbeFinished(
        pid=WORKER,
        ok=False,
        detail="the http probe exited 1 without a report: MemoryError",
        asked=True,
    )


def test_a_cancelled_try_reports_nothing_and_its_pipe_is_closed(
    listeners: list[Listener], sources: Sources
) -> None:
    system = Tries(answers={WORKER: ACCEPTING})
    probes = Probes(system, sources, HTTP, listeners, {})
    probes.run(WORKER, GenId(1), 0)
    [pid] = probes.pids()
    before = len(os.listdir("/proc/self/fd"))
    probes.cancel(WORKER)
    system.exit(pid, ExitStatus(signal=9))
    assert probes.on_exit(pid) is None
    assert len(os.listdir("/proc/self/fd")) == before - 2  # its pidfd and its report pipe
    # forgotten: a worker with the same pid is scanned again first
    system.answers[WORKER] = NOBODY
    assert probes.run(WORKER, GenId(2), 0) == ev.ProbeFinished(
        pid=WORKER, ok=False, detail=NOBODY.describe()
    )


def test_kill_all_closes_the_pipes(listeners: list[Listener], sources: Sources) -> None:
    system = Tries(answers={WORKER: ACCEPTING})
    probes = Probes(system, sources, HTTP, listeners, {})
    before = len(os.listdir("/proc/self/fd"))
    probes.run(WORKER, GenId(1), 0)
    probes.kill_all()
    assert probes.pids() == []
    # the fake child's own pipe end (its "process") stays with the FakeSystem
    assert len(os.listdir("/proc/self/fd")) == before + 1
