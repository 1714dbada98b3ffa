"""What relaying a worker's output costs: lines/s a worker can write, master CPU per line.

    python -m bench.worker_output [--lines N] [--line-bytes B] [--rounds R]
                                  [--json OUT] [--no-journal]

One worker writes N lines of B bytes to its stdout as fast as it can, once with one
write(2) per line (as a logger that flushes each record does) and once in 64 KiB
blocks (a buffered writer: the most lines per second a path can take). The same worker
runs in each of these paths to the same sink (a pipe this process reads and counts):

  bare         the worker alone, its stdout the sink
  direct       under handoff, --worker-output direct: the worker writes to the master's
               stdout, which is a pipe, so through the output relay to the sink
  json         under handoff, --worker-output attributed (the default), --log-format json:
               the worker's pipe, the master's loop, a worker.output event per line,
               the output relay, the sink
  console      the same with --log-format console (a prefix per line)
  journal      the same under "systemd": JOURNAL_STREAM names the sink, so each line is
               a datagram to journald's socket (a stand-in journald, bound in private
               mount and network namespaces, counts them: it takes them faster than
               journald would, so this is the master's own cost). Root only.

Measured: the worker's own time for the N lines (so lines/s it could write), the CPU
seconds the master and the output relay spent while it wrote (utime + stime from
/proc, read before the worker starts and once every line has reached the sink), per
100,000 lines. Each round runs every path; the figures are medians over the rounds.

With --systemd (root; the systemd tests' sandbox, tests/systemd/sandbox.sh) the same
worker runs as a service under a real systemd and journald, one per-line run per path
and round: journald's native protocol (the default under systemd), JSON lines on the
stream (``UnsetEnvironment=JOURNAL_STREAM``), and --worker-output direct. There the CPU
of journald itself is measured too, and the lines the master or the relay dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from tests.systemd.sandbox import Sandbox

PATHS = ("bare", "direct", "json", "console", "journal")
MODES = {"per-line": 1, "64k-blocks": 0}  # 0: as many lines as fit in 64 KiB
DONE = b"BENCH-DONE"
TIMEOUT_S = 120.0
QUIET_S = 0.5

WORKER = r"""
import os, sys, time
lines, size, batch, go, result = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                  sys.argv[4], sys.argv[5])
open(go, "rb").close()  # a FIFO: blocks until the bench says go
line = (b"INFO: 127.0.0.1:50312 - \"GET /items/42 HTTP/1.1\" 200 OK " * 8)[: size - 1] + b"\n"
start = time.perf_counter()
if batch == 1:
    for _ in range(lines):
        os.write(1, line)
else:
    block = line * batch
    for _ in range(lines // batch):
        os.write(1, block)
elapsed = time.perf_counter() - start
with open(result, "w") as out:
    out.write(repr(elapsed))
os.write(1, b"BENCH-DONE\n")
if os.environ.get("HANDOFF_GENERATION"):
    import signal
    signal.pause()  # under handoff: stay, the master is measured once all lines are out
"""

JOURNALD = r"""
import os, socket, sys
path, count_file = sys.argv[1], sys.argv[2]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind(path)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
os.chmod(path, 0o666)
open(count_file + ".ready", "w").close()
count = 0
while True:
    data = sock.recv(1 << 20)
    if data.startswith(b"MESSAGE=BENCH-DONE"):
        break
    count += 1
with open(count_file, "w") as out:
    out.write(str(count))
"""


@dataclass
class Run:
    path: str
    mode: str
    lines: int
    worker_s: float
    master_cpu_s: float | None = None
    relay_cpu_s: float | None = None
    sink_lines: int = 0
    journal_lines: int = 0
    journald_cpu_s: float | None = None  # --systemd: journald's own
    dropped: int = 0  # --systemd: the lines the master and the relay dropped

    @property
    def lines_per_s(self) -> float:
        return self.lines / self.worker_s

    def per_100k(self, cpu: float | None) -> float | None:
        return None if cpu is None else cpu * 100_000 / self.lines


class Sink:
    """The pipe every path writes to: read and counted by a thread, never a bottleneck."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # room for bursts: the reader shares the CPUs
            fcntl.fcntl(self.write_end, fcntl.F_SETPIPE_SZ, 1 << 20)
        self.lines = 0
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        tail = b""
        while chunk := os.read(self.read_end, 1 << 20):
            self.lines += chunk.count(b"\n")
            if DONE in tail + chunk:
                self.done.set()
            tail = chunk[-len(DONE) :]
        self.done.set()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.write_end)
        self._thread.join(10)
        with contextlib.suppress(OSError):
            os.close(self.read_end)


def cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def relay_of(master: int) -> int | None:
    for child in psutil.Process(master).children():
        with contextlib.suppress(psutil.Error):
            if "output relay" in " ".join(child.cmdline()):
                return int(child.pid)
    return None


def say_go(fifo: Path) -> None:
    """Open the FIFO for writing: the worker's blocking open for reading returns."""
    fd = os.open(fifo, os.O_WRONLY)
    os.close(fd)


def wait_done(sink: Sink, result: Path, journal_count: Path | None) -> None:
    """Until every line the worker wrote has come out: its last line reached the sink (or
    the stand-in journald, which then writes its count). The output relay drops what its
    reader cannot take in time, so once the worker is done, a sink quiet for QUIET_S
    counts as the end too."""
    deadline = time.monotonic() + TIMEOUT_S
    seen, quiet_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        if journal_count.exists() if journal_count is not None else sink.done.is_set():
            return
        if journal_count is not None:
            pass  # the sink is quiet: the lines go to journald
        elif sink.lines != seen:
            seen, quiet_since = sink.lines, time.monotonic()
        elif result.exists() and time.monotonic() - quiet_since > QUIET_S:
            return
        time.sleep(0.01)
    raise RuntimeError(f"timed out after {TIMEOUT_S:g} s waiting for the worker's lines")


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="bench-output-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def worker_argv(work: Path, lines: int, size: int, batch: int) -> list[str]:
    script = work / "worker.py"
    script.write_text(WORKER)
    return [
        sys.executable, str(script), str(lines), str(size), str(batch),
        str(work / "go"), str(work / "result"),
    ]  # fmt: skip


def run_bare(lines: int, size: int, batch: int) -> Run:
    with scratch() as work:
        os.mkfifo(work / "go")
        sink = Sink()
        try:
            worker = subprocess.Popen(
                worker_argv(work, lines, size, batch),
                stdin=subprocess.DEVNULL,
                stdout=sink.write_end,
                stderr=sink.write_end,
            )
            say_go(work / "go")
            worker.wait(TIMEOUT_S)
            wait_done(sink, work / "result", None)
        finally:
            sink.close()
        return Run("bare", "", lines, float((work / "result").read_text()), sink_lines=sink.lines)


def handoff_argv(path: str, work: Path, command: list[str]) -> list[str]:
    output = "direct" if path == "direct" else "attributed"
    log_format = "console" if path == "console" else "json"
    return [
        sys.executable, "-m", "handoff", "run", "--bind", "127.0.0.1:0", "--workers", "1",
        "--ready", "delay:0", "--control", str(work / "ctl.sock"), "--log-format", log_format,
        "--worker-output", output, "--", *command,
    ]  # fmt: skip


def journal_wrapper(work: Path, argv: list[str]) -> tuple[list[str], Path]:
    """argv in a private mount namespace whose /run/systemd/journal/socket is a stand-in
    journald (it counts the entries); returns the argv and the file it writes its count to."""
    script = work / "journald.py"
    script.write_text(JOURNALD)
    count = work / "journal-count"
    # A network namespace of its own too, for journald's queue length as systemd sets it
    # (sysctl.d/50-default.conf: net.unix.max_dgram_qlen=512; the kernel default is 10).
    shell = (
        "ip link set lo up && sysctl -q -w net.unix.max_dgram_qlen=512 && "
        "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && "
        f"{{ {sys.executable} {script} /run/systemd/journal/socket {count} & }} && "
        f'while [ ! -e {count}.ready ]; do sleep 0.01; done; exec "$@"'
    )
    wrapped = ["unshare", "-n", "-m", "--propagation", "private", "sh", "-c", shell, "sh"]
    return [*wrapped, *argv], count


def run_handoff(path: str, lines: int, size: int, batch: int) -> Run:
    with scratch() as work:
        os.mkfifo(work / "go")
        argv = handoff_argv(path, work, worker_argv(work, lines, size, batch))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
        env.pop("JOURNAL_STREAM", None)
        count_file = None
        sink = Sink()
        if path == "journal":
            argv, count_file = journal_wrapper(work, argv)
            info = os.fstat(sink.write_end)
            env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=sink.write_end, stderr=sink.write_end,
            env=env, start_new_session=True,
        )  # fmt: skip
        try:
            master = master_pid(process.pid)
            relay = relay_of(master)
            master_before = cpu_s(master)
            relay_before = cpu_s(relay) if relay else 0.0
            say_go(work / "go")
            wait_done(sink, work / "result", count_file)
            master_cpu = cpu_s(master) - master_before
            relay_cpu = cpu_s(relay) - relay_before if relay else None
        finally:
            stop(process)
            sink.close()
        journalled = int(count_file.read_text()) if count_file and count_file.exists() else 0
        return Run(
            path, "", lines, float((work / "result").read_text()), master_cpu, relay_cpu,
            sink_lines=sink.lines, journal_lines=journalled,
        )  # fmt: skip


