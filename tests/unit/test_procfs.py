"""The /proc parsers behind --ready auto and the stop-accepting step."""

from __future__ import annotations

import struct

import pytest

from handoff.formats.procfs import (
    BlockedCall,
    EpollTarget,
    WaitKind,
    blocked_call,
    epoll_targets,
    fd_set_members,
    poll_array,
    pollfds,
    select_reads,
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
