"""Workers as another user (--user, --group), and unix sockets with a mode and an owner.

As root (CI runs as root; skipped elsewhere): the master binds port 80 on a loopback
address of its own (127.x.y.z: free whatever listens on 127.0.0.1:80) and keeps it and
its privileges; uvicorn and gunicorn run as nobody, reloaded under load. Every process of
every worker tree must run as nobody (uids, gids, groups), the old workers must be
detached through their epoll sets, status must see them, and a SIGKILLed master must
leave none behind. Stubborn workers of nobody's are killed at the drain timeout; exec:
probes run as nobody and nobody's READY=1 counts; an upgraded master keeps the user. A
unix socket with mode=0660 and a group is connectable by a member of that group only,
also when systemd's fd store hands it back. Bad input ends at start with exit 2.

A master that is not root works with the capabilities docs/systemd.md lists, and one
without CAP_KILL is refused: it could not even have its workers killed when it dies.

The workers' Python must be one nobody may execute (users.python_for); the app's module
is copied to a directory nobody may read.
"""

from __future__ import annotations

import contextlib
import grp
import http.client
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.integration.control_harness import (
    alive,
    cli_status,
    client_env,
    handoff,
    start,
    status_of,
)
from tests.integration.harness import APPS, Load, Master, running
from tests.integration.users import NOBODY, prefixed, python_for, python_path
from tests.integration.waiting import wait_until

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
RELOADS = 5
NOGROUP = pwd.getpwuid(NOBODY).pw_gid
NOBODY_GROUP_LIST = list(dict.fromkeys(os.getgrouplist(pwd.getpwuid(NOBODY).pw_name, NOGROUP)))
NOBODY_GROUPS = set(NOBODY_GROUP_LIST)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is root's alone), with the
    app's module and its version file."""
    path = Path(tempfile.mkdtemp(prefix="handoff-user-"))
    path.chmod(0o755)
    shutil.copy(APPS / "versioned_app.py", path / "versioned_app.py")
    (path / "versioned_app.py").chmod(0o644)
    version = path / "version"
    version.write_text("v0")
    version.chmod(0o644)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def loopback() -> str:
    """A loopback address of this test's own (all of 127/8 is on lo)."""
    a, b, c = 1 + secrets.randbelow(254), secrets.randbelow(256), 1 + secrets.randbelow(254)
    return f"127.{a}.{b}.{c}"


