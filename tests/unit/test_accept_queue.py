"""What master.exited counts as dropped: the accept queues (TCP_INFO) of the listeners
that close for good, on real loopback sockets."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from handoff.formats.options import BindKind, BindSpec
from handoff.master.serve import abandoned_connections as abandoned
from handoff.system.sockets import Listener


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock


def connect(sock: socket.socket, count: int) -> list[socket.socket]:
    return [socket.create_connection(sock.getsockname(), timeout=5) for _ in range(count)]


def test_abandoned_counts_the_connections_not_yet_accepted(listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    spec = BindSpec(kind=BindKind.TCP, text=f"127.0.0.1:{port}", host="127.0.0.1", port=port)
    ours = Listener(spec=spec, sock=listening, address="a", name="a")
    assert abandoned([ours]) == 0
    clients = connect(listening, 3)
    assert abandoned([ours]) == 3
    accepted, _ = listening.accept()
    assert abandoned([ours]) == 2
    with socket.socket(socket.AF_UNIX) as unix:
        unbound = Listener(spec=spec, sock=unix, address="u", name="u")
        assert abandoned([unbound]) == 0
    for sock in [*clients, accepted]:
        sock.close()


def test_abandoned_skips_sockets_systemd_holds_too(listening: socket.socket) -> None:
    clients = connect(listening, 2)
    port = listening.getsockname()[1]
    bound = BindSpec(kind=BindKind.TCP, text=f"127.0.0.1:{port}", host="127.0.0.1", port=port)
    passed = BindSpec(kind=BindKind.FD, text="fd:3", fd=3)
    ours = Listener(spec=bound, sock=listening, address="a", name="a")
    stored = Listener(spec=bound, sock=listening, address="a", name="a", stored=True)
    adopted = Listener(spec=passed, sock=listening, address="a", name="a")
    assert abandoned([ours]) == 2
    assert abandoned([stored, adopted]) == 0
    for sock in clients:
        sock.close()
