"""The output relay, in a real child process whose stderr is a pipe this test reads."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import os, sys, time
from handoff.system.output_relay import start_relay
relay = start_relay("test")
assert relay is not None
os.write(2, b"before\n")
sys.stdin.readline()                      # the test closes its end of the pipe now
for _ in range(200):
    os.write(2, b"x" * 100 + b"\n")       # no EPIPE: the relay takes it
deadline = time.monotonic() + 10
while relay.dropped() == 0 and time.monotonic() < deadline:
    time.sleep(0.01)                      # polled: the relay's counter has no event
print(relay.dropped(), flush=True)
relay.finish()
"""


@pytest.mark.timeout(30)
def test_a_log_reader_that_goes_away_costs_dropped_output_not_a_broken_pipe() -> None:
    read_end, write_end = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-c", SCRIPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=write_end,
        text=True,
    )
    os.close(write_end)
    try:
        assert os.read(read_end, 7) == b"before\n"
        os.close(read_end)  # the log reader goes away
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        out, _ = child.communicate(timeout=20)
        assert child.returncode == 0, out
        assert int(out.split()[0]) > 0, out
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_a_terminal_gets_no_relay(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = (
        "import sys; from handoff.system.output_relay import start_relay; "
        f"open({str(out)!r}, 'w').write(repr(start_relay('t')))"
    )
    controller, terminal = pty.openpty()
    try:
        subprocess.run(
            [sys.executable, "-c", code], stdout=terminal, stderr=terminal, timeout=20, check=True
        )
    finally:
        os.close(terminal)
        os.close(controller)
    assert out.read_text() == "None"
