"""The /proc parsers behind --ready auto and the stop-accepting step."""

from __future__ import annotations

import os
import struct

import pytest

from handoff.formats.procfs import (
    MAX_POLL_ENTRIES,
    BlockedCall,
    EpollTarget,
    FdSetWindow,
    ProcStat,
    WaitKind,
    blocked_call,
    child_pids,
    epoll_targets,
    established_inodes,
    fd_set_members,
    parse_stat,
    placement_rounds,
    poll_array,
    pollfds,
    select_reads,
    select_window,
    socket_inode,
)

# Read off a uvicorn worker under handoff (fd 7 is its dup of the handed socket).
FDINFO = """pos:\t0
flags:\t02000002
mnt_id:\t17
ino:\t1039
tfd:        7 events:       19 data:     7f4500000007  pos:0 ino:bb07ba sdev:9
tfd:        5 events:       19 data:                5  pos:0 ino:bb07bd sdev:9
"""


def test_epoll_targets_are_the_registered_fds_with_their_inodes() -> None:
    assert epoll_targets(FDINFO) == [EpollTarget(7, 0xBB07BA), EpollTarget(5, 0xBB07BD)]


def test_epoll_targets_keep_the_mask_and_data_they_were_registered_with() -> None:
    first, second = epoll_targets(FDINFO)
    assert (first.events, first.data) == (0x19, 0x7F4500000007)  # libuv-style tagged data
    assert (second.events, second.data) == (0x19, 5)
    edge = "tfd:        3 events: 80000019 data:          c000104008  pos:0 ino:3233a7 sdev:9\n"
    (go,) = epoll_targets(edge)  # Go's netpoll: edge-triggered, a pointer as data
    assert (go.fd, go.inode, go.events, go.data) == (3, 0x3233A7, 0x80000019, 0xC000104008)


def test_an_fdinfo_line_without_events_still_names_the_registration() -> None:
    (target,) = epoll_targets("tfd:        9 pos:0 ino:1f sdev:9\n")
    assert (target.fd, target.inode, target.events, target.data) == (9, 0x1F, 0, 0)


def test_an_epoll_set_with_nothing_registered_has_no_targets() -> None:
    assert epoll_targets("pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t1057\n") == []


@pytest.mark.parametrize(
    ("link", "inode"),
    [("socket:[12257210]", 12257210), ("pipe:[5]", None), ("/dev/null", None), ("socket:[]", None)],
)
def test_socket_inode(link: str, inode: int | None) -> None:
    assert socket_inode(link) == inode


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "43 0x3 0x0 0x0 0x0 0x0 0x0 0x7ffd 0x7f12",
            BlockedCall(WaitKind.ACCEPT, (3, 0, 0, 0, 0, 0)),
        ),
        (
            "288 0x7 0x0 0x0 0x80800 0x0 0x0 0x7ffd 0x7f",
            BlockedCall(WaitKind.ACCEPT, (7, 0, 0, 0x80800, 0, 0)),
        ),
        (
            "23 0x8 0x7ffc10 0x0 0x0 0x0 0x0 0x7ffd 0x7f",
            BlockedCall(WaitKind.SELECT, (8, 0x7FFC10, 0, 0, 0, 0)),
        ),
        (
            "7 0x55aa 0x2 0xffffffff 0x0 0x0 0x0 0x7ffd 0x7f",
            BlockedCall(WaitKind.POLL, (0x55AA, 2, 0xFFFFFFFF, 0, 0, 0)),
        ),
        ("232 0x4 0x7f45 0x2 0x64 0x0 0x0 0x7ffc 0x7f45", None),  # epoll_wait: seen via fdinfo
        ("running", None),
        ("-1 0x7ffd 0x7f12", None),
        ("", None),
    ],
)
def test_blocked_call_on_x86_64(line: str, expected: BlockedCall | None) -> None:
    assert blocked_call(line, "x86_64") == expected


def test_blocked_call_knows_aarch64_numbers_and_no_others() -> None:
    assert blocked_call("242 0x3 0 0 0 0 0 0 0", "aarch64") == BlockedCall(
        WaitKind.ACCEPT, (3, 0, 0, 0, 0, 0)
    )
    assert blocked_call("43 0x3 0 0 0 0 0 0 0", "riscv64") is None


def test_pollfds_lists_the_fds_polled_for_input() -> None:
    memory = b"".join(
        [
            struct.pack("=ihh", 3, 0x001, 0),  # POLLIN
            struct.pack("=ihh", 4, 0x004, 0),  # POLLOUT only
            struct.pack("=ihh", -1, 0x001, 0),  # ignored entry
            struct.pack("=ihh", 9, 0x001 | 0x002, 0),
        ]
    )
    assert pollfds(memory) == [3, 9]


