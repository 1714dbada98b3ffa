"""The control socket (docs/control.md): ``handoff reload``, its progress and its outcome.

Real masters and workers; the clients are the real ``handoff`` commands run as
subprocesses. A reload's progress is streamed while it runs, a failing version is
reported with its reason while the old one keeps serving, and concurrent clients each
get the result of the reload they joined.
"""

from __future__ import annotations

import os
import re
import select
import signal
import stat
import time
from pathlib import Path

import pytest

from tests.integration.control_harness import (
    MISBEHAVE,
    Clients,
    demo_app,
    finish,
    handoff,
    selectable,
    shown,
    spawn,
    start,
    status_of,
)
from tests.integration.harness import Load, running
from tests.integration.http import get

pytest_plugins = ("tests.integration.control_fixtures",)

DURATION = re.compile(r"(\d+(?:\.\d+)?)\s?(ms|s)\b")


def durations(text: str) -> list[float]:
    """Every duration written in text ("0.31 s", "312 ms"), in seconds."""
    return [float(n) / (1000 if unit == "ms" else 1) for n, unit in DURATION.findall(text)]


class LineStream:
    """Lines of a pipe, each read with a deadline (no blocking readline)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""
        self.eof = False

    def readline(self, timeout: float) -> str | None:
        """The next line, or None at EOF."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer and not self.eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line within {timeout} s; so far {self.buffer!r}")
            readable, _, _ = select.select([self.fd], [], [], remaining)
            if readable:
                chunk = os.read(self.fd, 4096)
                self.eof = not chunk
                self.buffer += chunk
        if not self.buffer:
            return None
        text, _, self.buffer = self.buffer.partition(b"\n")
        return text.decode()


# -- reload --wait -------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_reload_wait_reports_progress_and_timing_and_the_new_version_answers(
    tmp_path: Path,
) -> None:
    version = tmp_path / "version"
    version.write_text("v1")
    control = tmp_path / "ctl.sock"
    args = ["--workers", "2", "--control", str(control)]
    with running(demo_app(version), args=args) as master:
        port = start(master, control)
        assert stat.S_IMODE(control.stat().st_mode) == 0o600
        with Load(port) as load:
            load.wait_for_requests(100)
            version.write_text("v2")
            mark = master.mark()
            result = handoff("reload", "--wait", "--control", str(control), merged=True)
            assert result.returncode == 0, shown(result)
            succeeded = master.wait_for("reload.succeeded", 10, after=mark)
            assert succeeded["gen"] == 2

            lines = result.stdout.splitlines()

            def first(pattern: str) -> int:
                found = [i for i, text in enumerate(lines) if re.search(pattern, text)]
                assert found, f"no line matching {pattern!r} in:\n{result.stdout}"
                return found[0]

            started = first(r"generation 2 started")
            one = first(r"\b1 of 2 workers ready")
            two = first(r"\b2 of 2 workers ready")
            draining = first(r"generation 1 draining")
            assert started < one < two < draining, result.stdout
            # The timing: the reload's duration as the master measured it.
            printed = durations("\n".join(lines[draining:]))
            assert printed, f"no duration after the progress lines:\n{result.stdout}"
            expected = float(succeeded["duration_s"])
            assert any(abs(d - expected) <= 0.05 + 0.1 * expected for d in printed), (
                f"printed {printed}, the master measured {expected} s:\n{result.stdout}"
            )

            master.wait_for("generation.gone", 30, where=lambda e: e["gen"] == 1)
            for _ in range(5):
                status, body = get(port)
                assert (status, body["version"]) == (200, "v2")
            load.wait_for_requests(100)
        assert load.stats.total_failures() == 0, load.stats.to_dict()
        master.signal(signal.SIGTERM)
        assert master.wait_exit(30) == 0
    assert not control.exists(), "the control socket outlived the master"


@pytest.mark.timeout(60)
def test_reload_wait_streams_progress_while_the_reload_runs(
    tmp_path: Path, clients: Clients
) -> None:
    """A worker that takes 1.5 s to accept: "started" must be printed before it is ready."""
    control = tmp_path / "ctl.sock"
    command = [*MISBEHAVE, "waits-in", "slow-epoll"]
    with running(command, args=["--control", str(control)]) as master:
        start(master, control)
        mark = master.mark()
        client = spawn(clients, "reload", "--control", str(control))
        assert client.stdout is not None
        stream = LineStream(client.stdout.fileno())
        lines: list[str] = []
        while not any("generation 2 started" in text for text in lines):
            text = stream.readline(20)
            assert text is not None, f"the client ended without a progress line: {lines}"
            lines.append(text)
        assert not master.named("worker.ready", after=mark), (
            f"'generation 2 started' came only after the new worker was ready: {lines}"
        )
        while (text := stream.readline(30)) is not None:
            lines.append(text)
        assert client.wait(10) == 0, "\n".join(lines)
        assert any("1 of 1 workers ready" in text for text in lines), lines
        assert master.named("reload.succeeded", after=mark)