def get(host: str, port: int, timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", "/", headers={"Connection": "close"})
        response = connection.getresponse()
        body = response.read()
        return response.status, json.loads(body) if body.startswith(b"{") else {}
    finally:
        connection.close()


def app_env(public_dir: Path) -> dict[str, str]:
    return {
        "PYTHONPATH": os.pathsep.join((str(public_dir), python_path())),
        "VERSION_FILE": str(public_dir / "version"),
    }


def uvicorn(python: str) -> list[str]:
    return [
        python, "-m", "uvicorn", "--fd", "{fd}", "--timeout-graceful-shutdown", "20",
        "--log-level", "warning", "versioned_app:asgi",
    ]  # fmt: skip


def gunicorn(python: str) -> list[str]:
    return [
        python, "-m", "gunicorn", "--workers", "2", "--preload", "--graceful-timeout", "20",
        "--no-control-socket", "versioned_app:wsgi",
    ]  # fmt: skip


# -- what the kernel shows -----------------------------------------------------------------


def worker_trees(master: Master) -> list[psutil.Process]:
    """Every live process of every worker tree."""
    found = []
    for worker in master.live_workers():
        with contextlib.suppress(psutil.Error):
            found += [worker, *worker.children(recursive=True)]
    return found


def groups_of(pid: int) -> set[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Groups:"):
            return {int(g) for g in line.split()[1:]}
    raise AssertionError(f"no Groups: line for {pid}")


def assert_all_nobody(processes: list[psutil.Process]) -> None:
    assert processes, "no worker process"
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess, FileNotFoundError):
            who = (tuple(proc.uids()), tuple(proc.gids()), groups_of(proc.pid))
            expected = ((NOBODY,) * 3, (NOGROUP,) * 3, NOBODY_GROUPS)
            assert who == expected, f"{proc.pid} {proc.cmdline()}: {who}"


def environment_of(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    pairs = (entry.decode(errors="replace").partition("=") for entry in entries if entry)
    return {key: value for key, _, value in pairs}


def capabilities_of(pid: int) -> dict[str, int]:
    return {
        line.split(":")[0]: int(line.split()[1], 16)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("Cap")
    }


# -- port 80, nobody, reloads under load ---------------------------------------------------


def reload_as_nobody(
    master: Master, public_dir: Path, host: str, control: Path, *, keepalive: int
) -> Load:
    """RELOADS reloads under load; after each, the new version serves and every worker
    process runs as nobody. Then status sees the workers: CPU, memory, a connection."""
    start(master, control)
    assert psutil.Process(master.pid).uids().effective == 0, "the master must stay root"
    assert get(host, 80)[1].get("version") == "v0"
    assert_all_nobody(worker_trees(master))
    with Load(80, host=host, keepalive=keepalive, fresh=6 - keepalive) as load:
        load.wait_for_requests(50)
        for number in range(1, RELOADS + 1):
            (public_dir / "version").write_text(f"v{number}")
            outcome = master.reload()
            assert outcome["event"] == "reload.succeeded", outcome
            gone = outcome["gen"] - 1
            master.wait_for("generation.gone", where=lambda e, g=gone: e["gen"] == g)
            status, body = get(host, 80)
            assert (status, body.get("version")) == (200, f"v{number}"), body
            assert_all_nobody(worker_trees(master))
            load.wait_for_requests(50)
    # status reads the nobody workers' trees: CPU, memory, processes, connections (one
    # held open, accepted and not answered yet: a sync worker would close it at once).
    shown = cli_status(handoff("status", "--json", "--control", str(control)))
    workers = [w for gen in shown["generations"] for w in gen["workers"]]
    assert workers, shown
    assert all(w["rss_bytes"] > 0 and w["cpu_s"] > 0 for w in workers), workers
    trees = sum(w["processes"] for w in workers)
    assert trees == len(worker_trees(master)), (workers, worker_trees(master))
    with socket.create_connection((host, 80)):
        wait_until(lambda: connections(control) == 1, 20, "status to count the connection")
    return load


def connections(control: Path) -> int:
    """Established connections of every worker, as status counts them."""
    generations = status_of(control)["generations"]
    return sum(w["connections"] for gen in generations for w in gen["workers"])


def assert_sigkill_leaves_nothing(master: Master) -> None:
    processes = worker_trees(master)
    assert processes
    os.kill(master.pid, signal.SIGKILL)
    wait_until(
        lambda: not any(alive(proc.pid) for proc in processes),
        15,
        "every worker process to die with the master",
    )


@needs_root
@pytest.mark.timeout(240)
def test_uvicorn_as_nobody_on_port_80_reloads_under_load(public_dir: Path) -> None:
    python = python_for(NOBODY, "uvicorn", "handoff")
    host = loopback()
    control = public_dir / "ctl.sock"
    args = ["--user", "nobody", "--workers", "2", "--ready", "auto", "--control", str(control)]
    with running(
        uvicorn(python), binds=(f"{host}:80",), args=args, env=app_env(public_dir), cwd=public_dir
    ) as master:
        # Fresh connections only: uvicorn closes idle keep-alive connections when it
        # drains, and a request crossing that close fails whoever the workers run as
        # (docs/protocol.md, "The idle keep-alive race").
        load = reload_as_nobody(master, public_dir, host, control, keepalive=0)
        assert load.stats.total_failures() == 0, load.stats.to_dict()
        started = master.wait_for("master.started")
        groups = ",".join(map(str, NOBODY_GROUP_LIST))
        assert started["user"] == f"uid {NOBODY} (nobody), gid {NOGROUP}, groups {groups}"
        ready = master.named("worker.ready")
        assert {e["via"] for e in ready} == {"auto"}, ready
        detached = master.named("worker.detached")
        assert len(detached) == 2 * RELOADS, detached
        assert {e["path"] for e in detached} == {"epoll"}, detached
        worker = master.live_workers()[0].pid
        env = environment_of(worker)
        entry = pwd.getpwuid(NOBODY)
        expected = {"HOME": entry.pw_dir, "USER": "nobody", "LOGNAME": "nobody"}
        assert {k: env.get(k) for k in expected} == expected
        assert env.get("SHELL") == entry.pw_shell
        assert "HANDOFF_WORKER_IDENTITY" not in env
        caps = capabilities_of(worker)
        assert caps["CapEff"] == caps["CapPrm"] == caps["CapAmb"] == 0, caps
        assert_sigkill_leaves_nothing(master)


@needs_root
@pytest.mark.timeout(240)
def test_gunicorn_as_nobody_on_port_80_reloads_under_load(public_dir: Path) -> None:
    python = python_for(NOBODY, "gunicorn", "handoff")
    host = loopback()
    control = public_dir / "ctl.sock"
    args = ["--user", "nobody", "--control", str(control)]
    with running(
        gunicorn(python), binds=(f"{host}:80",), args=args, env=app_env(public_dir), cwd=public_dir
    ) as master:
        load = reload_as_nobody(master, public_dir, host, control, keepalive=4)
        assert load.stats.total_failures() == 0, load.stats.to_dict()
        # gunicorn's arbiter and its two workers: the whole tree is nobody's.
        assert len(worker_trees(master)) == 3, worker_trees(master)
        assert len(master.named("reload.succeeded")) == RELOADS
        assert_sigkill_leaves_nothing(master)


# -- the drain's kills ---------------------------------------------------------------------


@needs_root
@pytest.mark.timeout(120)
def test_stubborn_workers_of_another_user_are_killed_after_the_drain(public_dir: Path) -> None:
    """A worker that ignores SIGTERM, with a child in its group and one that left it
    (misbehave.py stubborn), all nobody's: killed by the master at the drain timeout."""
    python = python_for(NOBODY)
    shutil.copy(APPS / "misbehave.py", public_dir / "misbehave.py")
    (public_dir / "misbehave.py").chmod(0o644)
    pids = public_dir / "pids"
    pids.mkdir()
    os.chown(pids, NOBODY, NOGROUP)
    command = [python, str(public_dir / "misbehave.py"), "stubborn", str(pids)]
    args = ["--user", "nobody", "--drain-timeout", "1", "--control", str(public_dir / "c.sock")]
    with running(command, args=args, cwd=public_dir, env={"PYTHONPATH": python_path()}) as m:
        m.wait_for("master.ready", 30)
        first = [int(p) for p in (pids / "pids-1-0").read_text().split()]
        assert_all_nobody([psutil.Process(pid) for pid in first])
        assert m.reload()["event"] == "reload.succeeded"
        killed = m.wait_for("worker.killed", 10)
        assert killed["pid"] == first[0], killed
        m.wait_for("generation.gone", 10, where=lambda e: e["gen"] == 1)
        wait_until(lambda: not any(map(alive, first)), 10, "generation 1's tree to be killed")
        second = [int(p) for p in (pids / "pids-2-0").read_text().split()]
        m.signal(signal.SIGTERM)
        assert m.wait_exit(30) == 0
        wait_until(lambda: not any(map(alive, second)), 10, "generation 2's tree to be killed")


# -- exec: probes and the notify socket ----------------------------------------------------


@needs_root
@pytest.mark.timeout(120)
def test_exec_probes_run_as_the_user_and_its_ready_1_counts(public_dir: Path) -> None:
    """An exec: probe that passes only as nobody, with nobody's USER and HOME; and
    --ready notify, where only the worker's own READY=1 (sent as nobody) counts."""
    python = python_for(NOBODY)
    app = [python, "-m", "handoff.demo.app", "--version-file", str(public_dir / "version")]
    home = pwd.getpwuid(NOBODY).pw_dir
    probe = f'test "$(id -u)" = {NOBODY} && test "$USER" = nobody && test "$HOME" = "{home}"'
    env = {"PYTHONPATH": python_path()}
    own_control = [
        "--control",
        str(public_dir / "ctl.sock"),
    ]  # not the default: tests run in parallel
    for ready in (f"exec:{probe}", "notify"):
        args = ["--user", "nobody", "--ready", ready, "--ready-timeout", "20", *own_control]
        with running(app, args=args, env=env, cwd=public_dir) as master:
            master.wait_for("master.ready", 30)
            ready_events = master.named("worker.ready")
            assert [e["via"] for e in ready_events] == [ready.partition(":")[0]], ready_events
            assert_all_nobody(worker_trees(master))


# -- a master re-executed in place ---------------------------------------------------------


@needs_root
@pytest.mark.timeout(120)
def test_an_upgraded_master_keeps_the_user_it_resolved_at_start(public_dir: Path) -> None:
    """`handoff upgrade` re-executes the master with the same command line: it takes the
    identity it carried in its environment (looking nothing up: tests/unit/test_users.py),
    and its next generation runs as nobody again. (The master's /proc/PID/environ cannot
    show the carried value: its process title is written over that memory.)"""
    python = python_for(NOBODY)
    control = public_dir / "ctl.sock"
    app = [python, "-m", "handoff.demo.app", "--version-file", str(public_dir / "version")]
    args = ["--user", "nobody", "--workers", "2", "--control", str(control)]
    env = {"PYTHONPATH": python_path()}
    with running(app, args=args, env=env, cwd=public_dir) as master:
        start(master, control)
        upgraded = handoff("upgrade", "--control", str(control))
        assert upgraded.returncode == 0, upgraded
        resumed = master.wait_for("master.resumed")
        assert resumed["reason"] == "upgrade", resumed
        outcome = master.reload()
        assert outcome["event"] == "reload.succeeded", outcome
        master.wait_for("generation.gone", where=lambda e: e["gen"] == 1)
        assert_all_nobody(worker_trees(master))
        assert "HANDOFF_WORKER_IDENTITY" not in environment_of(master.live_workers()[0].pid)


# -- a unix socket with a mode, an owner and a group ---------------------------------------

CLIENT = r"""
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
try:
    sock.connect(sys.argv[1])
except OSError as exc:
    print(f"errno {exc.errno}")
    sys.exit(3)
sock.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
print(sock.recv(100).split(b"\r\n")[0].decode())
"""


def another_group() -> grp.struct_group:
    """A group nobody is not a member of (by name: the name is resolved by handoff)."""
    for group in grp.getgrall():
        if group.gr_gid not in (0, *NOBODY_GROUPS) and "nobody" not in group.gr_mem:
            return group
    pytest.skip("no group that nobody is not a member of")


def connect_as(python: str, path: Path, *groups: int) -> subprocess.CompletedProcess[str]:
    supplementary = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOGROUP}", *supplementary,
         python, "-c", CLIENT, str(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=client_env(),
        timeout=30,
        check=False,
    )  # fmt: skip


@needs_root
@pytest.mark.timeout(120)
def test_a_unix_socket_with_mode_0660_and_a_group_admits_that_group_only(
    public_dir: Path,
) -> None:
    python = python_for(NOBODY)
    group = another_group()
    path = public_dir / "app.sock"
    app = [python, "-m", "handoff.demo.app", "--version-file", str(public_dir / "version")]
    # Owned by daemon (not the clients' user) and the group: nobody connects only as a
    # member of the group.
    owner = pwd.getpwnam("daemon").pw_uid
    bind = f"unix:{path},mode=0660,owner=daemon,group={group.gr_name}"
    env = {"PYTHONPATH": python_path()}
    args = ["--user", "nobody", "--control", str(public_dir / "ctl.sock")]
    with running(app, binds=(bind,), args=args, env=env, cwd=public_dir) as m:
        m.wait_for("master.ready", 30)
        assert m.wait_for("listener.bound")["address"] == f"unix:{path}"
        info = path.lstat()
        assert stat.S_ISSOCK(info.st_mode)
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (
            0o660,
            owner,
            group.gr_gid,
        )
        member = connect_as(python, path, group.gr_gid)
        assert (member.returncode, member.stdout.strip()) == (0, "HTTP/1.1 200 OK"), member
        stranger = connect_as(python, path)
        assert stranger.returncode == 3, stranger
        assert stranger.stdout.strip() == "errno 13", stranger  # EACCES
        m.signal(signal.SIGTERM)
        assert m.wait_exit(30) == 0
    assert not path.exists(), "the socket file was left behind"


@needs_root
@pytest.mark.timeout(120)
def test_a_unix_socket_back_from_the_fd_store_gets_the_options_of_this_start(
    public_dir: Path,
) -> None:
    """systemd passes the socket it stored (FDNAME from the path alone) to a master whose
    --bind now has options: the same socket is adopted, not bound again, and its file
    gets this start's mode and group."""
    python = python_for(NOBODY)
    group = another_group()
    path = public_dir / "app.sock"
    stored = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stored.bind(str(path))
    stored.listen(64)
    path.chmod(0o600)  # as a start without options left it (root's umask 077)
    before = path.lstat().st_ino
    bind = f"unix:{path},mode=0660,group={group.gr_name}"
    name = f"handoff_unix_{path}"  # what a master that bound unix:PATH stored it as
    fd = stored.fileno()
    as_systemd = [
        sys.executable, "-c",
        f"import os, sys; os.dup2({fd}, 3); os.close({fd}); os.environ.update("
        f"LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='{name}'); "
        "os.execv(sys.argv[1], sys.argv[1:])",
    ]  # fmt: skip
    app = [python, "-m", "handoff.demo.app", "--version-file", str(public_dir / "version")]
    env = {"PYTHONPATH": python_path()}
    with prefixed(
        as_systemd, app, args=["--user", "nobody", "--control", str(public_dir / "ctl.sock")],
        env=env, cwd=public_dir,
        binds=(bind,), pass_fds=(fd,),
    ) as master:  # fmt: skip
        stored.close()  # only the master holds it now
        master.wait_for("master.ready", 30)
        assert master.wait_for("listener.bound")["address"] == f"unix:{path}"
        assert not master.named("listener.unused")
        info = path.lstat()
        assert info.st_ino == before, "bound again instead of adopted"
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, group.gr_gid)
        member = connect_as(python, path, group.gr_gid)
        assert (member.returncode, member.stdout.strip()) == (0, "HTTP/1.1 200 OK"), member