def master_pid(launched: int) -> int:
    """The handoff master: the process launched, or under unshare, its descendant."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):
            for proc in [psutil.Process(launched), *psutil.Process(launched).children(True)]:
                title = " ".join(proc.cmdline())
                if title.startswith("handoff: master") and "ready" in title:
                    return int(proc.pid)
        time.sleep(0.01)
    raise RuntimeError("the master did not start")


def stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


SERVICE_WORKER = r"""
import os, signal, sys, time
lines, result, go = int(sys.argv[1]), sys.argv[2], sys.argv[3]
while not os.path.exists(go):  # the bench has read the CPU counters
    time.sleep(0.01)
line = (b"INFO: 127.0.0.1:50312 - \"GET /items/42 HTTP/1.1\" 200 OK " * 8)[:99] + b"\n"
start = time.perf_counter()
for _ in range(lines):
    os.write(1, line)
with open(result, "w") as out:
    out.write(repr(time.perf_counter() - start))
signal.pause()
"""
SYSTEMD_PATHS = ("native", "stream", "direct")


def systemd_runs(lines: int, rounds: int) -> list[Run]:
    """The per-line run of each path as a service under a real systemd (see the top)."""
    from tests.systemd.conftest import missing_for_sandbox  # noqa: PLC0415 - --systemd only
    from tests.systemd.sandbox import Sandbox  # noqa: PLC0415

    reason = missing_for_sandbox()
    if reason:
        print(f"--systemd: skipped: {reason}")
        return []
    runs = []
    with scratch() as work:
        box = Sandbox(work / "sandbox")
        (work / "sandbox").mkdir()
        box.boot()
        try:
            for round_number in range(1, rounds + 1):
                for number, path in enumerate(SYSTEMD_PATHS):
                    run = service_run(box, path, lines, f"bench-output-{round_number}-{number}")
                    runs.append(run)
                    print(
                        f"round {round_number} systemd    {path:<8} {run.lines_per_s:>12,.0f}"
                        f" lines/s  master {number_of(run.master_cpu_s)} s, relay "
                        f"{number_of(run.relay_cpu_s)} s, journald "
                        f"{number_of(run.journald_cpu_s)} s  dropped {run.dropped}",
                        flush=True,
                    )
        finally:
            box.down()
    return runs


def number_of(value: float | None) -> str:
    return number(value, 3)


def service_run(box: Sandbox, path: str, lines: int, name: str) -> Run:
    """One service: the example unit with the worker above."""
    from tests.systemd.units import (  # noqa: PLC0415 - --systemd only
        adapt_service,
        free_port,
        handoff_executable,
        split_exec_start,
        systemd_command,
    )

    inside = f"/run/handoff-tests/{name}"
    host = box.host_path(inside)
    host.mkdir(parents=True, exist_ok=True)
    for directory in (host, host.parent):
        directory.chmod(0o755)
    (host / "worker.py").write_text(SERVICE_WORKER)
    (host / "worker.py").chmod(0o644)
    unit = f"{name}.service"
    files = adapt_service(
        "handoff-example.service", unit, port=free_port(), version_inside="", workers=1
    )
    handoff_argv, _ = split_exec_start(files[f"{unit}.d/test.conf"])  # the last ExecStart=
    options = ["--ready", "delay:0", *(["--worker-output", "direct"] if path == "direct" else [])]
    command = [*handoff_argv, *options, "--", sys.executable, f"{inside}/worker.py"]
    command += [str(lines), f"{inside}/result", f"{inside}/go"]
    dropin = ["[Service]", "ExecStart=", f"ExecStart={systemd_command(command)}"]
    dropin.append("LogRateLimitIntervalSec=0")  # journald would drop a flood's lines
    if path == "stream":
        dropin.append("UnsetEnvironment=JOURNAL_STREAM")
    box.install({**files, f"{unit}.d/zz-bench.conf": "\n".join(dropin) + "\n"})
    try:
        box.ctl("start", unit, timeout=60)
        master = box.host_pid(box.main_pid(unit))
        relay = relay_of(master)
        journald = next(
            proc.pid
            for proc in psutil.Process(box.pid).children(recursive=True)
            if proc.name() == "systemd-journald"
        )
        helpers = [pid for pid in (relay, journald) if pid is not None]
        before = cpu_s(master), cpu_s(relay) if relay else 0.0, cpu_s(journald)
        (host / "go").touch()
        deadline = time.monotonic() + TIMEOUT_S
        while not (host / "result").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{unit}: the worker did not finish")
            time.sleep(0.05)
        spent = -1.0
        while spent != (spent := sum(map(cpu_s, [master, *helpers]))):  # until all idle
            time.sleep(QUIET_S)
        status = box.run(handoff_executable(), "status", "--json", "--control",
                         f"/run/{name}/handoff.sock").stdout  # fmt: skip
        dropped = int(json.loads(status)["master"]["log_lines_dropped"])
        return Run(
            path, "per-line", lines, float((host / "result").read_text()),
            cpu_s(master) - before[0], cpu_s(relay) - before[1] if relay else None,
            journald_cpu_s=cpu_s(journald) - before[2], dropped=dropped,
        )  # fmt: skip
    finally:
        box.uninstall([unit])


def journal_available() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None


def median(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(runs: list[Run], paths: list[str]) -> list[str]:
    out = []
    for mode in MODES:
        bare = median([r.lines_per_s for r in runs if (r.path, r.mode) == ("bare", mode)])
        out += [
            f"{mode} writes",
            f"{'path':<10}{'lines/s':>12}{'vs bare':>9}{'master CPU s':>14}{'relay CPU s':>13}"
            "   (CPU per 100k lines)",
        ]
        for path in paths:
            mine = [r for r in runs if (r.path, r.mode) == (path, mode)]
            rate = median([r.lines_per_s for r in mine])
            master = median([r.per_100k(r.master_cpu_s) for r in mine])
            relay = median([r.per_100k(r.relay_cpu_s) for r in mine])
            versus = None if rate is None or not bare else rate / bare
            out.append(
                f"{path:<10}{number(rate):>12}{number(versus, 2):>9}"
                f"{number(master, 3):>14}{number(relay, 3):>13}"
            )
        out.append("")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--line-bytes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-journal", action="store_true", help="skip the journald path")
    parser.add_argument("--json", metavar="OUT", help="also write every run here")
    parser.add_argument(
        "--systemd", action="store_true", help="also under a real systemd and journald (root)"
    )
    args = parser.parse_args()
    paths = [p for p in PATHS if p != "journal" or (journal_available() and not args.no_journal)]
    runs: list[Run] = []
    for round_number in range(1, args.rounds + 1):
        for mode, batch in MODES.items():
            per_write = batch or max(1, 65536 // args.line_bytes)
            for path in paths:
                if path == "bare":
                    run = run_bare(args.lines, args.line_bytes, per_write)
                else:
                    run = run_handoff(path, args.lines, args.line_bytes, per_write)
                run.mode = mode
                runs.append(run)
                cpu = (
                    f"master {number(run.master_cpu_s, 3)} s, relay {number(run.relay_cpu_s, 3)} s"
                )
                print(
                    f"round {round_number} {mode:<10} {path:<8} {run.lines_per_s:>12,.0f} lines/s"
                    f"  {cpu}  sink {run.sink_lines:,} lines"
                    + (f"  journal {run.journal_lines:,}" if path == "journal" else ""),
                    flush=True,
                )
    service = systemd_runs(args.lines, args.rounds) if args.systemd else []
    print()
    print(f"{args.lines:,} lines of {args.line_bytes} bytes, medians of {args.rounds} rounds")
    print("\n".join(table(runs, paths)))
    if service:
        print("under systemd, per-line writes (CPU per 100k lines)")
        print(
            f"{'path':<10}{'lines/s':>12}{'master CPU s':>14}{'relay CPU s':>13}"
            f"{'journald CPU s':>16}{'dropped':>9}"
        )
        for path in SYSTEMD_PATHS:
            mine = [r for r in service if r.path == path]
            print(
                f"{path:<10}{number(median([r.lines_per_s for r in mine])):>12}"
                f"{number(median([r.per_100k(r.master_cpu_s) for r in mine]), 3):>14}"
                f"{number(median([r.per_100k(r.relay_cpu_s) for r in mine]), 3):>13}"
                f"{number(median([r.per_100k(r.journald_cpu_s) for r in mine]), 3):>16}"
                f"{number(median([float(r.dropped) for r in mine])):>9}"
            )
        runs += service
    if args.json:
        document = {"lines": args.lines, "line_bytes": args.line_bytes, "runs": []}
        document["runs"] = [asdict(run) for run in runs]
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
