"""The tree walk and the ``--ready auto`` scan against a /proc built in a temporary
directory (system/process_tree.py, system/accepting_scan.py).

A built /proc can show on demand what the real one shows only on some hosts: no children
files (kernels without CONFIG_PROC_CHILDREN), a descendant the kernel will not show to a
root master, and an EPERM on a thread's syscall file (Yama ptrace_scope 2). The files are
real files; only the refusals are injected, through ``ProcFiles``, the scan's one door to
/proc.
"""

from __future__ import annotations

import os
import platform
import struct
from pathlib import Path

import pytest

from handoff.core.model import Pid
from handoff.formats.procfs import MAX_POLL_ENTRIES, SYSCALLS, WaitKind
from handoff.system.accepting_scan import (
    MEMORY_BUDGET,
    ProcFiles,
    ProcUnreadable,
    scan_tree,
)
from handoff.system.process_tree import Member, tree

pytestmark = pytest.mark.timeout(30)

SOCKET = 0x6F  # the listening socket's inode
EPOLL = "anon_inode:[eventpoll]"


def nr(kind: WaitKind) -> int:
    """This machine's number of a call of that kind (the scan parses the running arch)."""
    return min(n for n, k in SYSCALLS[platform.machine()].items() if k is kind)


def blocked(kind: WaitKind, *args: int) -> str:
    padded = [*args, 0, 0, 0, 0, 0, 0][:6]
    return f"{nr(kind)} " + " ".join(hex(a) for a in padded) + " 0x7ffd 0x7f12\n"


class FakeProc:
    """A /proc tree: stat, fd links, fdinfo, task/TID/{syscall,children}, a sparse mem."""

    def __init__(self, root: Path, *, children_files: bool = True) -> None:
        self.root = root
        self.children_files = children_files
        self.kids: dict[int, list[int]] = {}

    def add(
        self,
        pid: int,
        ppid: int,
        *,
        started: int = 100,
        fds: dict[int, str] | None = None,
        fdinfo: dict[int, str] | None = None,
        threads: dict[int, str] | None = None,
        memory: dict[int, bytes] | None = None,
        listed_by_parent: bool = True,
    ) -> None:
        base = self.root / str(pid)
        for part in ("fd", "fdinfo", "task"):
            (base / part).mkdir(parents=True)
        fields = ["S", str(ppid), str(pid), str(pid)] + ["0"] * 15 + [str(started), "0"]
        (base / "stat").write_text(f"{pid} (fake) " + " ".join(fields) + "\n")
        for fd, link in (fds or {}).items():
            os.symlink(link, base / "fd" / str(fd))
        for fd, text in (fdinfo or {}).items():
            (base / "fdinfo" / str(fd)).write_text(text)
        for tid, line in {pid: "running\n", **(threads or {})}.items():
            (base / "task" / str(tid)).mkdir()
            (base / "task" / str(tid) / "syscall").write_text(line)
        with open(base / "mem", "wb") as f:
            for address, data in (memory or {}).items():
                f.seek(address)
                f.write(data)
        self.kids[pid] = []
        if listed_by_parent and ppid in self.kids:
            self.kids[ppid].append(pid)
        if self.children_files:
            for parent, kids in self.kids.items():
                task = self.root / str(parent) / "task" / str(parent)
                (task / "children").write_text("".join(f"{k} " for k in kids))


class DenyingFiles(ProcFiles):
    """Refuses (EPERM) the reads whose path contains one of the given fragments."""

    def __init__(self, root: str, *denied: str) -> None:
        super().__init__(root)
        self.denied = denied
        self.memory_reads: list[int] = []

    def _check(self, path: str) -> None:
        if any(fragment in path for fragment in self.denied):
            raise PermissionError(1, "Operation not permitted", path)

    def listdir(self, pid: int, *parts: str) -> list[str]:
        self._check(self.path(pid, *parts))
        return super().listdir(pid, *parts)

    def read_text(self, pid: int, *parts: str) -> str:
        self._check(self.path(pid, *parts))
        return super().read_text(pid, *parts)

    def read_memory(self, pid: int, address: int, size: int) -> bytes:
        self._check(self.path(pid, "mem"))
        self.memory_reads.append(size)
        return super().read_memory(pid, address, size)