# -- a master that is not root -------------------------------------------------------------

DAEMON_CAPS = "+setuid,+setgid,+kill,+sys_ptrace,+dac_read_search"


def as_uid_with_caps(uid: int, caps: str) -> list[str]:
    return [
        "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
        f"--inh-caps={caps}", f"--ambient-caps={caps}",
    ]  # fmt: skip


@needs_root
@pytest.mark.timeout(120)
def test_a_master_with_the_documented_capabilities_runs_workers_as_nobody(
    public_dir: Path,
) -> None:
    """Not root, but uid 1 with CAP_SETUID, CAP_SETGID, CAP_KILL, CAP_SYS_PTRACE and
    CAP_DAC_READ_SEARCH (docs/systemd.md): auto sees the workers, they are detached
    through their epoll sets, status counts their connections, and its SIGKILL kills
    them. Without CAP_KILL it refuses to start."""
    uid = 1
    python = python_for(uid)
    own = public_dir / "own"
    own.mkdir(mode=0o700)
    os.chown(own, uid, uid)
    control = own / "ctl.sock"
    app = [python, "-m", "handoff.demo.app", "--version-file", str(public_dir / "version")]
    env = {"PYTHONPATH": python_path()}
    args = ["--user", "nobody", "--workers", "2", "--control", str(control)]
    prefix = as_uid_with_caps(uid, DAEMON_CAPS)
    with prefixed(prefix, app, args=args, env=env, cwd=public_dir, python=python) as master:
        port = start(master, control)
        assert psutil.Process(master.pid).uids().effective == uid
        assert_all_nobody(worker_trees(master))
        assert {e["detail"] for e in master.named("worker.ready")} == {
            "accepting in 1 of 1 processes (epoll)"
        }
        with socket.create_connection(("127.0.0.1", port)) as held:
            held.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert held.recv(100).startswith(b"HTTP/1.")
            # Its own client (root would not trust a master of uid 1 in /tmp).
            client = handoff("status", "--json", "--control", str(control), user=uid)
            workers = [w for gen in cli_status(client)["generations"] for w in gen["workers"]]
            assert sum(w["connections"] for w in workers) == 1, workers
        outcome = master.reload()
        assert outcome["event"] == "reload.succeeded", outcome
        assert {e["path"] for e in master.named("worker.detached")} == {"epoll"}
        assert not master.named("readiness.unavailable")
        assert_sigkill_leaves_nothing(master)

    refused = subprocess.run(
        [*as_uid_with_caps(uid, "+setuid,+setgid,+sys_ptrace,+dac_read_search"), python,
         "-m", "handoff", "run", "--user", "nobody", "--control", str(control), "--", *app],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=client_env(env),
        cwd=public_dir, timeout=60, check=False,
    )  # fmt: skip
    assert refused.returncode == 2, refused
    assert refused.stderr.splitlines() == [
        f"handoff: error: handoff runs as uid {uid} without CAP_KILL: it could not stop "
        f"workers running as uid {NOBODY} (nobody)",
        "hint: give handoff CAP_KILL as well (AmbientCapabilities=), or run it as root",
    ]


