"""Both ends of a re-exec in place: what the old master does after an internal fault, and
how the new one takes over what it was handed.

The old end (``after_crash``): log the crash with its traceback, and unless the master
is crash-looping, exec the same command line with the state (master/reexec.py). If it is
crash-looping or the exec fails, stop the workers gracefully instead: never SIGKILL a
worker for a bug in handoff.

The new end (``take_over``): rebuild the listeners, the warden's lifeline, the notify
and control sockets from the fds the state names (the workers' output pipes are read
again by master/worker_output.py), ask the kernel which children are
workers (system/adoption.py), kill the ``exec:`` probes that were running (they are
started again), and build the ``Resumed`` event for the machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
import traceback
from dataclasses import dataclass

from handoff.core import events as ev
from handoff.core.model import GenId, Pid
from handoff.core.snapshot import FoundWorker, MachineSnapshot, snapshot_from_children
from handoff.formats.log_events import EventName, Level
from handoff.formats.options import RunConfig
from handoff.master.failpoints import Failpoints
from handoff.master.holdings import Carried, Holdings
from handoff.master.logs import emit
from handoff.master.loop import MasterLoop
from handoff.master.reexec import CRASH_LOOP_WINDOW_S, crash_loop, exec_in_place, signal_and_wait
from handoff.master.resume_state import ResumeState
from handoff.system import adoption, children, process_tree
from handoff.system.children import Child
from handoff.system.output_relay import OutputRelay
from handoff.system.users import notify_senders
from handoff.system.warden import Warden
from handoff.system.worker_notify import NotifyServer


def after_crash(loop: MasterLoop, exc: BaseException, crashes: tuple[float, ...]) -> None:
    """Re-exec the master in place; returns only if it must stop instead (it then has)."""
    now = time.monotonic()
    emit(
        EventName.MASTER_CRASHED,
        Level.ERROR,
        error=repr(exc),
        traceback="".join(traceback.format_exception(exc)),
        hint="a bug in handoff: please report it; the master re-executes itself, "
        "the workers keep serving",
    )
    recent = (*(at for at in crashes if now - at < CRASH_LOOP_WINDOW_S), now)
    if crash_loop(recent, now):
        emit(
            EventName.MASTER_CRASH_LOOP,
            Level.ERROR,
            crashes=len(recent),
            window_s=CRASH_LOOP_WINDOW_S,
            hint="stopping the workers gracefully (stop signal, then --drain-timeout)",
        )
    else:
        emit(EventName.MASTER_REEXECUTING, reason="crash")
        try:
            exec_in_place(loop.capture("crash", crashes=recent), os.environ)
        except Exception as failure:
            emit(EventName.MASTER_REEXEC_FAILED, Level.ERROR, error=repr(failure))
    loop.shut_down(gracefully=True)


@dataclass(frozen=True, slots=True)
class Handed:
    """What a re-executed master was handed, rebuilt."""

    holdings: Holdings
    warden: Warden
    notify: NotifyServer
    resumed: ev.Resumed


def take_over(state: ResumeState, config: RunConfig) -> Handed:
    """Rebuild what the state names, and which children are the workers."""
    warden = Warden.adopt(Pid(state.warden_pid), state.warden_lifeline)
    notify = NotifyServer(
        notify_senders(config.identity), adopt=(state.notify_fd, state.notify_address)
    )
    control_socket = None
    if state.control_fd is not None:
        control_socket = socket.socket(fileno=state.control_fd)
        control_socket.set_inheritable(False)
    health_socket = None
    if state.health_fd is not None:
        health_socket = socket.socket(fileno=state.health_fd)
        health_socket.set_inheritable(False)
    found = _found_workers(state.machine, {warden.pid, *(state.relay or (0,))[:1]})
    snapshot = state.machine or snapshot_from_children(found, config.workers)
    relay = None
    if state.relay is not None:
        pid, counter, out, err = state.relay
        relay = OutputRelay.adopt(pid, counter, (out, err))
    holdings = Holdings(
        listeners=[record.adopt() for record in state.listeners],
        notify=notify,
        warden=warden,
        relay=relay,
        worker_fd_limit=state.worker_fd_limit,
        control_socket=control_socket,
        health_socket=health_socket,
        failpoints=Failpoints(state.failpoints),
        generation_env={GenId(int(gen)): env for gen, env in state.generation_env.items()},
        generation_dirs={GenId(int(gen)): d for gen, d in state.generation_dirs.items()},
        carried=Carried(
            started_at=state.started_at,
            clients=state.clients,
            crashes=state.crashes,
            counters=state.counters,
            version=state.version,
            outputs=state.outputs,
            last_failure=state.last_failure,
        ),
    )
    resumed = ev.Resumed(snapshot=snapshot, found=tuple(found), reason=state.reason)
    return Handed(holdings, warden, notify, resumed)


def _found_workers(snapshot: MachineSnapshot | None, helpers: set[int]) -> list[FoundWorker]:
    """The children that are workers: the snapshot names them, or their environment does
    (and they lead their own session, as every worker does: an orphan that inherited a
    worker's environment does not)."""
    listed = {
        worker.pid: (gen.id, worker.slot)
        for gen in (snapshot.generations if snapshot else ())
        for worker in gen.workers
    }
    found: list[FoundWorker] = []
    for pid in adoption.children_of_self():
        if pid in helpers:  # the warden, the output relay
            continue
        if pid in listed:
            gen, slot = listed[pid]
            found.append(FoundWorker(pid=pid, gen=gen, slot=slot))
            continue
        child = adoption.identify(pid)
        if child.probe:
            _end_probe(pid)
        elif child.gen is not None and _leads_session(pid):
            found.append(FoundWorker(pid=pid, gen=GenId(child.gen), slot=child.slot))
    return found


def _leads_session(pid: Pid) -> bool:
    try:
        return os.getsid(pid) == pid
    except OSError:
        return False


def _end_probe(pid: Pid) -> None:
    """An ``exec:`` probe the old master was running: its answer would go nowhere."""
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def stop_orphans(config: RunConfig) -> None:
    """The state handed over cannot be used: stop the workers found gracefully, rather
    than leave them to the warden's SIGKILL when this master exits."""
    workers = []
    for pid in adoption.children_of_self():
        if adoption.identify(pid).gen is not None:
            with contextlib.suppress(OSError):
                workers.append(Child(pid, os.pidfd_open(pid)))
    signal_and_wait(workers, config.stop_signal, config.timeouts.drain_s)
    for child in workers:
        with contextlib.suppress(OSError):
            process_tree.kill_tree(child.pid)
            children.wait(child, block=True)
