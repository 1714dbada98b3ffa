"""contrib/systemd's units: `systemd-analyze verify` finds nothing, and they say what the
docs say (Type=notify, KillMode=mixed, timeouts above handoff's own, fd store, ...).

verify runs without a manager, but it touches /run/systemd on the host; it runs here in
a private mount namespace with its own /run (the recipe in sandbox.sh's reference). The
units name /opt/myapp/venv/bin/handoff, which verify insists must exist: each is verified
as a copy with the test venv substituted, next to copies of the others (a .socket's
Service= must be found).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.systemd.units import (
    CONTRIB,
    EXAMPLE_VENV_BIN,
    contrib_units,
    option,
    parse_unit,
    setting,
    split_exec_start,
    with_test_paths,
)

pytestmark = pytest.mark.systemd

UNITS = contrib_units()
SERVICES = [p for p in UNITS if p.suffix == ".service"]


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            'mount -t tmpfs tmpfs /run && exec systemd-analyze verify --man=no "$@"',
            "_",
            str(unit),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )


def test_contrib_has_the_documented_units() -> None:
    assert {p.name for p in UNITS} == {
        "handoff-example.service",
        "handoff-example-activated.service",
        "handoff-example.socket",
    }


@pytest.mark.usefixtures("verify_available")
@pytest.mark.parametrize("unit", UNITS, ids=[p.name for p in UNITS])
def test_systemd_analyze_verify_is_silent(unit: Path, tmp_path: Path) -> None:
    for other in UNITS:
        (tmp_path / other.name).write_text(with_test_paths(other.read_text()))
    copy = tmp_path / unit.name
    result = verify(copy)
    output = (result.stdout + result.stderr).replace(str(tmp_path), "<contrib copy>")
    assert result.returncode == 0, output
    assert output == "", f"systemd-analyze verify printed something:\n{output}"


@pytest.mark.parametrize("unit", UNITS, ids=[p.name for p in UNITS])
def test_verify_sees_the_example_paths(unit: Path) -> None:
    """The copy differs only by the venv path; the originals name the documented layout."""
    text = unit.read_text()
    if unit.suffix == ".service":
        assert f"ExecStart={EXAMPLE_VENV_BIN}handoff run" in text
        assert f"ExecReload={EXAMPLE_VENV_BIN}handoff reload --wait" in text
    assert with_test_paths(text).count("\n") == text.count("\n")


@pytest.mark.usefixtures("verify_available")
def test_verify_would_complain() -> None:
    """The check can fail: the original unit names a handoff that does not exist here."""
    if Path(f"{EXAMPLE_VENV_BIN}handoff").exists():
        pytest.skip(f"{EXAMPLE_VENV_BIN}handoff exists on this machine")
    result = verify(CONTRIB / "handoff-example.service")
    assert "is not executable" in result.stdout + result.stderr


def seconds(value: str) -> float:
    """A systemd time span of the forms the examples use: 45, 45s, 100ms, 2min."""
    for suffix, factor in (("ms", 0.001), ("min", 60.0), ("s", 1.0)):
        if value.endswith(suffix):
            return float(value.removesuffix(suffix)) * factor
    return float(value)


@pytest.mark.parametrize("unit", SERVICES, ids=[p.name for p in SERVICES])
def test_service_settings_match_the_docs(unit: Path) -> None:
    text = unit.read_text()

    def get(key: str) -> str:
        return setting(text, "Service", key)

    assert get("Type") == "notify"  # notify-reload needs systemd >= 253
    assert get("NotifyAccess") == "main"
    assert get("KillMode") == "mixed"
    assert get("ExecReload").endswith("handoff reload --wait")
    assert get("RuntimeDirectory")  # the control socket, found by `handoff reload`
    assert int(get("FileDescriptorStoreMax")) >= 1
    assert get("Restart") == "on-failure"
    handoff_argv, app = split_exec_start(text)
    assert handoff_argv[1] == "run"
    assert app, "no command after --"
    drain = float(option(handoff_argv, "--drain-timeout") or 30)
    ready = float(option(handoff_argv, "--ready-timeout") or 60)
    assert seconds(get("TimeoutStopSec")) > drain
    assert seconds(get("TimeoutStartSec")) > ready
    for hardening in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp"):
        assert any(k == hardening for _, k, _ in parse_unit(text)), hardening
    filters = [v for s, k, v in parse_unit(text) if s == "Service" and k == "SystemCallFilter"]
    if filters:
        # the epoll detach of old workers needs it; @system-service does not have it
        assert "pidfd_getfd" in " ".join(filters).split(), filters


def test_socket_names_what_the_activated_service_binds() -> None:
    socket_text = (CONTRIB / "handoff-example.socket").read_text()
    service_text = (CONTRIB / "handoff-example-activated.service").read_text()
    name = setting(socket_text, "Socket", "FileDescriptorName")
    assert setting(socket_text, "Socket", "Service") == "handoff-example-activated.service"
    assert setting(socket_text, "Socket", "Accept") == "no"
    handoff_argv, _ = split_exec_start(service_text)
    assert option(handoff_argv, "--bind") == f"fd:{name}"
    assert "handoff-example.socket" in setting(service_text, "Unit", "Requires")
