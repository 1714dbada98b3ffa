"""--ready auto's second proof: a tree holding a connection it accepted on a listener.

The matching rules are pure (formats/procfs.py); the lookups are run for real on this
test process's own sockets (no other process is started): a socket it accepted is found
through pidfd_getfd, in the kernel's socket diagnostics and in /proc/net/unix, and a
scan of this process sees it serving.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Collection, Iterator
from pathlib import Path

import pytest

from handoff.core.model import Pid
from handoff.formats.procfs import (
    TcpEndpoint,
    TcpSocket,
    accepted_on,
    listener_of,
    unix_accepted,
)
from handoff.system import socket_diag
from handoff.system.accepting_scan import ProcFiles, scan_tree
from handoff.system.process_tree import Member, tree
from handoff.system.serving_scan import (
    MAX_HELD_SOCKETS,
    Held,
    ListenAddresses,
    accepted_through_fds,
    listen_addresses,
    serving,
    unix_name,
)

LOCAL = TcpEndpoint("127.0.0.1", 8000)
ANY = TcpEndpoint("0.0.0.0", 8000)


# -- the rules (pure) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "listeners", "found"),
    [
        (LOCAL, [LOCAL], LOCAL),
        (LOCAL, [TcpEndpoint("0.0.0.0", 8000)], TcpEndpoint("0.0.0.0", 8000)),
        (TcpEndpoint("10.1.2.3", 8000), [ANY], ANY),
        (TcpEndpoint("::ffff:127.0.0.1", 8000), [TcpEndpoint("::", 8000)], TcpEndpoint("::", 8000)),
        (TcpEndpoint("::ffff:127.0.0.1", 8000), [LOCAL], LOCAL),
        (TcpEndpoint("::1", 8000), [TcpEndpoint("::1", 8000)], TcpEndpoint("::1", 8000)),
        (LOCAL, [TcpEndpoint("127.0.0.1", 8001)], None),
        (TcpEndpoint("127.0.0.2", 8000), [LOCAL], None),
        (TcpEndpoint("127.0.0.1", 41000), [LOCAL], None),  # a client's end
    ],
)  # fmt: skip
def test_listener_of(local: TcpEndpoint, listeners: list[TcpEndpoint], found: object) -> None:
    assert listener_of(local, listeners) == found


@pytest.mark.parametrize(
    ("state", "counts"),
    [
        *[(state, True) for state in (1, 4, 5, 8, 9, 11)],
        *[(state, False) for state in (2, 3, 6, 7, 10, 12)],
    ],
)
def test_only_post_accept_states_count(state: int, counts: bool) -> None:
    sock = TcpSocket(9, state, LOCAL, TcpEndpoint("127.0.0.1", 41000))
    assert (accepted_on(sock, [LOCAL]) is not None) is counts


UNIX = """Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 1000 /run/app dir/app.sock
0000000000000000: 00000003 00000000 00000000 0001 03 1001 /run/app dir/app.sock
0000000000000000: 00000003 00000000 00000000 0001 03 1002
0000000000000000: 00000003 00000000 00000000 0002 03 1003 /run/app dir/app.sock
0000000000000000: 00000003 00000000 00000000 0001 03 1004 /run/other.sock
0000000000000000: 00000003 00001004 00000000 0001 03 1005 @abstract
0000000000000000: 00000003 00000000 00000000 0001 01 1006 /run/app dir/app.sock
"""


def test_unix_connections_accepted_on_a_listener_path() -> None:
    paths = {"/run/app dir/app.sock", "@abstract"}
    everything = range(1000, 1010)
    # 1000 listens, 1002 is a client (no path), 1003 is a datagram socket, 1004 is
    # another listener's, 1006 is not connected; 1005's refcount field holds "1004".
    assert unix_accepted(UNIX, paths, everything) == {
        1001: "/run/app dir/app.sock",
        1005: "@abstract",
    }
    assert unix_accepted(UNIX, paths, [1001]) == {1001: "/run/app dir/app.sock"}
    assert unix_accepted(UNIX, paths, [100, 0, -1]) == {}
    assert unix_accepted("", paths, everything) == {}


# -- with fake views ------------------------------------------------------------------------


class Views:
    """SocketViews with scripted answers; records what was asked."""

    def __init__(self, through_fds: dict[int, tuple[str | None, bool]]) -> None:
        self.through_fds = through_fds
        self.asked: list[str] = []
        self.connections: list[TcpSocket] = []
        self.unix = ""

    def accepted_through_fds(
        self, held: Held, addresses: ListenAddresses
    ) -> tuple[str | None, bool]:
        self.asked.append(f"fds {held.member.pid} {len(held.sockets)}")
        return self.through_fds[held.member.pid]

    def tcp_connections(self, listening: Collection[TcpEndpoint], family: int) -> list[TcpSocket]:
        self.asked.append(f"tcp {family}")
        return self.connections

    def read_net(self, table: str, limit: int) -> tuple[str, bool]:
        self.asked.append(f"net {table}")
        return self.unix, False


def held(pid: int, *inodes: int) -> Held:
    return Held(Member(Pid(pid), Pid(1), 0), {3 + i: inode for i, inode in enumerate(inodes)})


ADDRESSES = ListenAddresses(tcp4=(LOCAL,), unix=("/run/app.sock",))


def test_serving_through_the_sockets_themselves_needs_no_table() -> None:
    views = Views({10: (None, True), 11: ("127.0.0.1:8000", True)})
    found = serving([held(10, 500), held(11, 501)], ADDRESSES, views, [])
    assert found == {Pid(11): "127.0.0.1:8000"}
    assert views.asked == ["fds 10 1", "fds 11 1"]


def test_the_tables_are_searched_only_for_what_could_not_be_looked_at() -> None:
    views = Views({10: (None, True), 11: (None, False)})
    views.connections = [
        TcpSocket(501, 1, LOCAL, TcpEndpoint("127.0.0.1", 41000)),
        TcpSocket(500, 1, LOCAL, TcpEndpoint("127.0.0.1", 41001)),  # 10's, but seen: not asked
    ]
    assert serving([held(10, 600), held(11, 501)], ADDRESSES, views, []) == {
        Pid(11): "127.0.0.1:8000"
    }
    assert "tcp 2" in views.asked
    assert "net unix" in views.asked
    views.asked.clear()
    assert serving([held(11, 501)], ADDRESSES, views, [], tables=False) == {}
    assert views.asked == ["fds 11 1"]


def test_unix_through_the_table() -> None:
    views = Views({10: (None, False)})
    views.unix = UNIX.replace("/run/app dir/app.sock", "/run/app.sock")
    assert serving([held(10, 1001)], ADDRESSES, views, []) == {Pid(10): "unix:/run/app.sock"}


def test_a_tree_with_many_sockets_is_looked_at_up_to_a_bound() -> None:
    views = Views(dict.fromkeys(range(10, 20), (None, True)))
    trees = [held(pid, *range(pid * 100, pid * 100 + 30)) for pid in range(10, 20)]
    serving(trees, ADDRESSES, views, [])
    counts = [int(line.split()[2]) for line in views.asked]
    assert sum(counts) == MAX_HELD_SOCKETS
    assert counts == [30, 30, 4]


# -- for real, on this process's own sockets --------------------------------------------


@pytest.fixture
def me() -> Member:
    return tree(Pid(os.getpid()))[0]


@contextlib.contextmanager
def connection(family: int, address: object) -> Iterator[tuple[socket.socket, ...]]:
    """A listener on address, a client connected to it, and the accepted socket."""
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind(address)
        listener.listen()
        client = socket.socket(family, socket.SOCK_STREAM)
        client.connect(listener.getsockname())
        accepted, _ = listener.accept()
        with client, accepted:
            yield listener, client, accepted


def inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def own(me: Member, *socks: socket.socket) -> Held:
    return Held(me, {sock.fileno(): inode(sock) for sock in socks})


@pytest.mark.parametrize(
    ("family", "bind"),
    [
        (socket.AF_INET, ("127.0.0.1", 0)),
        (socket.AF_INET, ("0.0.0.0", 0)),
        (socket.AF_INET6, ("::", 0)),
    ],
)
def test_an_accepted_tcp_socket_is_seen_through_its_fd(
    me: Member, family: int, bind: tuple[str, int]
) -> None:
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6")
    target = ("127.0.0.1", 0) if family == socket.AF_INET6 else bind
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind(bind)
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection((target[0], port)) as client:
            accepted, _ = listener.accept()
            with accepted:
                addresses = listen_addresses([listener])
                on = str(
                    listener_of(TcpEndpoint(bind[0], port), [*addresses.tcp4, *addresses.tcp6])
                )
                assert accepted_through_fds(own(me, accepted), addresses) == (on, True)
                assert accepted_through_fds(own(me, client), addresses) == (None, True)
                assert accepted_through_fds(own(me, listener), addresses) == (None, True)
                # ... and in the kernel's socket diagnostics, by inode
                kernel = socket_diag.tcp_connections(addresses.tcp4 or addresses.tcp6, family)
                assert inode(accepted) in {s.inode for s in kernel}
                assert inode(client) not in {s.inode for s in kernel}


def test_an_accepted_unix_socket_carries_its_listeners_path(me: Member, tmp_path: Path) -> None:
    path = str(tmp_path / "app.sock")
    with connection(socket.AF_UNIX, path) as (listener, client, accepted):
        addresses = listen_addresses([listener])
        assert addresses.unix == (path,)
        assert accepted_through_fds(own(me, accepted), addresses) == (f"unix:{path}", True)
        assert accepted_through_fds(own(me, client, listener), addresses) == (None, True)
        text, cut = ProcFiles().read_net("unix", 1 << 22)
        assert not cut
        assert unix_accepted(text, addresses.unix, [inode(accepted), inode(client)]) == {
            inode(accepted): path
        }
        mine = socket_diag.unix_socket(inode(client))
        assert mine is not None
        assert mine.peer == inode(accepted)


def test_an_abstract_unix_name() -> None:
    name = f"\0handoff-test-{os.getpid()}"
    with connection(socket.AF_UNIX, name.encode()) as (listener, _, accepted):
        assert unix_name(listener.getsockname()) == "@" + name[1:]
        found = socket_diag.unix_socket(inode(accepted))
        assert found is not None
        assert found.name == "@" + name[1:]


def test_the_exact_lookup_finds_the_server_side_of_a_connection() -> None:
    with connection(socket.AF_INET, ("127.0.0.1", 0)) as (listener, client, accepted):
        server = TcpEndpoint(*listener.getsockname())
        here = TcpEndpoint(*client.getsockname())
        found = socket_diag.tcp_socket(server, here)
        assert found is not None
        assert found.inode == inode(accepted)
        # no such connection: the kernel would answer with the listener; we say None
        assert socket_diag.tcp_socket(server, TcpEndpoint("127.0.0.1", 1)) is None
        with socket.create_connection(listener.getsockname()) as waiting:  # not accepted
            found = socket_diag.tcp_socket(server, TcpEndpoint(*waiting.getsockname()))
            assert found is not None
            assert found.inode == 0


def test_a_scan_of_this_process_sees_it_serving(me: Member) -> None:
    with connection(socket.AF_INET, ("127.0.0.1", 0)) as (listener, _, _):
        addresses = listen_addresses([listener])
        found = scan_tree(me.pid, {inode(listener)}, addresses=addresses)
        if found.accepting:
            pytest.skip("this test process waits on a listener itself")
        port = listener.getsockname()[1]
        assert found.serving >= 1
        assert found.ready
        assert found.describe().startswith(f"serving a connection accepted on 127.0.0.1:{port} in ")
        # without the addresses, nothing proves it
        assert not scan_tree(me.pid, {inode(listener)}).ready
