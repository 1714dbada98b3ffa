"""A scripted ``System`` and fd-based sources for driving the master loop in unit tests.

No process is started. A fake child's pidfd is the read end of a pipe the test holds:
``FakeSystem.exit`` writes to it, so the loop's real selector sees the child exit exactly as
it would see a pidfd become readable. Every call is recorded in order (``calls``), the
clock is a number the test moves, and any call can be made to fail once with ``fail_next``
(the way fault tests inject EMFILE, EAGAIN or a bug).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from handoff.core.model import ExitStatus, Pid
from handoff.system.accepting_scan import TreeScan
from handoff.system.children import Child, SpawnRequest
from handoff.system.detach import Detachment, Registration

FIRST_FAKE_PID = 1000


@dataclass
class FakeProcess:
    child: Child
    exit_writer: int
    request: SpawnRequest
    status: ExitStatus | None = None
    reaped: bool = False


@dataclass
class FakeSystem:
    """``System`` with fake processes; see the module docstring."""

    now: float = 1000.0
    calls: list[tuple[object, ...]] = field(default_factory=list)
    processes: dict[Pid, FakeProcess] = field(default_factory=dict)
    accepting: set[Pid] = field(default_factory=set)  # workers a scan finds accepting
    descendants: dict[Pid, Pid] = field(default_factory=dict)  # process -> its worker
    unwatchable_next: bool = False  # the next child's pidfd is one epoll refuses (EPERM)
    directories: dict[Pid, str] = field(default_factory=dict)  # /proc/PID/cwd, as set
    _failures: dict[str, BaseException] = field(default_factory=dict)
    _next_pid: int = FIRST_FAKE_PID

    def fail_next(self, call: str, error: BaseException) -> None:
        """Make the next call of that name raise error."""
        self._failures[call] = error

    def exit(self, pid: Pid, status: ExitStatus) -> None:
        """The fake process exits: its pidfd becomes readable."""
        process = self.processes[pid]
        process.status = status
        os.write(process.exit_writer, b"x")

    def names(self) -> list[object]:
        return [call[0] for call in self.calls]

    def close(self) -> None:
        for process in self.processes.values():
            os.close(process.exit_writer)
            process.child.close()

    def _call(self, name: str, *args: object) -> None:
        self.calls.append((name, *args))
        error = self._failures.pop(name, None)
        if error is not None:
            raise error

    # -- the System protocol --------------------------------------------------------------

    def clock(self) -> float:
        return self.now

    def spawn(self, request: SpawnRequest) -> Child:
        self._call("spawn", request.executable)
        reader, writer = os.pipe2(os.O_CLOEXEC)
        if self.unwatchable_next:  # a regular file: the real epoll_ctl says EPERM
            self.unwatchable_next = False
            os.close(reader)
            reader = os.memfd_create("unwatchable", os.MFD_CLOEXEC)
        child = Child(Pid(self._next_pid), reader, exec_seen=True)
        self._next_pid += 1
        self.processes[child.pid] = FakeProcess(child, writer, request)
        return child

    def reap(self, child: Child, *, block: bool = False) -> ExitStatus | None:
        self._call("reap", child.pid, block)
        process = self.processes[child.pid]
        if process.status is None and block:
            process.status = ExitStatus(signal=signal.SIGKILL)  # a blocking reap follows a kill
        if process.status is not None:
            process.reaped = True
        return process.status

    def send_signal(self, child: Child, sig: signal.Signals) -> bool:
        self._call("send_signal", child.pid, sig)
        return self.processes[child.pid].status is None

    def kill_group(self, pgid: Pid) -> None:
        self._call("kill_group", pgid)

    def kill_tree(self, pid: Pid) -> None:
        self._call("kill_tree", pid)

    def signal_group(self, pgid: Pid, sig: signal.Signals) -> None:
        self._call("signal_group", pgid, sig)

    def guard(self, pid: Pid, *, guarded: bool) -> None:
        self._call("guard", pid, guarded)

    def detach(self, pid: Pid, listeners: Mapping[int, int]) -> Detachment:
        self._call("detach", pid)
        return Detachment(processes=1, registrations=len(listeners))

    def reattach(self, registrations: Sequence[Registration], listeners: Mapping[int, int]) -> int:
        self._call("reattach", *(r.pid for r in registrations))
        return len(registrations)

    def scan(
        self, pid: Pid, inodes: Collection[int], addresses: object = None, *, tables: bool = True
    ) -> TreeScan:
        self._call("scan", pid)
        accepting = 1 if pid in self.accepting else 0
        return TreeScan(processes=1, accepting=accepting, kinds=frozenset())

    def owning_worker(self, sender: Pid, workers: Collection[Pid]) -> Pid | None:
        self._call("owning_worker", sender)
        worker = self.descendants.get(sender, sender)
        return worker if worker in workers else None

    def reap_strays(self, tracked: Collection[Pid]) -> list[Pid]:
        self._call("reap_strays")
        return []

    def kill_strays(self, tracked: Collection[Pid]) -> list[Pid]:
        self._call("kill_strays")
        return []

    def set_title(self, title: str) -> None:
        self.calls.append(("set_title", title))

    def directory(self, pid: Pid) -> str | None:
        return self.directories.get(pid)


class PipeSource:
    """An fd the loop can watch, made readable by the test."""

    def __init__(self) -> None:
        self._reader, self._writer = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def fileno(self) -> int:
        return self._reader

    def poke(self) -> None:
        os.write(self._writer, b"x")

    def empty(self) -> None:
        try:
            while os.read(self._reader, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self._reader)
        os.close(self._writer)


class FakeInbox(PipeSource):
    """The signal inbox: signals the test sends."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[signal.Signals] = []

    def send(self, sig: signal.Signals) -> None:
        self.pending.append(sig)
        self.poke()

    def drain(self) -> list[signal.Signals]:
        self.empty()
        drained, self.pending = self.pending, []
        return drained


class FakeNotify(PipeSource):
    """The workers' notify socket: datagrams the test sends, with the sender's pid."""

    address = "@handoff/test"
    dropped = 0

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[tuple[Pid, dict[str, str]]] = []

    def send(self, sender: Pid, **fields: str) -> None:
        self.pending.append((sender, fields))
        self.poke()

    def receive(self) -> list[tuple[Pid, dict[str, str]]]:
        self.empty()
        received, self.pending = self.pending, []
        return received


class FakeWarden(PipeSource):
    """The warden: its pidfd would become readable if it died."""

    pid = Pid(999)

    @property
    def pidfd(self) -> int:
        return self.fileno()

    @property
    def lifeline(self) -> int:
        return self.fileno()
