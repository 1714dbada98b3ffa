"""The failing worker's own words: each worker's output attributed to its generation and
worker, its last lines in a failed reload's result, bounded whatever a worker writes.

Real masters, real workers (uvicorn, the demo app, small scripts), real load.
"""

from __future__ import annotations

import signal
import statistics
import sys
from pathlib import Path

import pytest

from handoff.formats.worker_lines import MAX_LINE
from tests.integration.control_harness import (
    demo_app,
    handoff,
    reload_result,
    request,
    shown,
    status_of,
)
from tests.integration.harness import APPS, Event, Load, Master, running
from tests.integration.http import get
from tests.integration.waiting import wait_until

BIN = Path(sys.executable).parent
EXCEPTION = "RuntimeError: broken release (on purpose)"  # versioned_app.py raises it


def uvicorn() -> list[str]:
    return [str(BIN / "uvicorn"), "--fd", "{fd}", "--log-level", "warning", "versioned_app:asgi"]


def outputs(master: Master, after: int = 0) -> list[Event]:
    return master.named("worker.output", after)


@pytest.mark.timeout(120)
def test_a_release_that_raises_at_import_shows_its_exception_in_reload_and_status(
    tmp_path: Path,
) -> None:
    version = tmp_path / "version"
    version.write_text("v1")
    control = tmp_path / "ctl.sock"
    env = {"VERSION_FILE": str(version), "PYTHONPATH": str(APPS)}
    args = ["--workers", "2", "--control", str(control)]
    with running(uvicorn(), args=args, env=env) as master:
        port = master.wait_ready()
        with Load(port) as load:
            load.wait_for_requests(200)
            version.write_text("broken")
            result = handoff("reload", "--control", str(control))
            load.wait_for_requests(200)
        assert load.stats.total_failures() == 0, load.stats.to_dict()
        assert get(port)[1]["version"] == "v1"

        # `handoff reload --wait`: exit 1, the worker's traceback, then the verdict.
        assert result.returncode == 1, shown(result)
        assert EXCEPTION in result.stderr, shown(result)
        assert 'versioned_app.py", line' in result.stderr, shown(result)  # where it raised
        assert result.stderr.rstrip().splitlines()[-2].startswith("handoff: error: reload failed")
        assert "the worker's last output is above" in result.stderr, shown(result)

        # The log event, and what `handoff status` shows of the last reload.
        failed = master.wait_for("reload.failed")
        assert failed["output"][-1] == EXCEPTION, failed
        assert f"worker {failed['worker']} (pid {failed['pid']})" in failed["reason"]
        last = status_of(control)["last_reload"]
        assert last["ok"] is False
        assert (last["output"], last["pid"]) == (failed["output"], failed["pid"])
        text = handoff("status", "--control", str(control))
        assert EXCEPTION in text.stdout, shown(text)

        # The lines themselves went to the log, attributed to the failing worker.
        theirs = [e for e in outputs(master) if e["pid"] == failed["pid"]]
        assert {(e["gen"], e["worker"]) for e in theirs} == {(2, failed["worker"])}
        assert EXCEPTION in [e["text"] for e in theirs]

        # A fixed release reloads, and status forgets the failure's output.
        version.write_text("v2")
        assert master.reload()["event"] == "reload.succeeded"
        assert "output" not in status_of(control)["last_reload"]


NOISY = """
import os, sys
gen, worker = os.environ["HANDOFF_GENERATION"], os.environ["HANDOFF_WORKER"]
print(f"hello from gen {gen} worker {worker}", flush=True)
sys.stderr.write(f"to stderr {gen}.{worker}\\n"); sys.stderr.flush()
sys.stdout.buffer.write(b"L" * (2 * MAX_LINE + 100) + b"\\nshort\\n"); sys.stdout.flush()
sys.stdout.buffer.write(b"invalid \\xff\\xfe utf-8\\n"); sys.stdout.flush()
sys.stdout.write("no newline before exit"); sys.stdout.flush()
os.close(1); os.close(2)  # the end of its output comes before the end of the worker
import signal; signal.pause()
""".replace("MAX_LINE", str(MAX_LINE))


