"""How a starting worker proves it is ready: the timers and probes of each ``--ready`` mode.

Pure: no syscalls, no clock, no logging. ``Generations`` owns one ``Readiness``; the
state changes of workers stay with ``WorkerLifecycle``. This class only decides the
readiness actions: the ready timeout and, per mode, the ``delay:`` timer or the probe
(``RunProbe``, answered with ``ProbeFinished``, retried with capped backoff). The loop
runs a probe as an ``exec:`` command, or under ``auto`` as a /proc scan of the worker's
tree (system/accepting_scan.py). READY=1 over the notify socket counts in every mode; under
``auto`` it first triggers a scan (see ``notified``).
"""

from __future__ import annotations

from collections.abc import Mapping

from handoff.core import actions as act
from handoff.core.model import Pid, Worker, WorkerState
from handoff.core.policy import Policy, backoff
from handoff.core.timers import TimerKey, TimerKind, remaining
from handoff.formats.log_events import EventName, Level
from handoff.formats.options import ReadyMode


class Readiness:
    """The readiness timers and probes of the workers that are starting."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._probe_attempts: dict[Pid, int] = {}  # failed probes so far, per probed worker

    def watch(self, worker: Worker, out: list[act.Action]) -> None:
        """Start proving a just-spawned worker ready: its ready timeout, then the mode's wait."""
        out.append(
            act.StartTimer(
                key=TimerKey(TimerKind.READY_TIMEOUT, worker.pid),
                delay_s=self._policy.ready_timeout_s,
            )
        )
        match self._policy.ready.mode:
            case ReadyMode.DELAY:
                key = TimerKey(TimerKind.READY_DELAY, worker.pid)
                out.append(act.StartTimer(key=key, delay_s=self._policy.ready.delay_s))
            case ReadyMode.EXEC | ReadyMode.AUTO:
                self._probe_attempts[worker.pid] = 0
                out.append(act.RunProbe(pid=worker.pid, gen=worker.gen, slot=worker.slot))
            case ReadyMode.NOTIFY:
                pass

    def rewatch(
        self, worker: Worker, deadlines: Mapping[TimerKey, float], now: float, out: list[act.Action]
    ) -> None:
        """After a re-exec: watch a starting worker again (its probe runs anew), keeping the
        ready timeout and ``delay:`` deadlines it already had."""
        self.watch(worker, out)
        kinds = [TimerKind.READY_TIMEOUT]
        if self._policy.ready.mode is ReadyMode.DELAY:
            kinds.append(TimerKind.READY_DELAY)
        for kind in kinds:
            key = TimerKey(kind, worker.pid)
            left = remaining(deadlines, key, now)
            if left is not None:
                out.append(act.StartTimer(key=key, delay_s=left))

    def forget(self, worker: Worker, out: list[act.Action]) -> None:
        """Cancel what ``watch`` started: the worker is ready, stopping or gone."""
        out.append(act.CancelTimer(key=TimerKey(TimerKind.READY_TIMEOUT, worker.pid)))
        match self._policy.ready.mode:
            case ReadyMode.DELAY:
                out.append(act.CancelTimer(key=TimerKey(TimerKind.READY_DELAY, worker.pid)))
            case ReadyMode.EXEC | ReadyMode.AUTO:
                if self._probe_attempts.pop(worker.pid, None) is not None:
                    out.append(act.CancelTimer(key=TimerKey(TimerKind.PROBE_RETRY, worker.pid)))
                    out.append(act.CancelProbe(pid=worker.pid))
                if self._policy.ready.mode is ReadyMode.AUTO:
                    out.append(act.CancelTimer(key=TimerKey(TimerKind.NOTIFY_GRACE, worker.pid)))
            case ReadyMode.NOTIFY:
                pass

    def probe_finished(self, worker: Worker, ok: bool, detail: str, out: list[act.Action]) -> bool:
        """Take a probe's result: True if it proved the worker ready, else retry after backoff.

        A result for a worker no longer starting, or no longer probed, is ignored (False).
        """
        pid = worker.pid
        if worker.state is not WorkerState.STARTING or pid not in self._probe_attempts:
            return False
        if ok:
            return True  # the caller's transition to READY calls forget()
        attempts = self._probe_attempts[pid] + 1
        self._probe_attempts[pid] = attempts
        policy = self._policy
        if policy.ready.mode is ReadyMode.AUTO:
            delay = backoff(attempts, policy.scan_base_s, policy.scan_cap_s)
        else:
            delay = backoff(attempts, policy.probe_base_s, policy.probe_cap_s)
        out.append(act.StartTimer(key=TimerKey(TimerKind.PROBE_RETRY, pid), delay_s=delay))
        if detail:
            out.append(
                act.report(EventName.WORKER_PROBE_FAILED, Level.DEBUG, pid=pid, detail=detail)
            )
        return False

    def notified(self, worker: Worker, out: list[act.Action]) -> bool:
        """READY=1 arrived: True if that alone makes the worker ready.

        Under ``auto`` it does not at once: gunicorn, for one, says READY=1 from its
        arbiter before it forks the workers that accept. So READY=1 triggers a scan now,
        and is taken on its own word only if /proc shows nobody accepting within the
        notify grace (a server that accepts in a way /proc cannot show).
        """
        if self._policy.ready.mode is not ReadyMode.AUTO:
            return True
        if worker.state is WorkerState.STARTING and worker.pid in self._probe_attempts:
            key = TimerKey(TimerKind.NOTIFY_GRACE, worker.pid)
            out.append(act.StartTimer(key=key, delay_s=self._policy.notify_grace_s))
            out.append(act.RunProbe(pid=worker.pid, gen=worker.gen, slot=worker.slot))
        return False

    def retry(self, worker: Worker, out: list[act.Action]) -> None:
        """The PROBE_RETRY timer fired: probe again if the worker is still starting."""
        if worker.state is WorkerState.STARTING:
            out.append(act.RunProbe(pid=worker.pid, gen=worker.gen, slot=worker.slot))
