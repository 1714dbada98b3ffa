"""The non-Python servers of the matrix: Node.js, Go and uWSGI under handoff, under load.

Each case runs the server as docs/servers.md tells users to, with keep-alive and
fresh-connection load, and reloads it RELOADS times with a new version on disk; after each
reload the new version must answer. Then: zero refused connections, zero failed
fresh-connection requests, readiness proved (not a delay), the shared backlog untouched,
and the measured numbers go to the matrix (tests/integration/matrix.py).

Keep-alive failures are asserted to be zero for the servers whose drain answers the next
request on an idle connection with `Connection: close` (the recipes in docs/servers.md);
for the servers' plain shutdown they are recorded, not asserted: closing idle keep-alive
connections at shutdown races the clients (docs/protocol.md, "The idle keep-alive race").

Runtimes: node is on the machine; go (Debian's golang-go) and uwsgi (the `test` extra) are
installed by .ci/run. Outside CI a missing runtime skips its cases; in CI it fails them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration import matrix
from tests.integration.harness import APPS, running
from tests.integration.matrix import (
    listener_backlog,
    reload_under_load,
)

READY = ["--ready", "auto"]
DRAIN_TIMEOUT = "30"
SERVERS = APPS / "servers"
UWSGI = Path(sys.executable).with_name("uwsgi")


@dataclass(frozen=True)
class Case:
    key: str  # the test id
    server: str
    variant: str
    runtime: str  # the executable the case needs (looked up in PATH unless absolute)
    command: Callable[[Path], list[str]]  # given the Go binary's directory
    env: dict[str, str] = field(default_factory=dict)
    handoff_args: tuple[str, ...] = ("--workers", "2")
    notes: str = ""
    # The server's own drain closes idle keep-alive connections (the notes say so), so
    # keep-alive failures are recorded, not asserted.
    keepalive_race: bool = False


def _node(*extra: str) -> Callable[[Path], list[str]]:
    return lambda _: ["node", str(SERVERS / "node_server.js"), *extra]


def _go(*extra: str) -> Callable[[Path], list[str]]:
    return lambda bin_dir: [str(bin_dir / "go_server"), *extra]


def _uwsgi(*extra: str) -> list[str]:
    return [
        str(UWSGI),
        "--http-socket",
        "fd://{fd}",
        "--master",
        "--processes",
        "2",
        "--need-app",
        "--chdir",
        str(APPS),
        "--module",
        "versioned_app:wsgi",
        # --http-socket closes the connection after each response but does not say so;
        # saying it keeps HTTP/1.1 clients from reusing a connection that is being closed.
        "--add-header",
        "Connection: close",
        "--worker-reload-mercy",
        "20",
        "--disable-logging",
        *extra,
    ]


CASES = [
    Case(
        "node-graceful",
        "Node.js",
        "http, listen({fd: 3}) from LISTEN_FDS, drain: Connection: close",
        "node",
        _node(),
        env={"DRAIN": "graceful"},
        notes="stops listening with net.Server's close(), answers the next request on each "
        "idle keep-alive connection with Connection: close",
    ),
    Case(
        "node-plain",
        "Node.js",
        "http, --fd {fd}, drain: plain server.close()",
        "node",
        _node("--fd", "{fd}"),
        env={"DRAIN": "plain"},
        notes="server.close() destroys idle keep-alive connections at once (Node >= 19)",
        keepalive_race=True,
    ),
    Case(
        "go-graceful",
        "Go",
        "net/http, FileListener(fd 3) from LISTEN_FDS, drain: Connection: close",
        "go",
        _go(),
        env={"DRAIN": "graceful"},
        notes="closes its listener, answers the next request on each idle keep-alive "
        "connection with Connection: close, then http.Server.Shutdown",
    ),
    Case(
        "go-plain",
        "Go",
        "net/http, -fd {fd}, drain: plain Server.Shutdown",
        "go",
        _go("-fd", "{fd}"),
        env={"DRAIN": "plain"},
        notes="http.Server.Shutdown closes idle keep-alive connections at once",
        keepalive_race=True,
    ),
    Case(
        "uwsgi-hup",
        "uWSGI",
        "--http-socket fd://{fd} --master --processes 2, stop: HUP + --exit-on-reload",
        str(UWSGI),
        lambda _: _uwsgi("--exit-on-reload"),
        handoff_args=("--workers", "1", "--stop-signal", "HUP"),
        notes="2 uWSGI workers; uWSGI's READY=1 comes before its workers accept, auto waits "
        "for them; one request per connection",
    ),
    Case(
        "uwsgi-die-on-term",
        "uWSGI",
        "--http-socket fd://{fd} --master --processes 2, stop: TERM + --die-on-term",
        str(UWSGI),
        lambda _: _uwsgi("--die-on-term"),
        handoff_args=("--workers", "1"),
        notes="2 uWSGI workers; --die-on-term makes TERM a brutal stop (workers get SIGINT "
        "and exit at once): 0 failed here only because handoff's detach and settle let the "
        "sub-millisecond requests finish first; requests longer than --settle are cut",
    ),
]


def _runtime_or_skip(runtime: str) -> None:
    if shutil.which(runtime) is not None:
        return
    message = f"{runtime} is not installed"
    if os.environ.get("CI"):
        pytest.fail(f"{message}: .ci/run must install it")
    pytest.skip(message)


@pytest.fixture(scope="session")
def go_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/integration/apps/servers/go_server.go built once (standard library only)."""
    _runtime_or_skip("go")
    out = tmp_path_factory.mktemp("go")
    env = dict(os.environ)
    # Build caches out of $HOME; no module download: the server imports only the stdlib.
    env.setdefault("GOCACHE", "/tmp/handoff-go-cache")
    env.setdefault("GOPATH", "/tmp/handoff-gopath")
    env["GOFLAGS"] = ""
    env["GOPROXY"] = "off"
    subprocess.run(
        ["go", "build", "-o", str(out / "go_server"), str(SERVERS / "go_server.go")],
        cwd=out,
        env=env,
        check=True,
        timeout=300,
    )
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.key)
def test_server_reloads_under_load(
    request: pytest.FixtureRequest, tmp_path: Path, case: Case
) -> None:
    _runtime_or_skip(case.runtime)
    bin_dir = request.getfixturevalue("go_bin") if case.runtime == "go" else tmp_path
    version = tmp_path / "version"
    version.write_text("v0")
    command = case.command(bin_dir)
    env = {"VERSION_FILE": str(version), **case.env}
    args = [*READY, *case.handoff_args, "--drain-timeout", DRAIN_TIMEOUT]
    with running(command, args=args, env=env) as master:
        port = master.wait_ready()
        load, mark = reload_under_load(master, version, port)
        stats = load.stats
        via, detail, detached = matrix.record_run(
            master,
            server=case.server,
            variant=case.variant,
            command=command,
            notes=case.notes,
            stats=stats,
            mark=mark,
        )
        summary = stats.to_dict()
        print(f"{case.server} {case.variant}: {via} ({detail}); detach {detached}; {summary}")
        matrix.assert_nothing_refused_or_lost(stats, listener_backlog(port))
        if not case.keepalive_race:
            assert sum(stats.failures_keepalive.values()) == 0, summary
        assert "delay" not in via, f"readiness was not proved: {via}"
        matrix.assert_stops_cleanly(master)
