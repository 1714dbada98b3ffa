"""The messages of the kernel's socket diagnostics (NETLINK_SOCK_DIAG), built and read.

Pure: bytes in, records out; ``system/socket_diag.py`` does the netlink I/O. What the
master asks (see ``system/accepting_scan.py`` and ``system/http_probe.py``):

- a dump of the TCP sockets whose local port is a listener's, in the states a socket has
  after accept(): the kernel filters by state and runs a port comparison on each socket
  (the bytecode below), so the answer holds the listener's connections only, however
  many other sockets (thousands of TIME_WAIT under load) the network namespace has;
- one TCP socket by its exact 4-tuple (the server side of a probe's connection);
- one unix socket by its inode, with its name (an accepted socket carries its
  listener's path) and its peer's inode.

Layouts from linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h, linux/unix_diag.h.
Numbers are the host's (netlink is host-endian), ports and IPv4/IPv6 addresses of the
socket id are network order.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from handoff.formats.procfs import TCP_AFTER_ACCEPT, TcpEndpoint, TcpSocket

AF_UNIX: Final = 1
AF_INET: Final = 2
AF_INET6: Final = 10
IPPROTO_TCP: Final = 6
NETLINK_SOCK_DIAG: Final = 4
SOCK_DIAG_BY_FAMILY: Final = 20
NLM_F_REQUEST: Final = 0x1
NLM_F_DUMP: Final = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
INET_DIAG_REQ_BYTECODE: Final = 1
INET_DIAG_BC_S_GE: Final = 2
INET_DIAG_BC_S_LE: Final = 3
INET_DIAG_NOCOOKIE: Final = 0xFFFFFFFF
UDIAG_SHOW_NAME: Final = 0x1
UDIAG_SHOW_PEER: Final = 0x4
UNIX_DIAG_NAME: Final = 0
UNIX_DIAG_PEER: Final = 2
SOCK_STREAM: Final = 1
TCP_ESTABLISHED_STATE: Final = 1  # unix sockets report a connected state as this too
# The states of TCP_AFTER_ACCEPT as the request's bit mask.
AFTER_ACCEPT_MASK: Final = sum(1 << state for state in TCP_AFTER_ACCEPT)
ALL_STATES: Final = 0xFFFFFFFF

NLMSGHDR: Final = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
NLATTR: Final = struct.Struct("=HH")  # length, type
BC_OP: Final = struct.Struct("=BBH")  # code, yes (jump if true), no (jump if false)
_INET_REQ_HEAD: Final = struct.Struct("=BBBBI")  # family, protocol, ext, pad, states
_SOCKID_PORTS: Final = struct.Struct("!HH")  # sport, dport: network order
_SOCKID_TAIL: Final = struct.Struct("=III")  # interface, cookie[2]
_INET_MSG_HEAD: Final = struct.Struct("=BBBB")  # family, state, timer, retrans
_INET_MSG_TAIL: Final = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
INET_MSG_SIZE: Final = _INET_MSG_HEAD.size + 48 + _INET_MSG_TAIL.size
_UNIX_REQ: Final = struct.Struct("=BBHIIIII")  # family, protocol, pad, states, ino, show, cookie
_UNIX_MSG: Final = struct.Struct("=BBBBIII")  # family, type, state, pad, ino, cookie[2]


@dataclass(frozen=True, slots=True)
class UnixSocket:
    inode: int
    stream: bool
    connected: bool
    name: str  # '' when unbound; '@name' for an abstract name, as /proc/net/unix shows it
    peer: int  # the inode of the socket at the other end, 0 if none


def _message(payload: bytes, *, flags: int, sequence: int) -> bytes:
    header = NLMSGHDR.pack(NLMSGHDR.size + len(payload), SOCK_DIAG_BY_FAMILY, flags, sequence, 0)
    return header + payload


def _address(host: str) -> tuple[int, bytes]:
    """(family, the 16 bytes of the socket id) of an IP address."""
    ip = ipaddress.ip_address(host)
    raw = ip.packed
    return (AF_INET if ip.version == 4 else AF_INET6), raw + bytes(16 - len(raw))


def _sockid(local: TcpEndpoint | None, remote: TcpEndpoint | None) -> bytes:
    local_raw = _address(local.host)[1] if local else bytes(16)
    remote_raw = _address(remote.host)[1] if remote else bytes(16)
    ports = _SOCKID_PORTS.pack(local.port if local else 0, remote.port if remote else 0)
    cookie = _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    return ports + local_raw + remote_raw + cookie


def port_filter(port: int) -> bytes:
    """Bytecode that keeps the sockets whose local port is port: ``sport >= port`` then
    ``sport <= port``. (The S_EQ comparison is newer, Linux 4.17; these two are in every
    kernel with pidfds.) A comparison is an op and a second op holding the port; a jump
    past the end by 4 rejects, running exactly off the end accepts."""
    ge = BC_OP.pack(INET_DIAG_BC_S_GE, 8, 20) + BC_OP.pack(0, 0, port)
    le = BC_OP.pack(INET_DIAG_BC_S_LE, 8, 12) + BC_OP.pack(0, 0, port)
    code = ge + le
    return NLATTR.pack(NLATTR.size + len(code), INET_DIAG_REQ_BYTECODE) + code


def tcp_dump_request(family: int, port: int, sequence: int) -> bytes:
    """Every TCP socket of the family with this local port, in a post-accept state."""
    head = _INET_REQ_HEAD.pack(family, IPPROTO_TCP, 0, 0, AFTER_ACCEPT_MASK)
    payload = head + _sockid(None, None) + port_filter(port)
    return _message(payload, flags=NLM_F_REQUEST | NLM_F_DUMP, sequence=sequence)


def tcp_exact_request(local: TcpEndpoint, remote: TcpEndpoint, sequence: int) -> bytes:
    """The one TCP socket with this local and remote end (any state)."""
    family = _address(local.host)[0]
    head = _INET_REQ_HEAD.pack(family, IPPROTO_TCP, 0, 0, ALL_STATES)
    return _message(head + _sockid(local, remote), flags=NLM_F_REQUEST, sequence=sequence)


def unix_exact_request(inode: int, sequence: int) -> bytes:
    """The unix socket with this inode, with its name and its peer's inode."""
    payload = _UNIX_REQ.pack(
        AF_UNIX,
        0,
        0,
        ALL_STATES,
        inode,
        UDIAG_SHOW_NAME | UDIAG_SHOW_PEER,
        INET_DIAG_NOCOOKIE,
        INET_DIAG_NOCOOKIE,
    )
    return _message(payload, flags=NLM_F_REQUEST, sequence=sequence)