def epoll_process(fake: FakeProc, pid: int, ppid: int, **extra: object) -> None:
    """A process with the socket on fd 3 registered in its epoll set on fd 4."""
    tfd = f"tfd:        3 events:       19 data: 3  pos:0 ino:{SOCKET:x} sdev:9\n"
    fdinfo = f"pos:\t0\nflags:\t02\n{tfd}"
    fake.add(
        pid,
        ppid,
        fds={3: f"socket:[{SOCKET}]", 4: EPOLL},
        fdinfo={4: fdinfo},
        **extra,  # type: ignore[arg-type]
    )


def pids(members: list[Member]) -> list[int]:
    return [m.pid for m in members]


# -- the walk -------------------------------------------------------------------------------


def build_family(root: Path, *, children_files: bool) -> FakeProc:
    fake = FakeProc(root, children_files=children_files)
    fake.add(1, 0)
    fake.add(10, 1)
    fake.add(11, 10)
    fake.add(12, 11)
    fake.add(50, 1)  # not in the tree
    # Its stat names 10 as its parent, but 10's children file does not list it: only the
    # fallback (every stat on the host) can find it. It tells which walk ran.
    fake.add(20, 10, listed_by_parent=False)
    return fake


def test_the_tree_is_walked_down_the_children_files(tmp_path: Path) -> None:
    build_family(tmp_path, children_files=True)
    assert pids(tree(Pid(10), str(tmp_path))) == [10, 11, 12]


def test_without_children_files_every_stat_is_read(tmp_path: Path) -> None:
    build_family(tmp_path, children_files=False)
    assert sorted(pids(tree(Pid(10), str(tmp_path)))) == [10, 11, 12, 20]