# -- bad input: one line, exit 2, nothing left running -------------------------------------


def run_to_the_end(argv: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run a `handoff run` in its own session; its result and the session id."""
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=client_env({"PYTHONPATH": python_path()}),
        cwd=cwd,
        start_new_session=True,
    )
    out, err = process.communicate(timeout=60)
    return subprocess.CompletedProcess(argv, process.returncode, out, err), process.pid


def nothing_left_in(session: int) -> bool:
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if os.getsid(proc.pid) == session:
                return False
    return True


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("args", "lines"),
    [
        (
            ["--user", "no-such-user-h10"],
            [
                "handoff: error: --user no-such-user-h10: no such user 'no-such-user-h10'",
                "hint: check the name (see: getent passwd), or create the user first",
            ],
        ),
        (
            ["--user", "nobody", "--group", "no-such-group-h10"],
            [
                "handoff: error: --group no-such-group-h10: no such group 'no-such-group-h10'",
                "hint: check the name (see: getent group), or give a gid",
            ],
        ),
        (
            ["--bind", "unix:{dir}/app.sock,owner=no-such-user-h10"],
            [
                "handoff: error: --bind unix:{dir}/app.sock,owner=no-such-user-h10: owner=: "
                "no such user 'no-such-user-h10'",
                "hint: check the name (see: getent passwd), or create the user first",
            ],
        ),
        (
            ["--bind", "unix:{dir}/app.sock,mode=0660,group=no-such-group-h10"],
            [
                "handoff: error: --bind unix:{dir}/app.sock,mode=0660,group=no-such-group-h10: "
                "group=: no such group 'no-such-group-h10'",
                "hint: check the name (see: getent group), or give a gid",
            ],
        ),
        (
            ["--bind", "unix:{dir}/app.sock,mode=0999"],
            [
                "handoff: error: Invalid value for '-b' / '--bind': 'unix:{dir}/app.sock,"
                "mode=0999': mode= takes octal permissions such as 0660",
                "hint: see 'handoff run --help'",
            ],
        ),
    ],
)
def test_an_unknown_user_or_group_is_one_line_and_exit_2(
    public_dir: Path, args: list[str], lines: list[str]
) -> None:
    argv = [sys.executable, "-m", "handoff", "run"]
    argv += [arg.format(dir=public_dir) for arg in args] + ["--", "sleep", "60"]
    result, session = run_to_the_end(argv, public_dir)
    assert result.returncode == 2, result
    assert result.stderr.splitlines() == [line.format(dir=public_dir) for line in lines]
    assert nothing_left_in(session)
    assert not (public_dir / "app.sock").exists()


@needs_root
@pytest.mark.timeout(120)
def test_a_master_that_is_not_root_cannot_switch_users_but_may_be_its_own(
    public_dir: Path,
) -> None:
    python = python_for(NOBODY)
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOGROUP}", "--init-groups"]
    argv = [*as_nobody, python, "-m", "handoff", "run", "--user", "daemon", "--", "sleep", "60"]
    result, session = run_to_the_end(argv, public_dir)
    assert result.returncode == 2, result
    daemon = pwd.getpwnam("daemon").pw_uid
    assert result.stderr.splitlines() == [
        f"handoff: error: handoff runs as uid {NOBODY} and cannot switch its workers to "
        f"uid {daemon} (daemon)",
        "hint: run handoff as root, or give it CAP_SETUID, CAP_SETGID and CAP_KILL "
        "(AmbientCapabilities= in a unit: docs/systemd.md); or leave out --user/--group",
    ]
    assert nothing_left_in(session)

    # Asked to be what it already is: nothing to switch, it just runs.
    own = public_dir / "own"
    own.mkdir(mode=0o700)
    os.chown(own, NOBODY, NOGROUP)
    app = [python, "-m", "handoff.demo.app", "--version-file", str(public_dir / "version")]
    args = ["--user", "nobody", "--control", str(own / "ctl.sock")]
    env = {"PYTHONPATH": python_path()}
    with prefixed(as_nobody, app, args=args, env=env, cwd=public_dir, python=python) as master:
        master.wait_for("master.ready", 30)
        assert_all_nobody([psutil.Process(master.pid), *worker_trees(master)])
