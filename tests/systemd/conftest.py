"""Fixtures for the systemd tests: one real systemd per session, units per test.

The sandbox (sandbox.sh, a real systemd as PID 1 of private namespaces) boots once per
session, in about 0.1 s, and is always taken down at the end. A machine that cannot run
it (not root, no systemd package, no cgroup2) skips these tests with the reason; in CI
(CI=true) that is a failure instead, so that a CI image without systemd cannot pass
quietly. Each test's units are stopped and removed when it ends, pass or fail.

If a test run is killed, `kill -KILL $(cat DIR/pid)` ends its sandbox and
`bash tests/systemd/sandbox.sh down DIR` removes its cgroup (DIR is printed at boot, in
the `systemd-sandbox` pytest temp dir).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.systemd.sandbox import Sandbox
from tests.systemd.units import AppUnit, adapt_service, adapt_socket, free_port

TOOLS = ("systemctl", "journalctl", "systemd-analyze", "unshare", "nsenter", "setsid")
SANDBOX_TOOLS = ("findmnt", "flock", "sysctl", "mount", "md5sum")
SYSTEMD_BINARIES = ("/lib/systemd/systemd", "/lib/systemd/systemd-journald")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def unavailable(reason: str) -> None:
    """Skip with the reason; in CI fail, since there the tests must run."""
    if in_ci():
        pytest.fail(f"CI=true but the systemd tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def missing_for_verify() -> str | None:
    if sys.platform != "linux":
        return "systemd is Linux only"
    if os.geteuid() != 0:
        return "needs root (systemd-analyze runs in a private mount namespace: unshare -m)"
    for tool in ("systemd-analyze", "unshare"):
        if shutil.which(tool) is None:
            return f"no {tool} (packages: systemd, util-linux)"
    return None


def missing_for_sandbox() -> str | None:
    reason = missing_for_verify()
    if reason:
        return reason
    for tool in (*TOOLS, *SANDBOX_TOOLS):
        if shutil.which(tool) is None:
            return f"no {tool} in PATH (packages: systemd, util-linux, mount, procps)"
    for binary in SYSTEMD_BINARIES:
        if not os.access(binary, os.X_OK):
            return f"no {binary} (package: systemd)"
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        if not any(line.split()[2] == "cgroup2" for line in mounts if len(line.split()) > 2):
            return "no cgroup2 mounted (the sandbox delegates a cgroup2 subtree to its systemd)"
    return None


@pytest.fixture(scope="session")
def verify_available() -> None:
    reason = missing_for_verify()
    if reason:
        unavailable(reason)


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    reason = missing_for_sandbox()
    if reason:
        unavailable(reason)
    box = Sandbox(tmp_path_factory.mktemp("systemd-sandbox"))
    try:
        box.boot()
        yield box
    finally:
        box.down()
        assert not box.alive(), f"sandbox systemd (pid {box.pid}) survived down"


class Units:
    """Installs a test's units in the sandbox, and removes them all at the end."""

    def __init__(self, sandbox: Sandbox, prefix: str) -> None:
        self.sandbox = sandbox
        self.prefix = prefix
        self.names: list[str] = []
        self._count = 0
        self._run_dirs: list[Path] = []

    def _name(self, suffix: str) -> str:
        self._count += 1
        return f"hx-{self.prefix}-{self._count}{suffix}"

    def _version_file(self, stem: str) -> tuple[str, Path]:
        inside = f"/run/handoff-tests/{stem}"
        host = self.sandbox.host_path(inside)
        host.mkdir(parents=True, exist_ok=True)
        for directory in (host, host.parent):
            directory.chmod(0o755)  # readable by the unit's (dynamic) user
        self._run_dirs.append(host)
        return f"{inside}/version", host / "version"

    def _install(self, files: dict[str, str], names: Sequence[str]) -> None:
        self.names.extend(names)  # before installing: a half-done install is cleaned too
        self.sandbox.install(files)

    def service(
        self,
        *,
        example: str = "handoff-example.service",
        workers: int = 2,
        start_delay_s: float = 0.0,
        handoff_options: dict[str, str | None] | None = None,
        extra: Sequence[str] = (),
        version: str = "v1",
        unprivileged: tuple[str, list[str]] | None = None,
    ) -> AppUnit:
        """The example service on a fresh port, serving the demo app at `version`."""
        name = self._name(".service")
        stem = name.removesuffix(".service")
        inside, host = self._version_file(stem)
        unit = AppUnit(name=name, port=free_port(), version_inside=inside, version_host=host)
        unit.write_version(version)
        unit.files = adapt_service(
            example,
            name,
            port=unit.port,
            version_inside=inside,
            workers=workers,
            start_delay_s=start_delay_s,
            handoff_options=handoff_options,
            extra=extra,
            unprivileged=unprivileged,
        )
        self._install(unit.files, [name])
        return unit

    def socket_activated(
        self, *, handoff_options: dict[str, str | None] | None = None, version: str = "v1"
    ) -> tuple[str, AppUnit]:
        """handoff-example.socket + handoff-example-activated.service, renamed together."""
        base = self._name("")
        socket_name, name = f"{base}.socket", f"{base}-activated.service"
        inside, host = self._version_file(name.removesuffix(".service"))
        unit = AppUnit(name=name, port=free_port(), version_inside=inside, version_host=host)
        unit.write_version(version)
        renames = {
            "handoff-example-activated.service": name,
            "handoff-example.socket": socket_name,
        }
        unit.files = {
            **adapt_socket("handoff-example.socket", socket_name, port=unit.port, service=name),
            **adapt_service(
                "handoff-example-activated.service",
                name,
                port=None,  # keeps --bind fd:http
                version_inside=inside,
                handoff_options=handoff_options,
                renames=renames,
            ),
        }
        self._install(unit.files, [name, socket_name])
        return socket_name, unit

    def cleanup(self) -> None:
        try:
            self.sandbox.uninstall(self.names)
        finally:
            for directory in self._run_dirs:
                shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def units(sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[Units]:
    prefix = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name.removeprefix("test_"))[:40]
    factory = Units(sandbox, prefix.strip("-"))
    try:
        yield factory
    finally:
        factory.cleanup()