def test_a_listed_child_whose_pid_now_names_another_process_is_left_out(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    fake.add(10, 1)
    fake.add(11, 10)
    # The children file was read, then 11 died and its pid went to a process of another
    # parent: its stat disagrees with the listing.
    (tmp_path / "11" / "stat").write_text(
        "11 (other) S 77 11 11 " + " ".join(["0"] * 15) + " 555 0\n"
    )
    assert pids(tree(Pid(10), str(tmp_path))) == [10]


def test_members_carry_their_parent_and_start_time(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    fake.add(10, 1, started=4242)
    fake.add(11, 10, started=4343)
    members = tree(Pid(10), str(tmp_path))
    assert [(m.pid, m.ppid, m.started) for m in members] == [(10, 1, 4242), (11, 10, 4343)]


def test_an_invisible_root_has_no_tree(tmp_path: Path) -> None:
    assert tree(Pid(10), str(tmp_path)) == []


# -- unreadable processes ----------------------------------------------------------------------


def test_an_unreadable_descendant_is_skipped_and_the_rest_is_scanned(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    fake.add(10, 1, fds={3: f"socket:[{SOCKET}]"})
    fake.add(11, 10)  # non-dumpable: its /proc/PID/fd is refused
    epoll_process(fake, 12, 10)
    files = DenyingFiles(str(tmp_path), "/11/fd")

    found = scan_tree(Pid(10), {SOCKET}, files)

    assert (found.processes, found.accepting, found.unreadable) == (3, 1, (11,))
    assert found.kinds == {WaitKind.EPOLL}
    assert found.describe() == "accepting in 1 of 3 processes (epoll); 1 could not be read"


def test_an_unreadable_worker_with_a_readable_child_is_still_seen(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    fake.add(10, 1)
    epoll_process(fake, 11, 10)

    found = scan_tree(Pid(10), {SOCKET}, DenyingFiles(str(tmp_path), "/10/fd"))

    assert (found.accepting, found.unreadable) == (1, (10,))


def test_a_tree_of_which_nothing_can_be_read_is_unreadable(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    fake.add(10, 1)
    fake.add(11, 10)

    with pytest.raises(ProcUnreadable, match="permission denied"):
        scan_tree(Pid(10), {SOCKET}, DenyingFiles(str(tmp_path), "/fd"))
    with pytest.raises(ProcUnreadable, match="cannot see"):
        scan_tree(Pid(99), {SOCKET}, ProcFiles(str(tmp_path)))  # hidepid: no /proc/99


def test_a_refused_syscall_file_makes_the_process_blind_not_unreadable(tmp_path: Path) -> None:
    """Yama ptrace_scope 2: fd readable, syscall and mem not. Epoll is still seen."""
    fake = FakeProc(tmp_path)
    fake.add(10, 1, fds={3: f"socket:[{SOCKET}]"}, threads={10: blocked(WaitKind.ACCEPT, 3)})
    epoll_process(fake, 11, 10, threads={11: blocked(WaitKind.ACCEPT, 3)})
    files = DenyingFiles(str(tmp_path), "/syscall")

    found = scan_tree(Pid(10), {SOCKET}, files)

    assert found.blind == (10, 11)
    assert found.unreadable == ()
    assert (found.accepting, found.kinds) == (1, frozenset({WaitKind.EPOLL}))
    assert scan_tree(Pid(10), {SOCKET}, ProcFiles(str(tmp_path))).accepting == 2


def test_a_refused_mem_read_makes_the_process_blind(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    pollfd = struct.pack("=ihh", 3, 1, 0)
    fake.add(
        10,
        1,
        fds={3: f"socket:[{SOCKET}]"},
        threads={10: blocked(WaitKind.POLL, 0x100, 1)},
        memory={0x100: pollfd},
    )

    assert scan_tree(Pid(10), {SOCKET}, DenyingFiles(str(tmp_path), "/mem")).blind == (10,)
    readable = scan_tree(Pid(10), {SOCKET}, ProcFiles(str(tmp_path)))
    assert (readable.accepting, readable.kinds) == (1, frozenset({WaitKind.POLL}))


# -- what a scan reads of a worker's memory ----------------------------------------------------


def test_a_poll_array_over_the_cap_is_not_read(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    big = struct.pack("=ihh", 3, 1, 0) * (MAX_POLL_ENTRIES + 1)
    fake.add(
        10,
        1,
        fds={3: f"socket:[{SOCKET}]"},
        threads={10: blocked(WaitKind.POLL, 0x100, MAX_POLL_ENTRIES + 1)},
        memory={0x100: big},
    )
    files = DenyingFiles(str(tmp_path))

    assert scan_tree(Pid(10), {SOCKET}, files).accepting == 0
    assert files.memory_reads == []


def test_memory_reads_stop_at_the_scans_budget(tmp_path: Path) -> None:
    """Threads polling full-size arrays without the socket: reading stops at the budget, and
    a thread past it is not seen this scan."""
    array = struct.pack("=ihh", 9, 1, 0) * MAX_POLL_ENTRIES
    size = len(array)
    threads = {tid: blocked(WaitKind.POLL, 0x100, MAX_POLL_ENTRIES) for tid in range(100, 140)}
    fake = FakeProc(tmp_path)
    fake.add(10, 1, fds={3: f"socket:[{SOCKET}]"}, threads=threads, memory={0x100: array})
    files = DenyingFiles(str(tmp_path))

    assert scan_tree(Pid(10), {SOCKET}, files).accepting == 0
    assert files.memory_reads == [size] * (MEMORY_BUDGET // size)
    assert sum(files.memory_reads) <= MEMORY_BUDGET


def test_select_reads_only_the_bytes_of_the_watched_fds(tmp_path: Path) -> None:
    bitmap = bytearray(128)  # nfds 1024
    bitmap[3 // 8] |= 1 << 3
    fake = FakeProc(tmp_path)
    fake.add(
        10,
        1,
        fds={3: f"socket:[{SOCKET}]"},
        threads={10: blocked(WaitKind.SELECT, 1024, 0x200)},
        memory={0x200: bytes(bitmap)},
    )
    files = DenyingFiles(str(tmp_path))

    found = scan_tree(Pid(10), {SOCKET}, files)

    assert (found.accepting, found.kinds) == (1, frozenset({WaitKind.SELECT}))
    assert files.memory_reads == [1]


class HidingFiles(DenyingFiles):
    """Process 10 turns non-dumpable mid-scan: its fd was read, then everything is refused."""

    def read_text(self, pid: int, *parts: str) -> str:
        if pid == 10 and parts[-1] == "syscall":
            self.denied = ("/10/",)
        return super().read_text(pid, *parts)


def test_a_process_hidden_mid_scan_is_unreadable_not_blind(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    fake.add(10, 1, fds={3: f"socket:[{SOCKET}]"}, threads={10: blocked(WaitKind.ACCEPT, 3)})
    epoll_process(fake, 11, 10)

    found = scan_tree(Pid(10), {SOCKET}, HidingFiles(str(tmp_path)))

    assert (found.unreadable, found.blind, found.accepting) == ((10,), (), 1)
