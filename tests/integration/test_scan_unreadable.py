"""``--ready auto`` when /proc hides part of the workers (review finding #9).

The master runs as uid 0 with every capability dropped (``setpriv --bounding-set=-all``):
then, as for a non-root master, /proc of a non-dumpable process (setuid or
file-capability helpers, ``prctl(PR_SET_DUMPABLE, 0)``) is closed to it. A root master
with CAP_SYS_PTRACE would read everything, and the test would prove nothing.

Worker 0 makes itself non-dumpable: nothing of its tree can be read, so it is ready
only through READY=1. Worker 1 forks a non-dumpable child and waits in accept itself: its
child is skipped, and auto sees worker 1. Both generations of a reload get ready; before,
the first unreadable process switched ``auto`` off for the master's life.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.integration.harness import running

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)"),
]

WORKER = r"""
import ctypes, os, signal, socket, sys

PR_SET_DUMPABLE = 4
libc = ctypes.CDLL(None, use_errno=True)
listener = socket.socket(fileno=3)

def undumpable():
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        sys.exit(f"prctl: {os.strerror(ctypes.get_errno())}")

if os.environ["HANDOFF_WORKER"] == "0":
    undumpable()
    address = os.environ["NOTIFY_SOCKET"]
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.sendto(b"READY=1", address)
else:
    done_r, done_w = os.pipe()
    if os.fork() == 0:
        undumpable()
        os.write(done_w, b"x")
        signal.pause()
        os._exit(0)
    os.read(done_r, 1)  # accept only once the child is hidden: the scan must skip it
while True:
    connection, _ = listener.accept()
    connection.close()
"""


def capless_python(tmp_path: Path) -> str:
    """An executable that runs this Python with no capability at all (still uid 0)."""
    wrapper = tmp_path / "capless-python"
    wrapper.write_text(
        f'#!/bin/sh\nexec setpriv --bounding-set=-all --inh-caps=-all -- "{sys.executable}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return str(wrapper)


def test_auto_skips_what_it_cannot_read_and_works_for_every_other_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = tmp_path / "worker.py"
    app.write_text(WORKER)
    command = [sys.executable, str(app)]
    args = [
        "--workers",
        "2",
        "--ready",
        "auto",
        "--ready-timeout",
        "20",
        "--name",
        "scan-unreadable",
        "--control",
        str(tmp_path / "control.sock"),
    ]
    # The harness starts the master with sys.executable: the capless wrapper, for the
    # master only (its workers inherit the empty capability sets anyway).
    monkeypatch.setattr(sys, "executable", capless_python(tmp_path))

    with running(command, args=args) as master:
        monkeypatch.undo()
        master.wait_for("master.ready", 30)
        ready = sorted(master.named("worker.ready"), key=lambda e: int(e["worker"]))

        assert ready[0]["via"] == "notify", ready[0]
        assert ready[1]["via"] == "auto", ready[1]
        assert "could not be read" in ready[1]["detail"]
        [unavailable] = master.named("readiness.unavailable")
        assert unavailable["pid"] == ready[0]["pid"]
        assert "READY=1 still counts" in unavailable["hint"]
        limited = master.named("readiness.limited")
        assert [e["pid"] for e in limited] == [ready[1]["pid"]]

        outcome = master.reload(60)

        assert outcome["event"] == "reload.succeeded", master.diagnose(str(outcome))
        second = [e for e in master.named("worker.ready") if e["gen"] == outcome["gen"]]
        assert sorted((e["worker"], e["via"]) for e in second) == [(0, "notify"), (1, "auto")]
        assert len(master.named("readiness.unavailable")) == 1  # once per master
