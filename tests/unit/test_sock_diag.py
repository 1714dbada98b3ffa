"""The socket diagnostics messages, built and read (pure): formats/sock_diag.py."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from handoff.formats import sock_diag as sd
from handoff.formats.procfs import TcpEndpoint, TcpSocket


def run_bytecode(code: bytes, sport: int) -> bool:
    """The kernel's inet_diag_bc_audit and inet_diag_bc_run for port comparisons
    (net/ipv4/inet_diag.c): True if the socket with this local port is kept."""
    # audit
    length, offset = len(code), 0
    while length > 0:
        op, yes, no = sd.BC_OP.unpack_from(code, offset)
        min_len = 4
        assert op in (sd.INET_DIAG_BC_S_GE, sd.INET_DIAG_BC_S_LE)
        min_len += 4  # the port in a follow-on op
        assert length >= min_len
        assert min_len <= no <= length + 4
        assert no % 4 == 0
        assert min_len <= yes <= length + 4
        assert yes % 4 == 0
        offset += yes
        length -= yes
    assert length == 0
    # run
    length, offset = len(code), 0
    while length > 0:
        op, yes, no = sd.BC_OP.unpack_from(code, offset)
        (_, _, port) = sd.BC_OP.unpack_from(code, offset + 4)
        matched = sport >= port if op == sd.INET_DIAG_BC_S_GE else sport <= port
        step = yes if matched else no
        offset += step
        length -= step
    return length == 0


def test_the_port_filter_keeps_exactly_that_port() -> None:
    attribute = sd.port_filter(8000)
    size, kind = sd.NLATTR.unpack_from(attribute)
    assert (size, kind) == (len(attribute), sd.INET_DIAG_REQ_BYTECODE)
    code = attribute[sd.NLATTR.size :]
    assert [port for port in (7999, 8000, 8001, 0, 65535) if run_bytecode(code, port)] == [8000]


def test_a_dump_request() -> None:
    request = sd.tcp_dump_request(sd.AF_INET6, 8000, sequence=7)
    length, kind, flags, sequence, _ = sd.NLMSGHDR.unpack_from(request)
    assert (length, kind, sequence) == (len(request), sd.SOCK_DIAG_BY_FAMILY, 7)
    assert flags == sd.NLM_F_REQUEST | sd.NLM_F_DUMP
    family, protocol, _, _, states = struct.unpack_from("=BBBBI", request, 16)
    assert (family, protocol) == (sd.AF_INET6, sd.IPPROTO_TCP)
    # ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING; not TIME_WAIT,
    # LISTEN, the handshake or CLOSE
    assert [s for s in range(1, 13) if states >> s & 1] == [1, 4, 5, 8, 9, 11]


def test_an_exact_request_names_the_4_tuple_in_network_order() -> None:
    local, remote = TcpEndpoint("127.0.0.1", 8000), TcpEndpoint("127.0.0.2", 40000)
    request = sd.tcp_exact_request(local, remote, sequence=3)
    _, _, flags, _, _ = sd.NLMSGHDR.unpack_from(request)
    assert flags == sd.NLM_F_REQUEST
    sockid = request[16 + 8 :]
    assert struct.unpack_from("!HH", sockid) == (8000, 40000)
    assert sockid[4:8] == bytes([127, 0, 0, 1])
    assert sockid[20:24] == bytes([127, 0, 0, 2])
    assert struct.unpack_from("=II", sockid, 40) == (sd.INET_DIAG_NOCOOKIE,) * 2


def netlink(kind: int, payload: bytes, sequence: int) -> bytes:
    message = sd.NLMSGHDR.pack(sd.NLMSGHDR.size + len(payload), kind, 0, sequence, 0) + payload
    return message + bytes(-len(message) % 4)


def inet_message(family: int, state: int, local: tuple[str, int], remote: tuple[str, int],
                 inode: int) -> bytes:  # fmt: skip
    def raw(host: str) -> bytes:
        packed = ipaddress.ip_address(host).packed
        return packed + bytes(16 - len(packed))

    sockid = struct.pack("!HH", local[1], remote[1]) + raw(local[0]) + raw(remote[0])
    sockid += struct.pack("=III", 0, 1, 2)
    return (
        struct.pack("=BBBB", family, state, 0, 0) + sockid + struct.pack("=5I", 0, 0, 0, 0, inode)
    )


def test_an_answer_is_read_until_done() -> None:
    first = inet_message(sd.AF_INET, 1, ("127.0.0.1", 8000), ("127.0.0.1", 41000), 501)
    second = inet_message(
        sd.AF_INET6, 8, ("::ffff:127.0.0.1", 8000), ("::ffff:10.0.0.9", 41001), 502
    )
    data = (
        netlink(sd.SOCK_DIAG_BY_FAMILY, first, 5)
        + netlink(sd.SOCK_DIAG_BY_FAMILY, b"other", 4)  # another request's: skipped
        + netlink(sd.SOCK_DIAG_BY_FAMILY, second, 5)
        + netlink(sd.NLMSG_DONE, b"\0\0\0\0", 5)
        + netlink(sd.SOCK_DIAG_BY_FAMILY, first, 5)  # after DONE: not read
    )
    payloads = list(sd.messages(data, 5))
    assert payloads[-1] is None
    sockets = [sd.tcp_socket(p) for p in payloads[:-1] if p is not None]
    assert sockets == [
        TcpSocket(501, 1, TcpEndpoint("127.0.0.1", 8000), TcpEndpoint("127.0.0.1", 41000)),
        TcpSocket(502, 8, TcpEndpoint("127.0.0.1", 8000), TcpEndpoint("10.0.0.9", 41001)),
    ]


def test_an_error_answer_raises_and_a_truncated_one_ends() -> None:
    error = netlink(sd.NLMSG_ERROR, struct.pack("=i", -2) + bytes(16), 9)
    with pytest.raises(sd.DiagError) as caught:
        list(sd.messages(error, 9))
    assert caught.value.code == 2
    assert list(sd.messages(netlink(sd.NLMSG_ERROR, struct.pack("=i", 0), 9), 9)) == []
    whole = netlink(sd.SOCK_DIAG_BY_FAMILY, b"x" * 72, 9)
    assert list(sd.messages(whole[:-10], 9)) == []
    assert sd.tcp_socket(b"short") is None


def unix_message(kind: int, state: int, inode: int, attributes: list[tuple[int, bytes]]) -> bytes:
    body = struct.pack("=BBBBIII", sd.AF_UNIX, kind, state, 0, inode, 0, 0)
    for attribute, value in attributes:
        item = sd.NLATTR.pack(sd.NLATTR.size + len(value), attribute) + value
        body += item + bytes(-len(item) % 4)
    return body


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        (b"/run/app.sock\0", "/run/app.sock"),
        (b"/run/app.sock", "/run/app.sock"),
        (b"\0abstract name", "@abstract name"),
        (b"/run/\xffodd", "/run/\udcffodd"),
    ],
)
def test_a_unix_answer(name: bytes, shown: str) -> None:
    payload = unix_message(
        1, 1, 77, [(sd.UNIX_DIAG_NAME, name), (sd.UNIX_DIAG_PEER, struct.pack("=I", 78))]
    )
    assert sd.unix_socket(payload) == sd.UnixSocket(77, True, True, shown, 78)


def test_a_unix_answer_without_name_or_peer() -> None:
    assert sd.unix_socket(unix_message(2, 7, 77, [])) == sd.UnixSocket(77, False, False, "", 0)
    assert sd.unix_socket(b"tiny") is None
    request = sd.unix_exact_request(77, sequence=1)
    assert struct.unpack_from("=BBHIIIII", request, 16) == (
        sd.AF_UNIX, 0, 0, sd.ALL_STATES, 77, sd.UDIAG_SHOW_NAME | sd.UDIAG_SHOW_PEER,
        sd.INET_DIAG_NOCOOKIE, sd.INET_DIAG_NOCOOKIE,
    )  # fmt: skip
