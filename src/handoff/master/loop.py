"""The master's event loop: one thread, one selector, the machine fed in a fixed order.

Each turn blocks until something is ready or the earliest deadline (a timer, a control
client's, the watchdog's), never on a periodic tick; turns what woke it into events, in
the order of ``sources.Source`` (signals, worker exits, notify messages, probe results:
a worker that died in the same pass is never ready), then the timers that are due;
feeds each event to ``Supervisor.handle`` and executes the actions it returns, at once
and in order. The loop decides nothing: the pieces it delegates to (``workers``,
``probes``, ``systemd``, ``control_server``) do the mechanics, and everything that
touches a process goes through ``system.System``.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence
from typing import Protocol, assert_never

from handoff.core import actions as act
from handoff.core import events as ev
from handoff.core.machine import Supervisor
from handoff.core.model import GenerationState, Pid
from handoff.core.policy import Policy
from handoff.core.timers import Timers
from handoff.errors import EXIT_FAILURE
from handoff.formats.log_events import EventName, Level
from handoff.formats.options import RunConfig
from handoff.master.control_server import ControlServer, MasterView
from handoff.master.logs import LineWriter, emit
from handoff.master.probes import Probes
from handoff.master.sources import Source, Sources, Wakeup, Watch
from handoff.master.status import build_status
from handoff.master.system import System
from handoff.master.systemd import SystemdGlue
from handoff.master.workers import WorkerTable
from handoff.system.sockets import Listener


class SignalSource(Protocol):
    """The signal inbox (system/signals.py): readable when signals arrived."""

    def fileno(self) -> int: ...

    def drain(self) -> list[signal.Signals]: ...


class NotifySource(Protocol):
    """The workers' notify socket (system/worker_notify.py)."""

    @property
    def address(self) -> str: ...

    @property
    def dropped(self) -> int:
        """Datagrams refused (another user's, or without credentials)."""
        ...

    def fileno(self) -> int: ...

    def receive(self) -> list[tuple[Pid, dict[str, str]]]: ...


class WardenHandle(Protocol):
    """The warden process (system/warden.py): its pidfd is readable if it dies."""

    @property
    def pid(self) -> Pid: ...

    @property
    def pidfd(self) -> int: ...


