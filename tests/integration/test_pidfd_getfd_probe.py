"""A master under a seccomp filter that refuses pidfd_getfd with EPERM (review #19):
one warning at start, and reloads work, every old worker stopped by its signal alone.

The filter is installed by a sitecustomize.py on PYTHONPATH before handoff's first line
runs, as systemd would install SystemCallFilter= before exec.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tests.integration.control_harness import demo_app
from tests.integration.harness import running
from tests.integration.http import get
from tests.unit.test_pidfd_getfd_probe import SECCOMP_FILTER


def _refusing_pidfd_getfd(tmp_path: Path) -> dict[str, str]:
    """The environment of a master whose seccomp filter refuses pidfd_getfd (EPERM)."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SECCOMP_FILTER)
    return {"PYTHONPATH": str(tmp_path / "site"), "HANDOFF_TEST_SECCOMP_ERRNO": str(errno.EPERM)}


@pytest.mark.timeout(90)
def test_a_master_refused_pidfd_getfd_warns_once_and_reloads_signal_only(tmp_path: Path) -> None:
    env = _refusing_pidfd_getfd(tmp_path)
    args = ["--workers", "1", "--name", "seccomp-getfd", "--settle", "0.05"]
    version = tmp_path / "version"
    version.write_text("v1")
    with running(demo_app(version), args=args, env=env) as master:
        port = master.wait_ready()
        warning = master.wait_for("detach.unavailable", 5)
        assert warning["reason"] == "pidfd_getfd: Operation not permitted (EPERM)"
        (old,) = master.worker_pids()

        for _ in range(2):
            assert master.reload()["event"] == "reload.succeeded"
        assert get(port)[0] == 200

        detached = master.named("worker.detached")
        assert [e["pid"] for e in detached][:1] == [old]
        assert len(detached) == 2
        for entry in detached:
            assert entry["path"] == "signal-only"
            assert "pidfd_getfd was refused at start" in entry["reason"]
        assert len(master.named("detach.unavailable")) == 1


@pytest.mark.timeout(90)
def test_rescue_refused_pidfd_getfd_warns_once_and_reloads_without_it(tmp_path: Path) -> None:
    """--rescue-keepalive where the kernel refuses the copy: one warning with the reason
    and a hint at start, then reloads exactly as without the option."""
    env = _refusing_pidfd_getfd(tmp_path)
    args = ["--workers", "1", "--name", "seccomp-rescue", "--rescue-keepalive"]
    version = tmp_path / "version"
    version.write_text("v1")
    with running(demo_app(version), args=args, env=env) as master:
        port = master.wait_ready()
        warning = master.wait_for("rescue.unavailable", 5)
        assert warning["level"] == "warning"
        assert warning["reason"] == "pidfd_getfd is refused: Operation not permitted (EPERM)"
        assert "CAP_SYS_PTRACE" in warning["hint"]
        for _ in range(2):
            assert master.reload()["event"] == "reload.succeeded"
        assert get(port)[0] == 200
        assert master.named("rescue.finished") == []  # nothing was copied
        assert len(master.named("rescue.unavailable")) == 1
