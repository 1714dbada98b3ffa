"""Re-executing the master in place: same pid, same sockets, same workers.

Used after an internal fault (a bug in handoff must not cost a single request) and by
``handoff upgrade``. ``execve`` keeps the pid (systemd's MainPID and the pidfile stay
true), the children (still the master's to wait for), the fds whose close-on-exec flag is
clear, the signal mask and pending signals, and CLOCK_MONOTONIC. So the master blocks the
signals it handles (they wait, pending, until the new code has its inbox), clears
close-on-exec on what it hands over (resume_state.ResumeState.fds), writes the state to a
memfd and execs the same command line. If ``execve`` itself fails, everything is put back
and the error raised.

Crash loops: a master that crashed ``CRASH_LOOP_COUNT`` times within
``CRASH_LOOP_WINDOW_S`` does not exec again; it stops its workers gracefully (the stop
signal, then ``--drain-timeout``: ``signal_and_wait``) and exits.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from collections.abc import Iterable, MutableMapping
from typing import Final

from handoff.master.resume_state import RESUME_VARIABLE, ResumeState, write_memfd
from handoff.system import children, runtime_files, signals
from handoff.system.children import Child

CRASH_LOOP_COUNT: Final = 3
CRASH_LOOP_WINDOW_S: Final = 60.0


def crash_loop(crashes: Iterable[float], now: float) -> bool:
    """Has the master crashed too often, recently, to try again?"""
    return sum(1 for at in crashes if now - at < CRASH_LOOP_WINDOW_S) >= CRASH_LOOP_COUNT


_reserved: list[int] = []  # the memfd reserve_state_fd keeps for the next exec


def reserve_state_fd() -> None:
    """At start: keep a memfd for the state, so that a re-exec after a crash still works
    when the master has run out of file descriptors (EMFILE was maybe the crash)."""
    with contextlib.suppress(OSError):
        _reserved.append(os.memfd_create("handoff-state", os.MFD_CLOEXEC))


def exec_in_place(state: ResumeState, environ: MutableMapping[str, str]) -> None:
    """Exec the master's own command line with the state; returns only by raising OSError."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals.HANDLED)
    memfd = -1
    fds = [*state.fds(), *runtime_files.pidfile_lock_fds()]  # the pidfile's lock stays held
    try:
        memfd = write_memfd(state, _reserved[0] if _reserved else None)
        fds.append(memfd)
        for fd in fds:
            os.set_inheritable(fd, True)
        env = {**environ, RESUME_VARIABLE: str(memfd)}
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
        if memfd >= 0 and memfd not in _reserved:
            os.close(memfd)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        raise


def signal_and_wait(workers: Iterable[Child], stop_signal: signal.Signals, timeout: float) -> None:
    """Without the loop (after a crash): the stop signal to every worker, then wait up to
    timeout until each has exited (not reaped: the caller kills what is left and reaps).
    Never raises."""
    waiting: dict[int, Child] = {}
    poller = select.poll()
    for child in workers:
        with contextlib.suppress(OSError):
            children.send_signal(child, stop_signal)
            poller.register(child.pidfd, select.POLLIN)
            waiting[child.pidfd] = child
    deadline = time.monotonic() + timeout
    while waiting and (left := deadline - time.monotonic()) > 0:
        try:
            ready = poller.poll(left * 1000)
        except OSError:
            return
        for fd, _ in ready:
            poller.unregister(fd)
            waiting.pop(fd, None)
