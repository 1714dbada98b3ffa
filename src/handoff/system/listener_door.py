"""Shutting a TCP listener's door: no new connection, while what is queued is still served.

When handoff stops, the listening socket must stop taking connections before the last
worker stops accepting, or what arrives meanwhile waits in the accept queue for nobody and
is reset when the socket closes. Closing the master's copy does not unhash the socket:
the workers hold it too, until they have drained. A classic BPF socket filter does what is
needed: it drops every packet with SYN set and ACK clear, so no new handshake starts,
while the packets of connections already in the queue go to their own (child) sockets and
never meet the filter. The workers, still on the socket for the settle, accept the queue;
a client whose SYN was dropped sends it again (after 1 s), and by then the socket is
closed and it is refused: a balancer retries elsewhere.

A socket filter is unprivileged and belongs to the socket itself, shared by every process
that holds it: never put one on a socket that outlives this master (systemd's own copy).
"""

from __future__ import annotations

import ctypes
import socket
import struct
from typing import Final

SO_ATTACH_FILTER: Final = 26  # asm-generic/socket.h; not in Python's socket module
# Instruction classes and modes (linux/bpf_common.h).
_LD_B_ABS: Final = 0x00 | 0x10 | 0x20
_ALU_AND_K: Final = 0x04 | 0x50 | 0x00
_JMP_JEQ_K: Final = 0x05 | 0x10 | 0x00
_RET_K: Final = 0x06
_SYN, _ACK = 0x02, 0x10
# The filter runs on the TCP header (tcp_filter()): byte 13 holds the flags.
_PROGRAM: Final = (
    (_LD_B_ABS, 0, 0, 13),  # A = flags
    (_ALU_AND_K, 0, 0, _SYN | _ACK),  # A &= SYN|ACK
    (_JMP_JEQ_K, 0, 1, _SYN),  # a bare SYN: drop it, else keep the packet
    (_RET_K, 0, 0, 0),
    (_RET_K, 0, 0, 0xFFFFFFFF),
)
_CODE: Final = b"".join(struct.pack("=HBBI", *insn) for insn in _PROGRAM)


def refuse_new_connections(sock: socket.socket) -> bool:
    """Drop new handshakes on a listening TCP socket; False if it is not one or it failed."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.fileno() < 0:
        return False
    code = ctypes.create_string_buffer(_CODE, len(_CODE))
    # struct sock_fprog: the length, then (natively aligned) a pointer to the code.
    program = struct.pack("@HP", len(_PROGRAM), ctypes.addressof(code))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, program)
    except OSError:
        return False
    return True