# -- a failing version ---------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_reload_wait_exits_1_with_the_reason_while_requests_keep_succeeding(
    tmp_path: Path,
) -> None:
    mode = tmp_path / "mode"
    command = selectable(mode, "ok", "v1")
    control = tmp_path / "ctl.sock"
    args = ["--workers", "2", "--ready-timeout", "2", "--control", str(control)]
    with running(command, args=args) as master:
        port = start(master, control)
        assert status_of(control)["last_reload"] is None
        with Load(port) as load:
            load.wait_for_requests(200)

            mode.write_text("exit-at-start")
            mark = master.mark()
            result = handoff("reload", "--control", str(control), merged=True)
            failed = master.wait_for("reload.failed", 10, after=mark)
            assert result.returncode == 1, shown(result)
            assert "exited 3 before it was ready" in result.stdout, shown(result)
            assert failed["reason"] in result.stdout, (failed, shown(result))
            last = status_of(control)["last_reload"]
            assert (last["gen"], last["ok"], last["reason"]) == (2, False, failed["reason"])
            load.wait_for_requests(200)
            assert get(port)[1]["version"] == "v1"

            mode.write_text("hang-at-start")
            mark = master.mark()
            result = handoff("reload", "--control", str(control), merged=True)
            failed = master.wait_for("reload.failed", 10, after=mark)
            assert result.returncode == 1, shown(result)
            assert "not ready after 2 s" in result.stdout, shown(result)
            assert failed["reason"] in result.stdout, (failed, shown(result))
            load.wait_for_requests(200)
            assert get(port)[1]["version"] == "v1"
            assert not master.named("generation.draining")

            mode.write_text("ok")
            Path(f"{mode}.version").write_text("v2")
            result = handoff("reload", "--control", str(control), merged=True)
            assert result.returncode == 0, shown(result)
            last = status_of(control)["last_reload"]
            assert (last["gen"], last["ok"]) == (4, True), last
            master.wait_for("generation.gone", 30, where=lambda e: e["gen"] == 1)
            assert get(port)[1]["version"] == "v2"
            load.wait_for_requests(200)
        assert load.stats.total_failures() == 0, load.stats.to_dict()
        master.signal(signal.SIGTERM)
        assert master.wait_exit(30) == 0


@pytest.mark.timeout(60)
def test_reload_waiters_are_told_when_the_master_stops_first(
    tmp_path: Path, clients: Clients
) -> None:
    mode = tmp_path / "mode"
    control = tmp_path / "ctl.sock"
    args = ["--ready-timeout", "30", "--control", str(control)]
    with running(selectable(mode, "ok", "v1"), args=args) as master:
        start(master, control)
        mode.write_text("hang-at-start")
        mark = master.mark()
        reloader = spawn(clients, "reload", "--control", str(control))
        master.wait_for("generation.started", 30, after=mark)
        master.signal(signal.SIGTERM)
        result = finish(reloader, 30)
        assert result.returncode == 1, shown(result)
        assert "cancelled: master stopping" in result.stdout, shown(result)
        assert master.wait_exit(30) == 0


# -- concurrent clients --------------------------------------------------------------------


@pytest.mark.timeout(150)
@pytest.mark.parametrize("release", ["good", "bad"])
def test_concurrent_reload_clients_all_get_the_result_of_the_reload_they_joined(
    tmp_path: Path, clients: Clients, release: str
) -> None:
    """5 clients at once, 3 more while the first reload runs: one or two generations.

    Each reload takes 4 s (readiness after 4 s, or a worker that never gets ready with a
    4 s timeout), so the later clients surely arrive while the first one runs.
    """
    control = tmp_path / "ctl.sock"
    mode = tmp_path / "mode"
    if release == "good":
        command, args = ["sleep", "1000"], ["--ready", "delay:4"]
    else:
        command, args = selectable(mode, "ok", "v1"), ["--ready-timeout", "4"]
    with running(command, args=[*args, "--workers", "2", "--control", str(control)]) as master:
        start(master, control)
        if release == "bad":
            mode.write_text("hang-at-start")
        mark = master.mark()
        first = [spawn(clients, "reload", "--control", str(control)) for _ in range(5)]
        master.wait_for("generation.started", 30, after=mark)
        later = [spawn(clients, "reload", "--control", str(control)) for _ in range(3)]
        results = [finish(client, 60) for client in first + later]

        expected = 0 if release == "good" else 1
        for result in results:
            assert result.returncode == expected, shown(result)
            if release == "bad":
                assert "not ready after 4 s" in result.stdout, shown(result)
        started = master.named("generation.started", after=mark)
        assert 1 <= len(started) <= 2, started
        outcome = "reload.succeeded" if release == "good" else "reload.failed"
        assert len(master.named(outcome, after=mark)) == len(started)
        master.signal(signal.SIGTERM)
        assert master.wait_exit(30) == 0
