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
from collections.abc import Iterable, Mapping
from typing import Final, Protocol, assert_never

from handoff.core import actions as act
from handoff.core import events as ev
from handoff.core.machine import Supervisor
from handoff.core.model import MasterState, Pid
from handoff.core.policy import Policy
from handoff.core.snapshot import MachineSnapshot
from handoff.core.timers import Timers
from handoff.formats.log_events import EventName, Level
from handoff.formats.options import RunConfig
from handoff.master.control_answers import MasterView
from handoff.master.control_server import ControlServer, open_control
from handoff.master.health_server import open_health
from handoff.master.holdings import Carried, Holdings
from handoff.master.listener_closing import at_stop
from handoff.master.logs import LineWriter, emit
from handoff.master.probes import Probes
from handoff.master.reexec import signal_and_wait
from handoff.master.rescue import open_rescue
from handoff.master.resume_state import ResumeState
from handoff.master.sources import (
    SignalSource,
    Source,
    Sources,
    Wakeup,
    Watch,
    notified,
)
from handoff.master.status import build_status, process_title
from handoff.master.switching import Outcome, Switching
from handoff.master.system import System
from handoff.master.systemd import SystemdGlue
from handoff.master.upgrade import Upgrades
from handoff.master.workers import WorkerTable


class Timed(Protocol):
    """A part of the loop with deadlines of its own (client requests, the watchdog, ...)."""

    def next_deadline(self) -> float | None: ...

    def expire(self, now: float) -> None: ...


# What each signal asks of the machine (USR2, the upgrade, and CHLD are the loop's own).
SIGNAL_REQUESTS: Final[Mapping[signal.Signals, ev.Event]] = {
    signal.SIGHUP: ev.ReloadRequested(source="SIGHUP"),
    signal.SIGTERM: ev.StopRequested(fast=False, source="SIGTERM"),
    signal.SIGINT: ev.StopRequested(fast=False, source="SIGINT"),
    signal.SIGQUIT: ev.StopRequested(fast=True, source="SIGQUIT"),
    signal.SIGUSR1: ev.ForwardRequested(signal=signal.SIGUSR1),
    signal.SIGTTIN: ev.ScaleRequested(source="SIGTTIN", delta=1),
    signal.SIGTTOU: ev.ScaleRequested(source="SIGTTOU", delta=-1),
}