@pytest.mark.timeout(60)
def test_lines_carry_generation_worker_and_pid_and_long_ones_are_split() -> None:
    args = ["--workers", "2", "--ready", "delay:0"]
    with running([sys.executable, "-c", NOISY], args=args) as master:
        master.wait_ready()
        spawned = {e["pid"]: e for e in master.named("worker.spawned")}
        ending = "no newline before exit"
        for pid, spawn in spawned.items():
            master.wait_for(
                "worker.output", 10, where=lambda e, p=pid: (e["pid"], e["text"]) == (p, ending)
            )
            mine = [e for e in outputs(master) if e["pid"] == pid]
            assert {(e["gen"], e["worker"]) for e in mine} == {(1, spawn["worker"])}
            texts = [e["text"] for e in mine]
            slot = spawn["worker"]
            assert f"hello from gen 1 worker {slot}" in texts
            assert f"to stderr 1.{slot}" in texts  # stderr: the same pipe
            assert "invalid \ufffd\ufffd utf-8" in texts
            pieces = texts[texts.index(f"to stderr 1.{slot}") + 1 : texts.index("short")]
            assert [len(piece) for piece in pieces] == [MAX_LINE, MAX_LINE, 100]
            assert texts[-1] == ending
            for event in mine:
                assert event["level"] == "info"
                assert event["timestamp"].endswith("Z")


@pytest.mark.timeout(60)
def test_on_a_console_each_line_is_prefixed_with_name_generation_and_worker() -> None:
    args = ["--log-format", "console", "--ready", "delay:0", "--name", "app"]
    with running([sys.executable, "-c", NOISY], args=args) as master:
        wait_until(
            lambda: "app[g1.w0] no newline before exit" in list(master.lines),
            20,
            "the worker's last line",
        )
        lines = list(master.lines)
        assert "app[g1.w0] hello from gen 1 worker 0" in lines
        assert "app[g1.w0] to stderr 1.0" in lines
        assert "app[g1.w0] short" in lines


@pytest.mark.timeout(60)
def test_direct_output_leaves_the_workers_lines_as_they_are() -> None:
    args = ["--worker-output", "direct", "--ready", "delay:0"]
    with running([sys.executable, "-c", NOISY], args=args) as master:
        wait_until(lambda: "short" in list(master.lines), 20, "the worker's own line")
        assert "hello from gen 1 worker 0" in list(master.lines)
        assert not outputs(master)


TICKER = """
import os, signal, sys
def tick(*_):
    print(f"tick from gen {os.environ['HANDOFF_GENERATION']}", flush=True)
signal.signal(signal.SIGUSR1, tick)
# One write: the second line, unfinished, is in the pipe once the first is seen.
os.write(1, b"waiting for USR1\\nunfinished ")
while True:
    signal.pause()
"""


