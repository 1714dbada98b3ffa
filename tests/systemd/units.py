"""contrib/systemd's example units, read as a user would copy them and adapted to the tests.

A test unit is the example file itself with the venv path substituted (so its hardening,
KillMode=, fd store, ExecReload= ... are what runs), plus a drop-in that changes only what
has to differ on a test machine: the app (handoff's demo app instead of uvicorn), the
port, the working and runtime directories (the example's release directory and env file,
--chdir and --env-file, are left out unless a test gives its own), and (when the test
venv is not readable by an unprivileged user) the user. Everything a drop-in changes is
listed in ``adapt_service``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import psutil

import handoff

REPO: Final = Path(__file__).resolve().parents[2]
CONTRIB: Final = REPO / "contrib" / "systemd"
# The examples assume a venv at /opt/myapp/venv holding handoff and the app.
EXAMPLE_VENV_BIN: Final = "/opt/myapp/venv/bin/"
PYTHON: Final = sys.executable  # the venv's python: not resolved, so its site-packages apply
VENV_BIN: Final = str(Path(PYTHON).parent) + "/"


def handoff_executable() -> str:
    found = shutil.which("handoff", path=VENV_BIN) or shutil.which("handoff")
    assert found, "no handoff executable next to the test python nor in PATH"
    return str(Path(found).absolute())


def contrib_units() -> list[Path]:
    return sorted(p for p in CONTRIB.iterdir() if p.suffix in (".service", ".socket"))


def with_test_paths(text: str) -> str:
    """The unit with the example venv replaced by the test's venv (binaries exist)."""
    return text.replace(EXAMPLE_VENV_BIN, VENV_BIN)


def parse_unit(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, continuation lines joined."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def setting(text: str, section: str, key: str) -> str:
    """The last value of key in section (what systemd uses for single-valued settings)."""
    values = [v for s, k, v in parse_unit(text) if s == section and k == key]
    assert values, f"no {key}= in [{section}]"
    return values[-1]


def split_exec_start(text: str) -> tuple[list[str], list[str]]:
    """ExecStart= as (handoff and its options, the app command after --)."""
    argv = shlex.split(setting(text, "Service", "ExecStart"))
    separator = argv.index("--")
    return argv[:separator], argv[separator + 1 :]


def option(argv: Sequence[str], name: str) -> str | None:
    """The value of a `--name VALUE` option (the last one), if present."""
    values = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == name]
    return values[-1] if values else None


def replace_options(argv: Sequence[str], changes: dict[str, str | None]) -> list[str]:
    """argv with `--name VALUE` options replaced (value) or removed (None)."""
    result: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in changes and i + 1 < len(argv):
            skip = True
            if changes[arg] is not None:
                result += [arg, str(changes[arg])]
            continue
        result.append(arg)
    return result