class MasterLoop:
    """Runs the machine against the system until it says exit; see the module docstring."""

    def __init__(
        self,
        config: RunConfig,
        holdings: Holdings,
        *,
        system: System,
        inbox: SignalSource,
        environ: Mapping[str, str],
        log: LineWriter | None = None,
    ) -> None:
        self._config = config
        self._holdings = holdings
        self._listeners = listeners = holdings.listeners
        self._system = system
        self._inbox = inbox
        self._notify = holdings.notify
        self._warden = holdings.warden
        self._helpers = {self._warden.pid, *holdings.helper_pids()}  # not strays
        self._log = log
        fd_limit = holdings.worker_fd_limit
        self._machine = Supervisor(Policy.from_config(config))
        self._sources = Sources()
        self._timers = Timers()
        self._output = holdings.open_output(config, self._sources, log, environ)
        self._workers = WorkerTable(
            system,
            self._sources,
            config,
            holdings,
            environ,
            timers=self._timers,
            machine=self._machine,
        )
        self._probes = Probes(
            system, self._sources, config.ready, listeners, environ, fd_limit=fd_limit
        )
        self._probes.run_as(config.identity)  # --user, --group
        self._switching = Switching(system, self._sources, config, holdings, environ)
        self._failpoints = holdings.failpoints
        self._carried = holdings.carried or Carried(started_at=system.clock())
        self._started_at = self._carried.started_at
        self._systemd = SystemdGlue(environ, self._machine, system.clock())
        self._upgrades = Upgrades(
            system, self._sources, lambda: self.capture("upgrade"), self._answer_upgrade
        )
        self._control: ControlServer | None = None
        self._health = open_health(config, holdings, self._sources, system.clock, self)
        self._rescue = open_rescue(config, holdings, self._sources, system.clock, self._machine)
        # What keeps deadlines of its own besides the machine's timers (and control's).
        self._timed: list[Timed] = [self._systemd, self._upgrades, self._workers, self._health]
        self._timed.append(self._rescue)
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
            counters=self.counters(),
            last_failure=self._output.last_failure,
        )

    def counters(self) -> dict[str, int]:
        """What status counts, carried across re-execs."""
        own = self._holdings.counters(self._log.dropped if self._log is not None else 0)
        return {**own, **self._rescue.counters()}

    def upgrade(self, source: str) -> str | None:
        """Start an upgrade's pre-flight (or join the one running); why not, if refused."""
        stopping = self._machine.state is MasterState.STOPPING
        return self._upgrades.request(source, stopping=stopping, now=self._system.clock())

    # -- the loop -----------------------------------------------------------------------

    def run(self, resumed: ev.Resumed | None = None) -> int:
        """Run until the machine says exit; return the exit code.

        An exception leaves everything running, for the caller to re-exec the master
        (master/serve.py): the workers must not pay for a bug in handoff.
        """
        if resumed is None:
            self.start()
        else:
            self.resume(resumed)
        while self._exit is None:
            self.turn()
        self.shut_down()
        return self._exit.code

    @property
    def exit(self) -> act.Exit | None:
        """What the machine said when it finished; None while it runs."""
        return self._exit

    def start(self) -> None:
        """Open the control socket, watch the sources, start the first generation."""
        self._watch_sources()
        self._feed(ev.Started())

    def resume(self, resumed: ev.Resumed) -> None:
        """After a re-exec: take the found workers back, then the machine its state."""
        self._watch_sources()
        for found in resumed.found:
            self._workers.adopt(found.pid)
        self._feed(resumed)
        if self._control is not None:
            self._control.adopt_clients(self._carried.clients)
        if resumed.reason == "upgrade":
            self._upgrades.succeeded(self._carried.version)

    def _watch_sources(self) -> None:
        self._control = open_control(
            self._config, self._holdings, self, self._sources, self._system.clock
        )
        if self._control is not None:
            self._timed.append(self._control)
        self._sources.watch(self._inbox.fileno(), Watch(Source.SIGNALS))
        self._sources.watch(self._notify.fileno(), Watch(Source.NOTIFY))
        self._sources.watch(self._warden.pidfd, Watch(Source.WARDEN))
        self._update_title()

    def capture(self, reason: str, *, crashes: tuple[float, ...] | None = None) -> ResumeState:
        """What the code this master execs needs to take over (master/reexec.py); without
        the machine's snapshot if that fails (the new master asks the kernel instead)."""
        control = self._control
        return self._holdings.capture(
            reason,
            machine=_snapshot(self._machine, self._timers),
            control=None if control is None else control.handover(),
            started_at=self._started_at,
            counters=self.counters(),
            crashes=crashes,
        )

    def turn(self) -> None:
        """Wait for what is next, and handle everything that woke the loop."""
        due = [self._timers.next_deadline(), *(part.next_deadline() for part in self._timed)]
        deadlines = [deadline for deadline in due if deadline is not None]
        timeout = max(0.0, min(deadlines) - self._system.clock()) if deadlines else None
        for wakeup in self._sources.wait(timeout):
            if self._exit is not None:
                return
            self._on_wakeup(wakeup)
        now = self._system.clock()
        for part in self._timed:
            part.expire(now)
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
                exited = self._workers.on_exit(watch.pid)
                self._feed_optional(self._rescue.exited(watch.pid, exited))
            case Source.OUTPUT:
                self._output.on_ready(watch.fd)
            case Source.NOTIFY:
                for event in notified(self._notify, self._system, self._workers.pids()):
                    self._feed(event)
            case Source.PROBE:
                self._feed_optional(self._probes.on_exit(watch.pid))
            case Source.VERIFY:
                self._feed_optional(self._switching.on_exit(watch.pid))
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
            case Source.UPGRADE:
                self._upgrades.on_exit()
            case Source.HEALTH:
                self._health.on_ready(watch.fd, wakeup.readable, wakeup.writable)
            case Source.RESCUE:
                self._rescue.on_ready(watch.fd, wakeup.readable, wakeup.writable)
            case _:
                assert_never(watch.source)

    def _on_signal(self, sig: signal.Signals) -> None:
        request = SIGNAL_REQUESTS.get(sig)
        if request is not None:
            self._feed(request)
        elif sig is signal.SIGUSR2:
            self.upgrade(source=sig.name)
        elif sig is signal.SIGCHLD:
            parts = (self._workers, self._probes, self._upgrades, self._switching)
            _reap_strays(self._system, parts, self._helpers)

    def _answer_upgrade(self, **fields: object) -> None:
        if self._control is not None:
            self._control.upgrade_finished(**fields)

    # -- the end ------------------------------------------------------------------------

    def shut_down(self, *, gracefully: bool = False) -> None:
        """Normally every worker is gone by now; make it so, and close what the loop owns.

        gracefully (the master crashed and cannot re-exec): the stop signal first, and
        --drain-timeout for the workers to finish what they serve, rather than SIGKILL.
        """
        self._upgrades.cancel()
        if gracefully:
            drain = self._config.timeouts.drain_s
            signal_and_wait(self._workers.children(), self._config.stop_signal, drain)
        for children in (self._workers, self._probes, self._switching):
            children.kill_all()
        for pid in self._system.kill_strays(self._helpers):
            emit(EventName.STRAY_KILLED, Level.WARNING, pid=pid)
        owned = (self._rescue, self._control, self._health, self._systemd, self._sources)
        for part in owned:
            if part is not None:
                part.close()

    # -- feeding the machine ------------------------------------------------------------

    def _feed(self, event: ev.Event) -> list[act.Action]:
        actions = self._machine.handle(event, self._system.clock())
        for action in actions:
            self._execute(action)
        return actions

    def _feed_optional(self, event: ev.Event | None) -> None:
        if event is not None:
            self._feed(event)

    def _apply(self, outcome: Outcome) -> None:
        for item in outcome:  # in order: what a part of the loop reports, what happened
            self._execute(item) if isinstance(item, act.Report) else self._feed(item)

    def _execute(self, action: act.Action) -> None:
        match action := self._output.annotate(action):  # a failed start: its last output
            case act.SpawnWorker(gen=gen, slot=slot):
                self._feed(self._workers.spawn(gen, slot, self._notify.address))
            case act.SendSignal(pid=pid, signal=sig, rescue=rescue):
                child = self._workers.get(pid)
                if child is not None and rescue:
                    self._rescue.before_signal(pid)
                if child is not None and self._system.send_signal(child, sig):
                    emit(EventName.WORKER_SIGNALLED, Level.DEBUG, pid=pid, signal=sig.name)
            case act.DetachListeners(pid=pid):
                self._apply(self._switching.detach(pid, self._machine))
            case act.ReattachListeners(pid=pid):
                self._apply(self._switching.reattach(pid, self._machine))
            case act.RunVerify(gen=gen):
                self._feed_optional(self._switching.verify(gen))
            case act.StopTakingConnections() | act.CloseListeners():
                self._holdings.dropped_connections += at_stop(action, self._listeners)
            case act.KillTree(pid=pid):
                self._rescue.worker_gone(pid, killed=True)
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
                self._health.on_report(action)
                self._failpoints.after(name)
            case act.Exit(reason=reason):
                self._exit = action
                self.exit_reason = reason
            case _:
                assert_never(action)

    def _update_title(self) -> None:
        self._system.set_title(process_title(self._machine, self._config.name))


def _snapshot(machine: Supervisor, timers: Timers) -> MachineSnapshot | None:
    try:
        return machine.snapshot(timers.deadlines())
    except Exception:
        return None  # the new master asks the kernel instead


class Tracking(Protocol):
    """A part of the loop with children of its own (not strays)."""

    def pids(self) -> list[Pid]: ...


def _reap_strays(system: System, parts: Iterable[Tracking], helpers: set[Pid]) -> None:
    tracked = {pid for part in parts for pid in part.pids()} | helpers
    for pid in system.reap_strays(tracked):
        emit(EventName.STRAY_REAPED, Level.DEBUG, pid=pid)