class DiagError(Exception):
    """The kernel answered a request with an error (errno in ``code``)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"sock_diag error {code}")
        self.code = code


def messages(data: bytes, sequence: int) -> Iterator[bytes | None]:
    """The payloads of the netlink messages in one read: None for NLMSG_DONE.

    Raises DiagError for an NLMSG_ERROR with an error; messages of another sequence are
    skipped, a truncated one ends the read.
    """
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, _, seq, _ = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            return
        payload = data[offset + NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3
        if seq != sequence:
            continue
        if kind == NLMSG_DONE:
            yield None
            return
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", payload) if len(payload) >= 4 else (0,)
            if code:
                raise DiagError(-code)
            continue
        yield payload


def _endpoint(family: int, raw: bytes, port: int) -> TcpEndpoint:
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    if family == AF_INET:
        ip = ipaddress.IPv4Address(raw[:4])
    else:
        ip = ipaddress.IPv6Address(raw[:16])
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
    return TcpEndpoint(str(ip), port)


def tcp_socket(payload: bytes) -> TcpSocket | None:
    """An inet_diag_msg: the socket's inode, state and ends (None if too short)."""
    if len(payload) < INET_MSG_SIZE:
        return None
    family, state, _, _ = _INET_MSG_HEAD.unpack_from(payload, 0)
    sport, dport = _SOCKID_PORTS.unpack_from(payload, 4)
    src, dst = payload[8:24], payload[24:40]
    *_, inode = _INET_MSG_TAIL.unpack_from(payload, 4 + 48)
    return TcpSocket(inode, state, _endpoint(family, src, sport), _endpoint(family, dst, dport))


def _attributes(payload: bytes, offset: int) -> Iterator[tuple[int, bytes]]:
    while offset + NLATTR.size <= len(payload):
        length, kind = NLATTR.unpack_from(payload, offset)
        if length < NLATTR.size or offset + length > len(payload):
            return
        yield kind, payload[offset + NLATTR.size : offset + length]
        offset += (length + 3) & ~3


def unix_socket(payload: bytes) -> UnixSocket | None:
    """A unix_diag_msg with its name and peer attributes (None if too short)."""
    if len(payload) < _UNIX_MSG.size:
        return None
    _, kind, state, _, inode, _, _ = _UNIX_MSG.unpack_from(payload, 0)
    name, peer = "", 0
    for attribute, value in _attributes(payload, _UNIX_MSG.size):
        if attribute == UNIX_DIAG_NAME and value:
            # A path may come with its terminating NUL; an abstract name starts with a
            # NUL, and /proc/net/unix shows its NULs as '@'.
            raw = value if value[:1] == b"\0" else value.rstrip(b"\0")
            name = raw.replace(b"\0", b"@").decode("utf-8", "surrogateescape")
        elif attribute == UNIX_DIAG_PEER and len(value) >= 4:
            (peer,) = struct.unpack_from("=I", value)
    return UnixSocket(inode, kind == SOCK_STREAM, state == TCP_ESTABLISHED_STATE, name, peer)
