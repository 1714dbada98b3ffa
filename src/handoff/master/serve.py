"""The master process's lifetime: warden, signals, sockets, pidfile, loop, clean-up.

Order matters: the warden is forked before any socket is bound (sockets systemd
passed already exist, but the warden closes every fd it inherits: it never holds the
port), the signal handlers are installed before binding (a signal that
arrives during start-up waits in the inbox instead of killing the master), and the
sockets close last, after every worker is gone.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence

from handoff.core import events as ev
from handoff.core.snapshot import SnapshotError
from handoff.errors import HandoffError
from handoff.formats.log_events import EventName, Level
from handoff.formats.options import RunConfig
from handoff.formats.worker_contract import FIRST_LISTEN_FD, expand_placeholders
from handoff.master import resume_state
from handoff.master.failpoints import Failpoints
from handoff.master.holdings import Holdings
from handoff.master.listener_closing import abandoned_connections
from handoff.master.logs import LineWriter, emit
from handoff.master.loop import MasterLoop
from handoff.master.reexec import reserve_state_fd
from handoff.master.resume_state import ResumeState
from handoff.master.system import RealSystem
from handoff.master.systemd import sync_fd_store
from handoff.master.takeover import after_crash, stop_orphans, take_over
from handoff.system import children, runtime_files, systemd_sockets
from handoff.system.output_relay import start_relay
from handoff.system.signals import HANDLED, SignalInbox
from handoff.system.sockets import (
    Listener,
    close_listeners,
    default_backlog,
    open_listeners,
)
from handoff.system.users import notify_senders
from handoff.system.warden import start_warden
from handoff.system.worker_notify import NotifyServer


def serve(run_config: RunConfig, log: LineWriter) -> tuple[int, str]:
    """Own the sockets and run the master loop until it exits; return (exit code, reason).

    A master that was re-executed in place (``HANDOFF_RESUME``) takes over instead of
    starting: master/takeover.py.
    """
    # Until the inbox exists a HUP or INT would end the master: they wait, pending.
    # (A master re-executed in place starts with them blocked already.)
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    failpoints = Failpoints.take(os.environ)
    reserve_state_fd()
    try:
        handed_state = resume_state.take(os.environ)
    except SnapshotError as exc:
        stop_orphans(run_config)
        raise HandoffError(
            f"cannot take over after a re-exec: {exc}",
            hint="the workers were stopped gracefully; start handoff again",
        ) from None
    if handed_state is not None:
        return _serve_handed(run_config, log, handed_state)
    passed = systemd_sockets.passed_sockets(os.environ, os.getpid())
    specs = systemd_sockets.resolve(run_config.binds, passed)
    expand_placeholders(run_config.command, len(specs))  # validate {fdN} early
    children.check_platform()
    worker_fd_limit = children.raise_fd_limit()
    # The warden is forked before any socket is bound and closes what it inherits (the
    # sockets systemd passed): it never holds the port.
    if run_config.control_path is not None:
        _prepare_control_directory(run_config.control_path)
    relay = start_relay(run_config.name)
    log.own_description()
    warden = start_warden(run_config.name)
    inbox = SignalInbox()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
    listeners = []
    holdings: Holdings | None = None
    try:
        listeners = open_listeners(specs, run_config.backlog or default_backlog())
        unused = systemd_sockets.close_unused(passed, specs)
        for name in unused:
            emit(
                EventName.LISTENER_UNUSED,
                name=name,
                reason="no --bind took this socket systemd passed",
            )
        for index, listener in enumerate(listeners):
            emit(
                EventName.LISTENER_BOUND,
                address=listener.address,
                fd=FIRST_LISTEN_FD + index,
                name=listener.name,
                port=listener.port,
            )
        sync_fd_store(os.environ, listeners, unused)
        _write_pidfile(run_config.pidfile)
        children.become_subreaper()
        emit(
            EventName.MASTER_STARTED,
            pid=os.getpid(),
            name=run_config.name,
            workers=run_config.workers,
            ready=run_config.ready.describe(),
            command=list(run_config.command),
            user=run_config.identity.describe() if run_config.identity else None,
        )
        notify = NotifyServer(senders=notify_senders(run_config.identity))
        holdings = Holdings(
            listeners=listeners,
            notify=notify,
            warden=warden,
            relay=relay,
            worker_fd_limit=worker_fd_limit,
            failpoints=failpoints,
        )
        loop = MasterLoop(
            run_config,
            holdings,
            system=RealSystem(warden),
            inbox=inbox,
            environ=os.environ,
            log=log,
        )
        code = _run(loop, None, notify, ())
        reason = loop.exit_reason
    finally:
        inbox.close()
        dropped = _dropped(holdings, listeners)
        close_listeners(listeners)
        _remove_pidfile(run_config.pidfile)
        warden.release()
    emit(EventName.MASTER_EXITED, exit_code=code, reason=reason, dropped=dropped)
    if relay is not None:
        relay.finish()
    return code, reason


def _dropped(holdings: Holdings | None, listeners: Sequence[Listener]) -> int:
    """Connections reset with the listeners: at a stop's early close, and what still waits
    now (every worker is gone)."""
    early = holdings.dropped_connections if holdings is not None else 0
    return early + abandoned_connections(listeners)


def _serve_handed(run_config: RunConfig, log: LineWriter, state: ResumeState) -> tuple[int, str]:
    """The same master, re-executed in place: take over what the old code handed over."""
    handed = take_over(state, run_config)
    log.own_description()
    inbox = SignalInbox()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
    try:
        _write_pidfile(run_config.pidfile, resumed=True)
        children.become_subreaper()
        loop = MasterLoop(
            run_config,
            handed.holdings,
            system=RealSystem(handed.warden),
            inbox=inbox,
            environ=os.environ,
            log=log,
        )
        code = _run(loop, handed.resumed, handed.notify, state.crashes)
        reason = loop.exit_reason
    finally:
        inbox.close()
        dropped = _dropped(handed.holdings, handed.holdings.listeners)
        close_listeners(list(handed.holdings.listeners))
        _remove_pidfile(run_config.pidfile)
        handed.warden.release()
    emit(EventName.MASTER_EXITED, exit_code=code, reason=reason, dropped=dropped)
    if handed.holdings.relay is not None:
        handed.holdings.relay.finish()
    return code, reason


def _run(
    loop: MasterLoop, resumed: ev.Resumed | None, notify: NotifyServer, crashes: tuple[float, ...]
) -> int:
    try:
        return loop.run(resumed)
    except HandoffError:
        raise  # an expected failure (e.g. the control socket in use): reported by the CLI
    except Exception as exc:
        after_crash(loop, exc, crashes)  # execs the master again, or stops the workers
        raise
    finally:
        notify.close()


def _write_pidfile(path: str | None, *, resumed: bool = False) -> None:
    """Lock and write the pidfile (system/runtime_files.py). resumed: a master re-executed
    in place takes it back; failing that must not stop it (its workers serve on)."""
    if path is None:
        return
    try:
        runtime_files.hold_pidfile(path)
    except HandoffError as exc:
        if not resumed:
            raise
        emit(EventName.PIDFILE_LOST, Level.WARNING, path=path, error=exc.message)


def _remove_pidfile(path: str | None) -> None:
    if path is not None:
        runtime_files.release_pidfile(path)  # only if still ours; a successor's stays


def _prepare_control_directory(path: str) -> None:
    """Create the control socket's directory if missing; refuse one others could use."""
    runtime_files.prepare_control_directory(path, os.environ)
