"""pidfd_getfd is tried once at start; refused, no worker is detached (review #19).

The refusal is real: a child interpreter installs a seccomp filter that makes
pidfd_getfd fail with an errno, as systemd's ``SystemCallFilter=`` with
``SystemCallErrorNumber=`` or a container's profile does, then runs the probe. What the
master does with a refusal (one warning, signal-only detaching for its whole life) is
checked on ``Probes`` with that answer given, since a filter cannot be taken off the
test process again; tests/integration/test_pidfd_getfd_probe.py runs a whole master
under the filter.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import cast

import pytest
from structlog.testing import capture_logs

from handoff.core.actions import Report
from handoff.core.model import Pid
from handoff.formats.log_events import EventName
from handoff.formats.options import ReadyMode, ReadySpec, RunConfig, Timeouts, parse_bind
from handoff.master.holdings import Holdings
from handoff.master.sources import Sources
from handoff.master.switching import Switching
from handoff.system import capabilities
from handoff.system.sockets import Listener, close_listeners, open_listeners
from tests.unit.fake_system import FakeSystem
from tests.unit.test_systemd_messages import serving_loop

pytestmark = pytest.mark.timeout(30)

# Installs a seccomp filter on the running process: pidfd_getfd (438 on x86_64 and
# aarch64) fails with the errno in HANDOFF_TEST_SECCOMP_ERRNO; everything else is allowed.
# As sitecustomize.py it puts a whole interpreter (a master, its workers) under it.
SECCOMP_FILTER = r"""
import ctypes, os, platform, struct
_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}[platform.machine()]
_ERRNO = int(os.environ["HANDOFF_TEST_SECCOMP_ERRNO"])
_program = b"".join(
    struct.pack("HBBI", code, jt, jf, k)
    for code, jt, jf, k in [
        (0x20, 0, 0, 4),  # load seccomp_data.arch
        (0x15, 0, 3, _ARCH),  # another architecture: allow
        (0x20, 0, 0, 0),  # load seccomp_data.nr
        (0x15, 0, 1, 438),  # pidfd_getfd?
        (0x06, 0, 0, 0x00050000 | _ERRNO),  # SECCOMP_RET_ERRNO
        (0x06, 0, 0, 0x7FFF0000),  # SECCOMP_RET_ALLOW
    ]
)
_buffer = ctypes.create_string_buffer(_program)
_fprog = struct.pack("HxxxxxxP", len(_program) // 8, ctypes.addressof(_buffer))
_libc = ctypes.CDLL(None, use_errno=True)
if _libc.prctl(38, 1, 0, 0, 0) or _libc.prctl(22, 2, ctypes.create_string_buffer(_fprog), 0, 0):
    raise OSError(ctypes.get_errno(), "seccomp: " + os.strerror(ctypes.get_errno()))
"""

_PROBE = "from handoff.system import capabilities; print(capabilities.pidfd_getfd_refusal())"


def probe_under_filter(code: int) -> str:
    env = {**os.environ, "HANDOFF_TEST_SECCOMP_ERRNO": str(code)}
    result = subprocess.run(
        [sys.executable, "-c", SECCOMP_FILTER + "\n" + _PROBE],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_pidfd_getfd_is_allowed_here() -> None:
    assert capabilities.pidfd_getfd_refusal() is None


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.EPERM, "Operation not permitted (EPERM)"),
        (errno.ENOSYS, "Function not implemented (ENOSYS)"),
        (errno.EACCES, "Permission denied (EACCES)"),
    ],
)
def test_a_seccomp_filter_that_returns_an_error_is_seen(code: int, expected: str) -> None:
    assert probe_under_filter(code) == expected


def test_running_out_of_fds_says_nothing_about_the_call() -> None:
    """EMFILE from the probe leaves detaching on: the next detach may well work."""
    assert probe_under_filter(errno.EMFILE) == "None"


# -- what the master does with the answer ------------------------------------------------------


@pytest.fixture
def listeners() -> Iterator[list[Listener]]:
    opened = open_listeners((parse_bind("127.0.0.1:0"),), 16)
    yield opened
    close_listeners(opened)


@pytest.fixture
def sources() -> Iterator[Sources]:
    made = Sources()
    yield made
    made.close()


CONFIG = RunConfig(
    command=("true",),
    binds=(parse_bind("127.0.0.1:0"),),
    backlog=16,
    workers=2,
    ready=ReadySpec(mode=ReadyMode.AUTO),
    timeouts=Timeouts(),
    stop_signal=signal.SIGTERM,
    pidfile=None,
    name="test",
)


def _holding(listeners: list[Listener]) -> Holdings:
    """What Switching reads of the master's holdings: the listeners, the workers' fd limit."""
    return cast("Holdings", SimpleNamespace(listeners=listeners, worker_fd_limit=None))


def test_a_refusal_at_start_is_one_warning_and_every_detach_is_signal_only(
    listeners: list[Listener], sources: Sources
) -> None:
    system = FakeSystem()
    loop = serving_loop()
    old = sorted(loop.pids(1))
    with capture_logs() as logs:
        switching = Switching(
            system,
            sources,
            CONFIG,
            _holding(listeners),
            {},
            detach_check=lambda: "Operation not permitted (EPERM)",
        )
        outcomes = [switching.detach(Pid(pid), loop.machine) for pid in old]
        reports = [item for outcome in outcomes for item in outcome if isinstance(item, Report)]

    warnings = [e for e in logs if e["event"] == "detach.unavailable"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["reason"] == "pidfd_getfd: Operation not permitted (EPERM)"
    assert "SystemCallFilter=" in str(warnings[0]["hint"])
    assert {r.event for r in reports} == {EventName.WORKER_DETACHED}
    detached = [r.fields for r in reports]
    assert [e["pid"] for e in detached] == old
    for entry in detached:
        assert entry["path"] == "signal-only"
        assert entry["reason"] == (
            "pidfd_getfd was refused at start: Operation not permitted (EPERM)"
        )
        assert entry["gen"] == 1
    assert "detach" not in system.names()  # nothing was tried per worker
    system.close()


def test_an_allowed_pidfd_getfd_detaches_as_usual(
    listeners: list[Listener], sources: Sources
) -> None:
    system = FakeSystem()
    loop = serving_loop()
    (first, *_) = loop.pids(1)
    with capture_logs() as logs:
        switching = Switching(
            system, sources, CONFIG, _holding(listeners), {}, detach_check=lambda: None
        )
        (detached,) = switching.detach(Pid(first), loop.machine)

    assert isinstance(detached, Report)
    assert detached.event is EventName.WORKER_DETACHED
    assert not [e for e in logs if e["event"] == "detach.unavailable"]
    assert system.names() == ["detach"]
    system.close()
