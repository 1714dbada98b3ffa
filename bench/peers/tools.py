"""The reload tools compared: how each starts the app, how it is reloaded, what it needs.

Every tool runs the same WSGI app (tests/integration/apps/versioned_app.py) with the same
number of worker processes; all but uWSGI run it under gunicorn (uWSGI runs it itself:
reloading is uWSGI's own job there). handoff is run by handoff_side.py; the others by
standalone_side.py, each in its own process group:

  restart         what `systemctl restart` does: gunicorn binds the port itself; a reload
                  stops it (SIGTERM, waits for its exit) and starts it again. The port is
                  closed in between.
  gunicorn-hup    gunicorn reloading itself on SIGHUP (the socket is bound here and handed
                  over at a known fd, so that the port is known before it starts).
  circus          circusd owns the socket ([socket:web]) and runs gunicorn on it
                  (`--bind fd://$(circus.sockets.web)`); `circusctl reload web`: new
                  processes first, then the old ones are stopped.
  server-starter  Server::Starter's `start_server --port=127.0.0.1:PORT=3` owns the socket
                  and runs gunicorn on fd 3; SIGHUP starts a new gunicorn and, --interval
                  (1 s) later, TERMs the old one (no readiness check: alive after 1 s).
  uwsgi           uWSGI's own master on the port (`--http-socket`, one request per
                  connection, said with `Connection: close`), SIGHUP: its graceful reload
                  (workers finish their requests, the master re-execs itself, the socket
                  is kept).
  uwsgi-chain     the same with `--lazy-apps` (each worker loads the app itself) and its
                  chain reload (`c` to the master FIFO): the workers are replaced one after
                  another, the next once the previous new one is accepting.

A tool whose program is not installed is reported as such, never dropped silently.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .scenarios import APPS, GUNICORN, GUNICORN_WORKERS, Pair, gunicorn_argv

BIN: Final = Path(sys.executable).parent
FD: Final = 3  # where a tool that owns the socket places it for gunicorn, when it can say


@dataclass(frozen=True, slots=True)
class Tool:
    key: str
    title: str
    program: str  # what must be installed (a path or a name in PATH)
    reload_by: str  # "restart", "signal" (SIGHUP to the leader), "circusctl" or "fifo"
    owns_socket: bool  # the tool (not this bench) binds the port

    def missing(self) -> str | None:
        """Why the tool cannot run here, or None."""
        if shutil.which(self.program) is None:
            return f"{self.program} is not installed"
        return None

    def argv(
        self, port: int, pair: Pair, workdir: Path, listener_fd: int, control: tuple[int, int]
    ) -> list[str]:
        """The command that runs the app under this tool (listener_fd: the bench's socket;
        control: two free ports, for circusd's control and pub/sub endpoints)."""
        address = f"127.0.0.1:{port}"
        match self.key:
            case "restart":
                return list(gunicorn_argv(address, pair, preload=False))
            case "gunicorn-hup":
                return list(gunicorn_argv(f"fd://{listener_fd}", pair, preload=False))
            case "server-starter":
                return [
                    self.program,
                    f"--port={address}={FD}",
                    "--interval=1",
                    "--signal-on-hup=TERM",
                    "--",
                    *gunicorn_argv(f"fd://{FD}", pair, preload=False),
                ]
            case "uwsgi" | "uwsgi-chain":
                chain = (
                    ("--lazy-apps", "--master-fifo", str(master_fifo(workdir, port)))
                    if self.key == "uwsgi-chain"
                    else ()
                )
                return [
                    self.program,
                    *chain,
                    *("--master", "--http-socket", address),
                    *("--processes", str(GUNICORN_WORKERS), "--need-app"),
                    *("--chdir", str(APPS), "--module", "versioned_app:wsgi"),
                    *("--die-on-term", "--disable-logging"),
                    # --http-socket closes each connection after its response without
                    # saying so; saying it keeps HTTP/1.1 clients from reusing it (as in
                    # the server matrix, docs/servers.md).
                    *("--add-header", "Connection: close"),
                    *(("--threads", "4") if pair.worker_args else ()),
                ]
            case "circus":
                return [self.program, str(circus_config(workdir, port, control, pair))]
            case _:
                raise ValueError(self.key)


def master_fifo(workdir: Path, port: int) -> Path:
    """uWSGI's master FIFO for a chain reload (`c` written to it)."""
    return workdir / f"uwsgi-{port}.fifo"


def circus_config(workdir: Path, port: int, endpoints: tuple[int, int], pair: Pair) -> Path:
    control, pubsub = endpoints
    command = " ".join(gunicorn_argv("fd://$(circus.sockets.web)", pair, preload=False))
    path = workdir / f"circus-{port}.ini"
    path.write_text(
        f"""[circus]
endpoint = tcp://127.0.0.1:{control}
pubsub_endpoint = tcp://127.0.0.1:{pubsub}
statsd = False
check_delay = 1

[watcher:web]
cmd = {command}
use_sockets = True
numprocesses = 1
copy_env = True
graceful_timeout = 30

[socket:web]
host = 127.0.0.1
port = {port}
""",
        encoding="utf-8",
    )
    return path


def circusctl_reload(control: int) -> list[str]:
    return [str(BIN / "circusctl"), "--endpoint", f"tcp://127.0.0.1:{control}", "reload", "web"]


TOOLS: Final = (
    Tool("restart", "plain restart (systemctl restart)", GUNICORN, "restart", owns_socket=True),
    Tool("gunicorn-hup", "gunicorn's own HUP", GUNICORN, "signal", owns_socket=False),
    Tool("circus", "circus (circusctl reload)", str(BIN / "circusd"), "circusctl", True),
    Tool("server-starter", "Server::Starter (start_server)", "start_server", "signal", True),
    Tool("uwsgi", "uWSGI's own graceful reload (HUP)", str(BIN / "uwsgi"), "signal", True),
    Tool("uwsgi-chain", "uWSGI's chain reload (--lazy-apps)", str(BIN / "uwsgi"), "fifo", True),
)
TOOL_KEYS: Final = (*(tool.key for tool in TOOLS), "handoff")