def test_fd_set_members_reads_the_bitmap_below_nfds() -> None:
    bitmap = bytearray(128)
    for fd in (3, 9, 70):
        bitmap[fd // 8] |= 1 << (fd % 8)
    assert fd_set_members(bytes(bitmap), 71) == [3, 9, 70]
    assert fd_set_members(bytes(bitmap), 10) == [3, 9]


def test_where_to_read_the_fd_arrays() -> None:
    select_call = BlockedCall(WaitKind.SELECT, (10, 0x1000, 0, 0, 0, 0))
    poll_call = BlockedCall(WaitKind.POLL, (0x2000, 3, 0, 0, 0, 0))
    assert select_reads(select_call) == (0x1000, 2)
    assert poll_array(poll_call) == (0x2000, 24)
    assert select_reads(poll_call) is None
    assert poll_array(select_call) is None
    assert select_reads(BlockedCall(WaitKind.SELECT, (10, 0, 0, 0, 0, 0))) is None  # no readfds


def test_a_poll_array_over_the_cap_is_skipped_not_read() -> None:
    at_cap = BlockedCall(WaitKind.POLL, (0x2000, MAX_POLL_ENTRIES, 0, 0, 0, 0))
    over = BlockedCall(WaitKind.POLL, (0x2000, MAX_POLL_ENTRIES + 1, 0, 0, 0, 0))
    assert poll_array(at_cap) == (0x2000, MAX_POLL_ENTRIES * 8)
    assert poll_array(over) is None


def test_a_select_window_covers_only_the_watched_fds_bytes() -> None:
    call = BlockedCall(WaitKind.SELECT, (1024, 0x1000, 0, 0, 0, 0))
    window = select_window(call, {17, 9})
    assert window == FdSetWindow(address=0x1001, size=2, first_fd=8)
    bitmap = bytearray(128)
    for fd in (9, 40):
        bitmap[fd // 8] |= 1 << (fd % 8)
    memory = bytes(bitmap[window.address - 0x1000 :][: window.size])
    assert window.members(memory, {9, 17}) == {9}
    assert window.members(b"", {9}) == set()  # unreadable memory: nothing set


def test_no_select_window_for_fds_at_or_above_nfds() -> None:
    call = BlockedCall(WaitKind.SELECT, (5, 0x1000, 0, 0, 0, 0))
    assert select_window(call, {5, 7}) is None
    assert select_window(BlockedCall(WaitKind.POLL, (0x1, 1, 0, 0, 0, 0)), {3}) is None


def test_parse_stat_counts_fields_from_the_last_parenthesis() -> None:
    fields = " ".join(["S", "41", "40", "40"] + ["0"] * 15 + ["987654", "0", "0"])
    assert parse_stat(f"42 (a) b) (c) {fields}\n") == ProcStat(
        pid=42, state="S", ppid=41, pgrp=40, started=987654
    )
    assert parse_stat("42 (short) S 1 2") is None
    assert parse_stat("") is None


def test_parse_stat_reads_this_process() -> None:
    with open("/proc/self/stat") as f:
        stat = parse_stat(f.read())
    assert stat is not None
    assert (stat.pid, stat.ppid) == (os.getpid(), os.getppid())
    assert stat.started > 0


def test_child_pids() -> None:
    assert child_pids("12 345 6789 ") == [12, 345, 6789]
    assert child_pids("") == []


def test_placement_rounds_keep_one_registration_per_fd_number_per_round() -> None:
    a, b, c = EpollTarget(7, 0xA), EpollTarget(7, 0xB), EpollTarget(8, 0xA)
    assert placement_rounds([a, b, c, a]) == [[a, c], [b]]
    assert placement_rounds([]) == []


TCP = """  sl  local_address rem_address st tx_queue rx_queue tr tm->when retrnsmt uid timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 100 1
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 101 1
   2: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 102 1
   3: 0100007F:1F91 0100007F:D432 01 00000000:00000000 00:00000000 00000000     0        0 103 1
   4: 0100007F:1F90 0100007F:D433 06 00000000:00000000 00:00000000 00000000     0        0 0 1
"""


def test_established_inodes_are_connections_accepted_on_the_ports() -> None:
    assert established_inodes(TCP, {8080}) == {101}
    assert established_inodes(TCP, {8080, 8081}) == {101, 103}
    assert established_inodes("header only\n", {8080}) == set()
