"""The loop's one door to the kernel: the ``System`` protocol and its real implementation.

Everything the master loop asks of processes goes through these few calls, so unit tests
drive the loop with a scripted fake (tests/unit/fake_system.py) and fault tests can make
any one of them fail. Kept narrow on purpose: the loop's own mechanics (the selector, its
fd-based sources) stay real, and so does everything that is not a decision about a
process. What is here is what the loop would otherwise import from ``system/``.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Protocol

from handoff.core.model import ExitStatus, Pid
from handoff.system import accepting_scan, children, deploy_paths, detach, process_tree
from handoff.system.detach import Registration
from handoff.system.warden import Warden


class System(Protocol):
    """What the master loop does to processes; see the module docstring."""

    def clock(self) -> float:
        """Monotonic seconds."""
        ...

    def spawn(self, request: children.SpawnRequest) -> children.Child:
        """Fork and exec a child; raise SpawnError if it cannot be started."""
        ...

    def reap(self, child: children.Child, *, block: bool = False) -> ExitStatus | None:
        """Reap the child if it has exited; None if it still runs."""
        ...

    def send_signal(self, child: children.Child, sig: signal.Signals) -> bool:
        """Signal through the pidfd; False if the child has exited."""
        ...

    def kill_group(self, pgid: Pid) -> None:
        """SIGKILL what is left in an exited worker's process group (before reaping it)."""
        ...

    def kill_tree(self, pid: Pid) -> None:
        """SIGKILL pid's process group and every descendant that left it."""
        ...

    def signal_group(self, pgid: Pid, sig: signal.Signals) -> None:
        """Send sig to what is in a worker's process group (its leader may be gone)."""
        ...

    def guard(self, pid: Pid, *, guarded: bool) -> None:
        """Tell the warden a worker group exists (or is gone): it dies if the master dies."""
        ...

    def detach(self, pid: Pid, listeners: Mapping[int, int]) -> detach.Detachment:
        """Take pid's tree off the listening sockets (inode -> the master's fd)."""
        ...

    def reattach(self, registrations: Sequence[Registration], listeners: Mapping[int, int]) -> int:
        """Put back registrations a detach removed; how many are in place afterwards."""
        ...

    def scan(
        self,
        pid: Pid,
        inodes: Collection[int],
        addresses: accepting_scan.ListenAddresses | None = None,
        *,
        tables: bool = True,
    ) -> accepting_scan.TreeScan:
        """Who in pid's tree waits on the sockets, or serves a connection accepted on one
        of these addresses (tables: the costly fallback allowed); raise ProcUnreadable if
        /proc says no."""
        ...

    def owning_worker(self, sender: Pid, workers: Collection[Pid]) -> Pid | None:
        """The worker whose process tree contains sender."""
        ...

    def reap_strays(self, tracked: Collection[Pid]) -> list[Pid]:
        """Reap adopted orphans that have exited."""
        ...

    def kill_strays(self, tracked: Collection[Pid]) -> list[Pid]:
        """At exit: kill and reap every adopted orphan."""
        ...

    def set_title(self, title: str) -> None:
        """The master's process title."""
        ...

    def directory(self, pid: Pid) -> str | None:
        """The directory pid runs in, by the kernel's name for it; None if unknown."""
        ...


class RealSystem:
    """``System`` on the real kernel, composed from the ``system/`` modules."""

    def __init__(self, warden: Warden) -> None:
        self._warden = warden

    def clock(self) -> float:
        return time.monotonic()

    def spawn(self, request: children.SpawnRequest) -> children.Child:
        return children.spawn(request)

    def reap(self, child: children.Child, *, block: bool = False) -> ExitStatus | None:
        return children.wait(child, block=block)

    def send_signal(self, child: children.Child, sig: signal.Signals) -> bool:
        return children.send_signal(child, sig)

    def kill_group(self, pgid: Pid) -> None:
        children.kill_group(pgid)

    def kill_tree(self, pid: Pid) -> None:
        process_tree.kill_tree(pid)

    def signal_group(self, pgid: Pid, sig: signal.Signals) -> None:
        children.signal_group(pgid, sig)

    def guard(self, pid: Pid, *, guarded: bool) -> None:
        if guarded:
            self._warden.register(pid)
        else:
            self._warden.unregister(pid)

    def detach(self, pid: Pid, listeners: Mapping[int, int]) -> detach.Detachment:
        return detach.detach(pid, listeners)

    def reattach(self, registrations: Sequence[Registration], listeners: Mapping[int, int]) -> int:
        return detach.reattach(registrations, listeners)

    def scan(
        self,
        pid: Pid,
        inodes: Collection[int],
        addresses: accepting_scan.ListenAddresses | None = None,
        *,
        tables: bool = True,
    ) -> accepting_scan.TreeScan:
        return accepting_scan.scan_tree(pid, inodes, addresses=addresses, tables=tables)

    def owning_worker(self, sender: Pid, workers: Collection[Pid]) -> Pid | None:
        return process_tree.owning_worker(sender, workers)

    def reap_strays(self, tracked: Collection[Pid]) -> list[Pid]:
        return process_tree.reap_strays(tracked)

    def kill_strays(self, tracked: Collection[Pid]) -> list[Pid]:
        return process_tree.kill_and_reap_strays(tracked)

    def set_title(self, title: str) -> None:
        process_tree.set_title(title)

    def directory(self, pid: Pid) -> str | None:
        return deploy_paths.process_directory(pid)