WAITING = "waiting for USR1"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["upgrade", "crash"])
def test_after_a_re_exec_in_place_the_workers_output_is_still_read_and_attributed(
    tmp_path: Path, how: str
) -> None:
    control = tmp_path / "ctl.sock"
    env = {"HANDOFF_FAILPOINT": "signal.forwarded"} if how == "crash" else {}
    args = ["--workers", "2", "--ready", "delay:0", "--control", str(control)]
    with running([sys.executable, "-c", TICKER], args=args, env=env) as master:
        master.wait_ready()
        workers = {e["pid"]: e["worker"] for e in master.named("worker.spawned")}
        for pid in workers:
            master.wait_for(
                "worker.output", 10, where=lambda e, p=pid: (e["pid"], e["text"]) == (p, WAITING)
            )
        mark = master.mark()
        if how == "upgrade":
            replies = request(control, {"v": 1, "cmd": "upgrade", "wait": True}, timeout=60)
            assert replies[-1]["ok"] is True, replies
            master.signal(signal.SIGUSR1)
        else:
            master.signal(signal.SIGUSR1)  # the master crashes right after passing it on
            master.wait_for("master.resumed", 30, after=mark)
        # Read by the new code, attributed, and the line begun before the exec is whole.
        for text in ("unfinished tick from gen 1", "tick from gen 1"):
            for pid, slot in workers.items():
                event = master.wait_for(
                    "worker.output", 10, after=mark, where=lambda e, p=pid: e["pid"] == p
                )
                assert (event["gen"], event["worker"], event["text"]) == (1, slot, text)
            mark = master.mark()
            master.signal(signal.SIGUSR1)
        assert status_of(control)["master"]["reexecs"] == 1
        assert set(workers) == {
            w["pid"] for g in status_of(control)["generations"] for w in g["workers"]
        }


FLOOD = """
import os, sys, time
go, done = sys.argv[1], sys.argv[2]
if os.environ.get("HANDOFF_WORKER") != "0":
    sys.exit(0)
while not os.path.exists(go):
    time.sleep(0.01)
chunk = bytes(b for b in range(256) if b != 10) * 4096  # binary, never a newline: 1 MB
for _ in range(50):
    os.write(1, chunk)
open(f"{done}.{os.environ['HANDOFF_GENERATION']}", "w").close()
"""


def rss_peak_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


class QuietMaster(Master):
    """A master whose worker.output lines are counted, not kept (50 MB of them)."""

    output_lines = 0

    def _take(self, raw: bytes) -> None:
        if b'"event": "worker.output"' in raw:
            self.output_lines += 1
        else:
            super()._take(raw)


@pytest.mark.timeout(180)
def test_a_worker_flooding_binary_without_newlines_costs_no_reload_time_nor_memory(
    tmp_path: Path,
) -> None:
    version = tmp_path / "version"
    version.write_text("v1")
    flood = tmp_path / "flood.py"
    flood.write_text(FLOOD)
    go, done = tmp_path / "go", tmp_path / "done"
    app = " ".join(demo_app(version))
    command = ["sh", "-c", f"{sys.executable} {flood} {go} {done} & exec {app}"]
    control = tmp_path / "ctl.sock"
    master = QuietMaster(command, args=["--workers", "2", "--control", str(control)])
    try:
        port = master.wait_ready()
        with Load(port) as load:
            load.wait_for_requests(100)
            outcomes = [master.reload() for _ in range(3)]  # generations 2 to 4
            assert {e["event"] for e in outcomes} == {"reload.succeeded"}, outcomes
            usual = statistics.median(e["duration_s"] for e in outcomes)
            before = rss_peak_kib(master.pid)
            go.touch()  # generation 4's worker 0 floods, and generation 5's from its start
            wait_until(lambda: master.output_lines > 100, 30, "the flood reaching the log")
            # Its outcome over the control socket: under the flood the master's own log line
            # may be dropped (its writer never blocks; the drop is counted), not the answer.
            flooded = reload_result(control)
            assert flooded["ok"] is True, flooded
            # All 50 MB of the new worker read (its writes return only once they are).
            wait_until((tmp_path / "done.5").exists, 120, "the new worker's 50 MB")
            after = rss_peak_kib(master.pid)
            load.wait_for_requests(100)
        assert load.stats.total_failures() == 0, load.stats.to_dict()
        assert flooded["duration_s"] < usual + 1.0, (usual, flooded)
        assert after - before < 16 * 1024, f"the master's peak RSS grew {after - before} KiB"
        print(
            f"reload {usual:.3f} s usually, {flooded['duration_s']:.3f} s flooded; peak RSS "
            f"{before} -> {after} KiB; {master.output_lines} worker lines"
        )
    finally:
        master.kill()