class MasterLoop:
    """Runs the machine against the system until it says exit; see the module docstring."""

    def __init__(
        self,
        config: RunConfig,
        listeners: Sequence[Listener],
        *,
        system: System,
        inbox: SignalSource,
        notify: NotifySource,
        warden: WardenHandle,
        environ: Mapping[str, str],
        log: LineWriter | None = None,
        worker_fd_limit: int | None = None,
    ) -> None:
        self._config = config
        self._listeners = listeners
        self._system = system
        self._inbox = inbox
        self._notify = notify
        self._warden = warden
        self._log = log
        self._machine = Supervisor(Policy.from_config(config))
        self._sources = Sources()
        self._timers = Timers()
        self._workers = WorkerTable(
            system, self._sources, config, listeners, environ, fd_limit=worker_fd_limit
        )
        self._probes = Probes(
            system, self._sources, config.ready, listeners, environ, fd_limit=worker_fd_limit
        )
        self._started_at = system.clock()
        self._systemd = SystemdGlue(environ, self._machine, self._started_at)
        self._control: ControlServer | None = None
        self._exit: act.Exit | None = None
        self.exit_reason = ""

    # -- what the control server sees ---------------------------------------------------

    @property
    def view(self) -> MasterView:
        return self._machine

    def submit(self, event: ev.Event) -> list[act.Report]:
        return [action for action in self._feed(event) if isinstance(action, act.Report)]

    def status(self) -> dict[str, object]:
        return build_status(
            machine=self._machine,
            config=self._config,
            listeners=self._listeners,
            started_at=self._started_at,
            now=self._system.clock(),
            log_lines_dropped=self._log.dropped if self._log is not None else 0,
            notify_datagrams_dropped=self._notify.dropped,
        )

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        """Run until the machine says exit; return the exit code."""
        try:
            self.start()
            while self._exit is None:
                self.turn()
        finally:
            self.shut_down()
        assert self._exit is not None
        return self._exit.code

    @property
    def exit(self) -> act.Exit | None:
        """What the machine said when it finished; None while it runs."""
        return self._exit

    def start(self) -> None:
        """Open the control socket, watch the sources, start the first generation."""
        if self._config.control_path is not None:
            self._control = ControlServer(
                self._config.control_path,
                group=self._config.control_group,
                master=self,
                sources=self._sources,
                clock=self._system.clock,
            )
            self._sources.watch(self._control.fileno(), Watch(Source.CONTROL))
            emit(EventName.CONTROL_LISTENING, path=self._config.control_path)
        self._sources.watch(self._inbox.fileno(), Watch(Source.SIGNALS))
        self._sources.watch(self._notify.fileno(), Watch(Source.NOTIFY))
        self._sources.watch(self._warden.pidfd, Watch(Source.WARDEN))
        self._update_title()
        self._feed(ev.Started())

    def turn(self) -> None:
        """Wait for what is next, and handle everything that woke the loop."""
        deadlines = [
            deadline
            for deadline in (
                self._timers.next_deadline(),
                self._control.next_deadline() if self._control else None,
                self._systemd.next_deadline(),
            )
            if deadline is not None
        ]
        timeout = max(0.0, min(deadlines) - self._system.clock()) if deadlines else None
        for wakeup in self._sources.wait(timeout):
            if self._exit is not None:
                return
            self._on_wakeup(wakeup)
        now = self._system.clock()
        if self._control is not None:
            self._control.expire(now)
        self._systemd.keep_alive(now)
        for key in self._timers.pop_due(now):
            if self._exit is not None:
                return
            self._feed(ev.TimerFired(key=key))
        self._update_title()

    def _on_wakeup(self, wakeup: Wakeup) -> None:
        watch = wakeup.watch
        match watch.source:
            case Source.SIGNALS:
                for sig in self._inbox.drain():
                    self._on_signal(sig)
            case Source.WORKER:
                self._feed_optional(self._workers.on_exit(watch.pid))
            case Source.NOTIFY:
                self._on_notify()
            case Source.PROBE:
                self._feed_optional(self._probes.on_exit(watch.pid))
            case Source.WARDEN:
                self._sources.unwatch(self._warden.pidfd)
                hint = "workers will outlive the master if it is SIGKILLed"
                emit(EventName.WARDEN_EXITED, Level.ERROR, hint=hint)
            case Source.CONTROL:
                assert self._control is not None
                self._control.on_listener()
            case Source.CLIENT:
                assert self._control is not None
                self._control.on_client(watch.fd, wakeup.readable, wakeup.writable)
            case _:
                assert_never(watch.source)

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
                    EventName.SIGNAL_IGNORED,
                    Level.WARNING,
                    signal=sig.name,
                    reason="not supported yet",
                )
            case signal.SIGCHLD:
                tracked = {*self._workers.pids(), *self._probes.pids(), self._warden.pid}
                for pid in self._system.reap_strays(tracked):
                    emit(EventName.STRAY_REAPED, Level.DEBUG, pid=pid)
            case _:
                pass

    def _on_notify(self) -> None:
        workers = self._workers.pids()
        for sender, fields in self._notify.receive():
            worker = self._system.owning_worker(sender, workers)
            if worker is None:
                reason = "not in a worker's process tree"
                emit(EventName.NOTIFY_IGNORED, Level.DEBUG, sender=sender, reason=reason)
                continue
            ready = fields.get("READY") == "1"
            self._feed(ev.WorkerNotified(pid=worker, ready=ready, status=fields.get("STATUS")))

    def shut_down(self) -> None:
        """Normally every worker is gone by now; after an internal error, make it so."""
        self._workers.kill_all()
        self._probes.kill_all()
        for pid in self._system.kill_strays({self._warden.pid}):
            emit(EventName.STRAY_KILLED, Level.WARNING, pid=pid)
        if self._control is not None:
            self._control.close()
        self._systemd.close()
        self._sources.close()
        if self._exit is None:
            self._exit = act.Exit(code=EXIT_FAILURE, reason="internal error")

    # -- feeding the machine ------------------------------------------------------------

    def _feed(self, event: ev.Event) -> list[act.Action]:
        actions = self._machine.handle(event, self._system.clock())
        for action in actions:
            self._execute(action)
        return actions

    def _feed_optional(self, event: ev.Event | None) -> None:
        if event is not None:
            self._feed(event)

    def _execute(self, action: act.Action) -> None:
        match action:
            case act.SpawnWorker(gen=gen, slot=slot):
                self._feed(self._workers.spawn(gen, slot, self._notify.address))
            case act.SendSignal(pid=pid, signal=sig):
                child = self._workers.get(pid)
                if child is not None and self._system.send_signal(child, sig):
                    emit(EventName.WORKER_SIGNALLED, Level.DEBUG, pid=pid, signal=sig.name)
            case act.DetachListeners(pid=pid):
                self._probes.detach(pid, self._machine)
            case act.KillTree(pid=pid):
                self._system.kill_tree(pid)
            case act.StartTimer(key=key, delay_s=delay):
                self._timers.start(key, self._system.clock() + delay)
            case act.CancelTimer(key=key):
                self._timers.cancel(key)
            case act.RunProbe(pid=pid, gen=gen, slot=slot):
                self._feed_optional(self._probes.run(pid, gen, slot))
            case act.CancelProbe(pid=pid):
                self._probes.cancel(pid)
            case act.Report(event=name, level=level, fields=fields):
                emit(name, level, **fields)
                if self._control is not None:
                    self._control.on_report(action)
                self._systemd.on_report(action)
            case act.Exit(reason=reason):
                self._exit = action
                self.exit_reason = reason
            case _:
                assert_never(action)

    def _update_title(self) -> None:
        machine = self._machine
        active = machine.generation_in(GenerationState.ACTIVE)
        serving = (
            f"gen {active.id}, {active.ready_count()}/{active.size} ready"
            if active
            else "no generation serving"
        )
        name = self._config.name
        self._system.set_title(f"handoff: master [{name}] {serving}, {machine.state.value}")