def free_port() -> int:
    """A loopback TCP port nobody listens on now (the sandbox shares our network)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _readable_by_anyone(path: Path) -> bool:
    path = path.resolve()
    if not os.stat(path).st_mode & 0o004:
        return False
    return all(os.stat(parent).st_mode & 0o001 for parent in path.parents)


def unprivileged_python() -> tuple[str, list[str]] | str:
    """A python any user can run with handoff importable: (python, PYTHONPATH), or why not.

    The test venv itself if anyone may read it; otherwise the system's python of the same
    version, given the venv's site-packages and handoff's sources on PYTHONPATH (they are
    often readable when the venv's interpreter, e.g. under /root/.pyenv, is not).
    """
    package_dirs = [Path(handoff.__file__).parents[1], Path(psutil.__file__).parents[1]]
    if checkout_adaptation():
        # DynamicUser=yes implies PrivateTmp=yes, which cannot be turned off.
        return f"the checkout ({package_dirs[0]}) is under /tmp, hidden by DynamicUser=yes"
    if not _readable_by_anyone(Path(handoff.__file__)):
        return f"handoff's sources ({package_dirs[0]}) are not readable by other users"
    if _readable_by_anyone(Path(PYTHON)) and _readable_by_anyone(Path(handoff_executable())):
        return PYTHON, []
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = Path("/usr/bin") / version
    if not system.exists() or not _readable_by_anyone(system):
        return f"neither {Path(PYTHON).resolve()} nor {system} can be run by other users"
    if not all(_readable_by_anyone(d) for d in package_dirs):
        return f"the venv's packages ({package_dirs[1]}) are not readable by other users"
    return str(system), [str(d) for d in package_dirs]


def user_adaptation() -> list[str]:
    """Drop-in lines that let the unit's user run the test venv, and why."""
    needed = [Path(PYTHON), Path(handoff.__file__), Path(handoff_executable())]
    if all(_readable_by_anyone(path) for path in needed):
        return []  # DynamicUser=yes and ProtectHome=yes as shipped
    lines = [
        "# The test venv is not readable by an unprivileged user on this machine",
        f"# (e.g. {Path(PYTHON).resolve()}): run as root, keep the rest of the hardening.",
        "DynamicUser=no",
    ]
    if any(str(p.resolve()).startswith(("/root/", "/home/")) for p in needed):
        lines.append("ProtectHome=read-only")
    return lines


def checkout_adaptation() -> list[str]:
    """Drop-in lines for a checkout (or venv) under /tmp, which PrivateTmp=yes would hide."""
    places = [Path(__file__).resolve(), Path(PYTHON).resolve(), Path(handoff.__file__).resolve()]
    if not any(str(p).startswith(("/tmp/", "/var/tmp/")) for p in places):
        return []
    return [
        "# The checkout being tested lives under /tmp: PrivateTmp=yes would hide it.",
        "PrivateTmp=no",
    ]


def systemd_command(argv: Sequence[str]) -> str:
    """A command line for ExecStart=: shell-style quoting, which systemd accepts."""
    for arg in argv:
        assert not set(arg) & {"%", "$"}, f"needs systemd escaping: {arg!r}"
    return shlex.join(argv)


@dataclass(slots=True)
class AppUnit:
    """A service installed in the sandbox, and the files it reads."""

    name: str
    port: int
    files: dict[str, str] = field(default_factory=dict)
    version_inside: str = ""  # the demo app's --version-file, as the service sees it
    version_host: Path | None = None  # the same file from the host

    def write_version(self, version: str) -> None:
        assert self.version_host is not None
        tmp = self.version_host.with_suffix(".tmp")
        tmp.write_text(version + "\n")
        tmp.chmod(0o644)
        tmp.replace(self.version_host)

    def break_version(self) -> None:
        """Make the next generation fail at start (the demo app exits 2)."""
        assert self.version_host is not None
        self.version_host.unlink()

    @property
    def control(self) -> str:
        """The master's control socket, as the sandbox sees it."""
        return f"/run/{self.name.removesuffix('.service')}/handoff.sock"


def app_command(
    version_file: str, *, start_delay_s: float = 0.0, python: str = PYTHON
) -> list[str]:
    """handoff's demo app: LISTEN_FDS sockets, READY=1, a clean drain on SIGTERM."""
    argv = [python, "-m", "handoff.demo.app", "--version-file", version_file]
    if start_delay_s:
        # exec keeps the pid, so LISTEN_PID still names the process that serves
        return ["/bin/sh", "-c", f"sleep {start_delay_s}; exec {shlex.join(argv)}"]
    return argv


def adapt_service(
    example: str,
    name: str,
    *,
    port: int | None,
    version_inside: str,
    workers: int = 2,
    start_delay_s: float = 0.0,
    handoff_options: dict[str, str | None] | None = None,
    extra: Sequence[str] = (),
    renames: dict[str, str] | None = None,
    unprivileged: tuple[str, list[str]] | None = None,
) -> dict[str, str]:
    """The files (unit and drop-in) that make contrib's example `example` the test's `name`.

    port: replaces the address of every TCP --bind (None: keep the --bind options, e.g.
    fd:NAME). renames: other unit names to replace in the text (a socket's service).
    unprivileged: (python, PYTHONPATH) from unprivileged_python(), to keep the example's
    user settings (DynamicUser=yes, ProtectHome=yes) as shipped.
    """
    text = with_test_paths((CONTRIB / example).read_text())
    for old, new in (renames or {}).items():
        text = text.replace(old, new)
    handoff_argv, _ = split_exec_start(text)
    # The example's /opt/myapp/current and shared/app.env do not exist here.
    changes: dict[str, str | None] = {
        "--workers": str(workers),
        "--chdir": None,
        "--env-file": None,
    }
    if port is not None:
        assert option(handoff_argv, "--bind") is not None
        changes["--bind"] = f"127.0.0.1:{port}"
    changes.update(handoff_options or {})
    handoff_argv = replace_options(handoff_argv, changes)
    python = PYTHON
    as_shipped: list[str] = []
    if unprivileged is not None:
        python, pythonpath = unprivileged
        handoff_argv = [python, "-m", "handoff", *handoff_argv[1:]]
        reload_argv = [python, "-m", "handoff", "reload", "--wait"]
        as_shipped = ["ExecReload=", f"ExecReload={systemd_command(reload_argv)}"]
        if pythonpath:
            as_shipped.append(f"Environment=PYTHONPATH={':'.join(pythonpath)}")
    app = app_command(version_inside, start_delay_s=start_delay_s, python=python)
    stem = name.removesuffix(".service")
    dropin = [
        "# tests/systemd: the example unit above, pointed at the test app",
        "[Service]",
        "WorkingDirectory=/",
        "RuntimeDirectory=",
        f"RuntimeDirectory={stem}",  # one per unit: stopping one must not delete another's
        "ExecStart=",
        f"ExecStart={systemd_command([*handoff_argv, '--', *app])}",
        "# failing tests fail sooner than the example's 90 s",
        "TimeoutStartSec=30",
        *(as_shipped if unprivileged is not None else user_adaptation()),
        *checkout_adaptation(),
        *extra,
    ]
    return {name: text, f"{name}.d/test.conf": "\n".join(dropin) + "\n"}


def adapt_socket(example: str, name: str, *, port: int, service: str) -> dict[str, str]:
    text = (CONTRIB / example).read_text()
    text = re.sub(r"^ListenStream=.*$", f"ListenStream=127.0.0.1:{port}", text, flags=re.M)
    text = re.sub(r"^Service=.*$", f"Service={service}", text, flags=re.M)
    return {name: text}
