"""`--bind unix:PATH` with systemd's fd store: after `systemctl restart` the path exists
and is served (review finding #5), under a real systemd (conftest.py boots it).

With `RuntimeDirectoryPreserve=restart` the socket file survives the restart and the new
master serves the very socket systemd kept (same file, connections queue through it).
Without it systemd removes the directory, file included: the new master then binds
the path anew instead of serving a socket no one can reach.
"""

from __future__ import annotations

import json
import os
import socket

import pytest

from tests.systemd.conftest import Units
from tests.systemd.sandbox import Sandbox
from tests.systemd.test_systemd import explain, start

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(150)]


def served_through(path: str) -> dict[str, object]:
    """GET / over the unix socket at path (a path of the host); bounded."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(path)
        sock.sendall(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0], data
    return json.loads(body)  # type: ignore[no-any-return]


@pytest.mark.parametrize("preserve", [True, False], ids=["preserved", "removed by systemd"])
def test_restart_keeps_a_unix_socket_reachable(
    sandbox: Sandbox, units: Units, preserve: bool
) -> None:
    directory = f"hx-unix-fd-store-{'kept' if preserve else 'gone'}"
    inside = f"/run/{directory}/app.sock"
    extra = [f"RuntimeDirectory={directory}"]  # a second one, next to the control socket's
    if preserve:
        extra.append("RuntimeDirectoryPreserve=restart")
    unit = units.service(handoff_options={"--bind": f"unix:{inside}"}, extra=extra)
    start(sandbox, unit)
    host = str(sandbox.host_path(inside))
    assert served_through(host)["generation"] == 1, explain(sandbox, unit)
    assert int(sandbox.show(unit.name, "NFileDescriptorStore")) == 1, explain(sandbox, unit)
    before = os.lstat(host)
    main_pid = sandbox.main_pid(unit.name)

    result = sandbox.ctl("restart", unit.name, check=False, timeout=90)
    assert result.returncode == 0, result.stderr + explain(sandbox, unit)
    assert sandbox.main_pid(unit.name) != main_pid
    assert os.path.exists(host), f"{inside} is gone after the restart" + explain(sandbox, unit)
    assert served_through(host)["generation"] == 1, explain(sandbox, unit)
    assert int(sandbox.show(unit.name, "NFileDescriptorStore")) == 1, (
        "the fd store should hold exactly the socket served" + explain(sandbox, unit)
    )
    if preserve:
        after = os.lstat(host)
        assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino), (
            "the socket file was made anew, not kept" + explain(sandbox, unit)
        )
