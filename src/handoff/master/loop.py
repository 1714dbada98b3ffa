"""The master's event loop: one thread, one selector, the machine fed in a fixed order.

Layer 2 (shell). The selector watches the signal wakeup socket, the notify socket, one
pidfd per child and the warden's pidfd; it blocks until the earliest timer, never on a
periodic tick. Each wake-up turns what is ready into events (signals, exits, notify
messages, probe results, then due timers), feeds them to ``Supervisor.handle`` and runs
the returned actions.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final

from handoff.core import actions as act
from handoff.core import events as ev
from handoff.core.machine import Supervisor
from handoff.core.model import GenerationState, GenId, Pid
from handoff.core.policy import Policy
from handoff.core.timers import Timers
from handoff.errors import EXIT_FAILURE, SpawnError
from handoff.formats.log_events import EventName
from handoff.formats.options import ReadyMode, RunConfig
from handoff.formats.worker_contract import (
    clean_environment,
    expand_placeholders,
    names_sockets_in_argv,
    worker_environment,
)
from handoff.master.control_server import ControlServer
from handoff.master.logs import emit
from handoff.master.status import build_status
from handoff.master.systemd import messages_for, status_text
from handoff.system import accepting_scan as scan
from handoff.system import children
from handoff.system import process_tree as proc
from handoff.system.detach import detach
from handoff.system.signals import SignalInbox
from handoff.system.sockets import Listener
from handoff.system.systemd_notify import SystemdNotifier, monotonic_usec, watchdog_interval
from handoff.system.warden import Warden
from handoff.system.worker_notify import NotifyServer

Clock = Callable[[], float]


class Source(Enum):
    """What woke the loop; handled in this order (a worker that died is never ready)."""

    SIGNALS = auto()
    WORKER = auto()
    NOTIFY = auto()
    PROBE = auto()
    WARDEN = auto()
    CONTROL = auto()
    CLIENT = auto()


NO_PID: Final = Pid(0)


@dataclass(frozen=True, slots=True)
class Watch:
    source: Source
    pid: Pid = NO_PID
    fd: int = -1  # a control client's socket


@dataclass(slots=True)
class Probe:
    child: children.Child
    cancelled: bool = False


class MasterLoop:
    def __init__(
        self,
        config: RunConfig,
        listeners: list[Listener],
        warden: Warden,
        inbox: SignalInbox,
        *,
        environ: Mapping[str, str],
        clock: Clock = time.monotonic,
    ) -> None:
        self._config = config
        self._listeners = listeners
        self._warden = warden
        self._environ = dict(environ)
        self._clock = clock
        self._machine = Supervisor(
            Policy(
                workers=config.workers,
                ready=config.ready,
                ready_timeout_s=config.timeouts.ready_s,
                drain_timeout_s=config.timeouts.drain_s,
                stop_signal=config.stop_signal,
                settle_s=config.timeouts.settle_s,
            )
        )
        # inode -> the master's fd: how /proc names our sockets in a worker's tables.
        self._listener_inodes = {os.fstat(lst.fileno()).st_ino: lst.fileno() for lst in listeners}
        self._proc_unreadable = False
        self._listening_ports = frozenset(
            lst.sock.getsockname()[1]
            for lst in listeners
            if lst.sock.family in (socket.AF_INET, socket.AF_INET6)
        )
        self._started_at = clock()
        self._control: ControlServer | None = None
        # systemd's notify socket is the master's own business: workers never get it.
        self._systemd = SystemdNotifier.from_environment(environ)
        self._watchdog_every = watchdog_interval(environ) if self._systemd else None
        self._watchdog_next = clock() if self._watchdog_every else None
        self._timers = Timers()
        self._selector = selectors.DefaultSelector()
        self._workers: dict[Pid, children.Child] = {}
        self._probes: dict[Pid, Probe] = {}  # keyed by the worker's pid
        self._exit: act.Exit | None = None
        self.exit_reason = ""
        self._inbox = inbox
        self._notify: NotifyServer | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def run(self) -> int:
        """Run until the machine says exit; return the exit code."""
        self._notify = NotifyServer()
        self._control = self._open_control()
        self._selector.register(self._inbox.fileno(), selectors.EVENT_READ, Watch(Source.SIGNALS))
        self._selector.register(self._notify.fileno(), selectors.EVENT_READ, Watch(Source.NOTIFY))
        self._selector.register(self._warden.pidfd, selectors.EVENT_READ, Watch(Source.WARDEN))
        try:
            self._update_title()
            self._feed(ev.Started())
            while self._exit is None:
                self._turn()
        finally:
            self._shut_down()
        return self._exit.code

    def _turn(self) -> None:
        deadlines = [
            d
            for d in (self._timers.next_deadline(), self._control_deadline(), self._watchdog_next)
            if d is not None
        ]
        timeout = None if not deadlines else max(0.0, min(deadlines) - self._clock())
        ready = self._selector.select(timeout)
        for selected, mask in sorted(ready, key=lambda item: item[0].data.source.value):
            if self._exit is not None:
                return
            watch: Watch = selected.data
            if watch.source is Source.CLIENT and self._control is not None:
                readable, writable = (
                    bool(mask & selectors.EVENT_READ),
                    bool(mask & selectors.EVENT_WRITE),
                )
                self._control.on_client(watch.fd, readable, writable)
            else:
                self._on_ready(watch)
        if self._control is not None:
            self._control.expire(self._clock())
        self._keep_watchdog_happy()
        for key in self._timers.pop_due(self._clock()):
            if self._exit is not None:
                return
            self._feed(ev.TimerFired(key=key))
        self._update_title()

    def _on_ready(self, watch: Watch) -> None:
        match watch.source:
            case Source.SIGNALS:
                for sig in self._inbox.drain():
                    self._on_signal(sig)
            case Source.WORKER:
                self._on_worker_exit(watch.pid)
            case Source.NOTIFY:
                self._on_notify()
            case Source.PROBE:
                self._on_probe_exit(watch.pid)
            case Source.CONTROL:
                assert self._control is not None
                self._control.on_listener()
            case Source.CLIENT:
                pass  # handled in _turn, which knows the readiness mask
            case Source.WARDEN:
                self._selector.unregister(self._warden.pidfd)
                emit(
                    EventName.WARDEN_EXITED,
                    "error",
                    hint="workers will outlive the master if it is SIGKILLed",
                )

    def _on_signal(self, sig: signal.Signals) -> None:
        match sig:
            case signal.SIGHUP:
                self._feed(ev.ReloadRequested(source="SIGHUP"))
            case signal.SIGTERM | signal.SIGINT:
                self._feed(ev.StopRequested(fast=False, source=sig.name))
            case signal.SIGQUIT:
                self._feed(ev.StopRequested(fast=True, source=sig.name))
            case signal.SIGUSR1:
                self._feed(ev.ForwardRequested(signal=sig))
            case signal.SIGTTIN:
                self._feed(ev.ScaleRequested(source=sig.name, delta=1))
            case signal.SIGTTOU:
                self._feed(ev.ScaleRequested(source=sig.name, delta=-1))
            case signal.SIGUSR2:
                emit(
                    EventName.SIGNAL_IGNORED, "warning", signal=sig.name, reason="not supported yet"
                )
            case signal.SIGCHLD:
                tracked = {
                    *self._workers,
                    *(p.child.pid for p in self._probes.values()),
                    self._warden.pid,
                }
                for pid in proc.reap_strays(tracked):
                    emit(EventName.STRAY_REAPED, "debug", pid=pid)
            case _:
                pass

    def _shut_down(self) -> None:
        # Normally every worker is gone by now; after an internal error, make it so.
        for pid, child in list(self._workers.items()):
            proc.kill_tree(pid)
            children.wait(child, block=True)
            self._forget_worker(pid)
        for probe in self._probes.values():
            proc.kill_tree(probe.child.pid)
            children.wait(probe.child, block=True)
            probe.child.close()
        self._probes.clear()
        tracked = {self._warden.pid}
        for pid in proc.kill_and_reap_strays(tracked):
            emit(EventName.STRAY_KILLED, "warning", pid=pid)
        if self._notify is not None:
            self._notify.close()
        if self._control is not None:
            self._control.close()
        self._selector.close()
        if self._exit is None:
            self._exit = act.Exit(code=EXIT_FAILURE, reason="internal error")

    # -- the control socket ------------------------------------------------------------

    def _open_control(self) -> ControlServer | None:
        path = self._config.control_path
        if path is None:
            return None
        control = ControlServer(
            path,
            group=self._config.control_group,
            submit=self._feed,
            status=self._status,
            state=lambda: self._machine.state,
            scale_target=lambda: self._machine.workers_target,
            clock=self._clock,
            watch=self._watch_client,
            unwatch=self._unwatch_client,
        )
        self._selector.register(control.fileno(), selectors.EVENT_READ, Watch(Source.CONTROL))
        emit(EventName.CONTROL_LISTENING, path=path)
        return control

    def _watch_client(self, fd: int, write: bool) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        watch = Watch(Source.CLIENT, fd=fd)
        try:
            self._selector.modify(fd, events, watch)
        except KeyError:
            self._selector.register(fd, events, watch)

    def _unwatch_client(self, fd: int) -> None:
        with contextlib.suppress(KeyError):
            self._selector.unregister(fd)

    def _tell_systemd(self, event: str) -> None:
        if self._systemd is None:
            return
        message = messages_for(event, monotonic_usec())
        if message is not None:
            self._systemd.send({**message, "STATUS": status_text(self._machine)})

    def _keep_watchdog_happy(self) -> None:
        # Sent from the loop itself: a stuck loop stops the keep-alives and systemd notices.
        if self._watchdog_next is None or self._watchdog_every is None or self._systemd is None:
            return
        now = self._clock()
        if now >= self._watchdog_next:
            self._systemd.send({"WATCHDOG": "1"})
            self._watchdog_next = now + self._watchdog_every

    def _control_deadline(self) -> float | None:
        return self._control.next_deadline() if self._control is not None else None

    def _status(self) -> dict[str, object]:
        return build_status(
            machine=self._machine,
            config=self._config,
            listeners=self._listeners,
            ports=self._listening_ports,
            started_at=self._started_at,
            now=self._clock(),
            control_path=self._config.control_path or "",
        )

    # -- feeding the machine ------------------------------------------------------------

    def _feed(self, event: ev.Event) -> None:
        for action in self._machine.handle(event, self._clock()):
            self._execute(action)

    def _execute(self, action: act.Action) -> None:
        match action:
            case act.SpawnWorker(gen=gen, slot=slot):
                self._spawn_worker(gen, slot)
            case act.SendSignal(pid=pid, signal=sig):
                child = self._workers.get(pid)
                if child is not None and children.send_signal(child, sig):
                    emit(EventName.WORKER_SIGNALLED, "debug", pid=pid, signal=sig.name)
            case act.DetachListeners(pid=pid):
                self._detach(pid)
            case act.KillTree(pid=pid):
                proc.kill_tree(pid)
            case act.StartTimer(key=key, delay_s=delay):
                self._timers.start(key, self._clock() + delay)
            case act.CancelTimer(key=key):
                self._timers.cancel(key)
            case act.RunProbe(pid=pid, gen=gen, slot=slot):
                self._run_probe(pid, gen, slot)
            case act.CancelProbe(pid=pid):
                self._cancel_probe(pid)
            case act.Report(event=name, level=level, fields=fields):
                emit(name, level, **fields)
                if self._control is not None:
                    self._control.on_report(name, fields)
                self._tell_systemd(name)
            case act.Exit(reason=reason):
                self._exit = action
                self.exit_reason = reason

    # -- workers ------------------------------------------------------------------------

    def _spawn_worker(self, gen: GenId, slot: int) -> None:
        assert self._notify is not None
        config = self._config
        try:
            executable = _resolve(config.command[0], self._environ)
            argv = expand_placeholders(config.command, len(self._listeners))
            listen_fds = not names_sockets_in_argv(config.command)
            env = worker_environment(
                self._environ,
                listener_names=[listener.name for listener in self._listeners],
                notify_socket=self._notify.address,
                generation=gen,
                slot=slot,
                listen_fds=listen_fds,
            )
            child = children.spawn(
                children.SpawnRequest(
                    executable=executable,
                    argv=argv,
                    env=env,
                    listen_fds=[listener.fileno() for listener in self._listeners],
                    set_listen_pid=listen_fds,
                )
            )
        except SpawnError as exc:
            self._feed(ev.SpawnFailed(gen=gen, slot=slot, reason=exc.message))
            return
        self._workers[child.pid] = child
        self._warden.register(child.pid)
        self._selector.register(child.pidfd, selectors.EVENT_READ, Watch(Source.WORKER, child.pid))
        self._feed(ev.WorkerSpawned(gen=gen, slot=slot, pid=child.pid))

    def _on_worker_exit(self, pid: Pid) -> None:
        child = self._workers[pid]
        # The leader is a zombie until waited for, so its pid (the group id) cannot be
        # recycled yet: whatever is left in its group dies with it.
        children.kill_group(pid)
        status = children.wait(child)
        if status is None:
            return
        self._forget_worker(pid)
        self._feed(ev.ChildExited(pid=pid, status=status))

    def _forget_worker(self, pid: Pid) -> None:
        child = self._workers.pop(pid)
        self._selector.unregister(child.pidfd)
        child.close()
        self._warden.unregister(pid)

    def _on_notify(self) -> None:
        assert self._notify is not None
        for sender, fields in self._notify.receive():
            worker = proc.owning_worker(sender, self._workers)
            if worker is None:
                emit(
                    EventName.NOTIFY_IGNORED,
                    "debug",
                    sender=sender,
                    reason="not in a worker's process tree",
                )
                continue
            self._feed(
                ev.WorkerNotified(
                    pid=worker,
                    sender=sender,
                    ready=fields.get("READY") == "1",
                    stopping=fields.get("STOPPING") == "1",
                    status=fields.get("STATUS"),
                )
            )

    # -- readiness probes ---------------------------------------------------------------

    def _run_probe(self, worker: Pid, gen: GenId, slot: int) -> None:
        if self._config.ready.mode is ReadyMode.AUTO:
            self._scan(worker)
            return
        env = clean_environment(self._environ)
        env.update(
            HANDOFF_WORKER_PID=str(worker), HANDOFF_GENERATION=str(gen), HANDOFF_WORKER=str(slot)
        )
        try:
            child = children.spawn(
                children.SpawnRequest(
                    executable="/bin/sh", argv=["sh", "-c", self._config.ready.command], env=env
                )
            )
        except SpawnError as exc:
            self._feed(ev.ProbeFinished(pid=worker, ok=False, detail=exc.message))
            return
        self._probes[worker] = Probe(child)
        self._selector.register(child.pidfd, selectors.EVENT_READ, Watch(Source.PROBE, worker))

    def _scan(self, worker: Pid) -> None:
        """--ready auto: is a process of the worker's tree waiting on a handed socket?"""
        if self._proc_unreadable:
            self._feed(ev.ProbeFinished(pid=worker, ok=False))
            return
        try:
            found = scan.scan_tree(worker, self._listener_inodes)
        except scan.ProcUnreadable as exc:
            self._proc_unreadable = True
            emit(
                EventName.READINESS_UNAVAILABLE,
                "warning",
                reason=str(exc),
                hint="--ready auto cannot see the workers; READY=1 still counts, "
                "or choose --ready notify, delay:SECONDS or exec:COMMAND",
            )
            self._feed(ev.ProbeFinished(pid=worker, ok=False))
            return
        self._feed(ev.ProbeFinished(pid=worker, ok=found.accepting > 0, detail=found.describe()))

    def _detach(self, pid: Pid) -> None:
        """Stop an old worker accepting before its stop signal; log which path was taken."""
        result = detach(pid, self._listener_inodes)
        worker = self._machine.worker(pid)
        fields: dict[str, object] = {
            "gen": worker.gen if worker else None,
            "worker": worker.slot if worker else None,
            "pid": pid,
            "path": result.path,
            "registrations": result.registrations,
            "processes": result.processes,
        }
        if result.reason:
            fields["reason"] = result.reason
        emit(EventName.WORKER_DETACHED, **fields)

    def _cancel_probe(self, worker: Pid) -> None:
        probe = self._probes.get(worker)
        if probe is not None and not probe.cancelled:
            probe.cancelled = True
            proc.kill_tree(probe.child.pid)

    def _on_probe_exit(self, worker: Pid) -> None:
        probe = self._probes[worker]
        children.kill_group(probe.child.pid)
        status = children.wait(probe.child)
        if status is None:
            return
        del self._probes[worker]
        self._selector.unregister(probe.child.pidfd)
        probe.child.close()
        if not probe.cancelled:
            self._feed(ev.ProbeFinished(pid=worker, ok=status.success, detail=status.describe()))

    # -- titles -------------------------------------------------------------------------

    def _update_title(self) -> None:
        machine = self._machine
        active = machine.generation_in(GenerationState.ACTIVE)
        serving = (
            f"gen {active.id}, {active.ready_count()}/{active.size} ready"
            if active
            else "no generation serving"
        )
        proc.set_title(f"handoff: master [{self._config.name}] {serving}, {machine.state.value}")


def _resolve(command: str, environ: Mapping[str, str]) -> str:
    """Find the executable as it is on disk now (a reload picks up a new release)."""
    import shutil  # noqa: PLC0415

    found = shutil.which(command, path=environ.get("PATH", os.defpath))
    if found is None:
        raise SpawnError(f"command not found: '{command}'")
    return found
