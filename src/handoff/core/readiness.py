"""How a starting worker proves it is ready: the timers and probes of each ``--ready`` mode.

Pure: no syscalls, no clock, no logging. ``Generations`` owns one ``Readiness``; the
state changes of workers stay with ``WorkerLifecycle``. This class only decides the
readiness actions: the ready timeout and, per mode, the ``delay:`` timer or the probe
(``RunProbe``, answered with ``ProbeFinished``, retried with capped backoff). The loop
runs a probe as an ``exec:`` command, or under ``auto`` as a /proc scan of the worker's
tree (system/accepting_scan.py). READY=1 over the notify socket counts in every mode but
``http:``; under ``auto`` it first triggers a scan (see ``notified``).

``http:PATH`` is ``auto`` and then an answer: each probe is the scan until it sees the
worker accepting or serving, then an HTTP try (a probe process that sends GET PATH
through the listening socket and counts only an answer from the worker's own tree). Scans
are retried on the scan backoff, tries on the slower http one; the worker's last answer
is kept, and a ready timeout says it.
"""

from __future__ import annotations

from collections.abc import Mapping

from handoff.core import actions as act
from handoff.core import events as ev
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
        self._tries: dict[Pid, int] = {}  # http: failed HTTP tries so far
        self._answers: dict[Pid, str] = {}  # http: the worker's own last answer
        self._last_try: dict[Pid, str] = {}  # http: what the last try saw

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
            case ReadyMode.EXEC | ReadyMode.AUTO | ReadyMode.HTTP:
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
            case ReadyMode.EXEC | ReadyMode.AUTO | ReadyMode.HTTP:
                self._tries.pop(worker.pid, None)
                self._answers.pop(worker.pid, None)
                self._last_try.pop(worker.pid, None)
                if self._probe_attempts.pop(worker.pid, None) is not None:
                    out.append(act.CancelTimer(key=TimerKey(TimerKind.PROBE_RETRY, worker.pid)))
                    out.append(act.CancelProbe(pid=worker.pid))
                if self._policy.ready.mode is ReadyMode.AUTO:
                    out.append(act.CancelTimer(key=TimerKey(TimerKind.NOTIFY_GRACE, worker.pid)))
            case ReadyMode.NOTIFY:
                pass

    def probe_finished(
        self, worker: Worker, result: ev.ProbeFinished, out: list[act.Action]
    ) -> bool:
        """Take a probe's result: True if it proved the worker ready, else retry after backoff.

        A result for a worker no longer starting, or no longer probed, is ignored (False).
        """
        pid, detail = worker.pid, result.detail
        if worker.state is not WorkerState.STARTING or pid not in self._probe_attempts:
            return False
        if result.ok:
            return True  # the caller's transition to READY calls forget()
        policy = self._policy
        if result.asked:  # an http: try
            if result.answer:
                self._answers[pid] = result.answer
            self._last_try[pid] = detail
            self._tries[pid] = tries = self._tries.get(pid, 0) + 1
            delay = backoff(tries, policy.http_base_s, policy.http_cap_s)
        else:
            attempts = self._probe_attempts[pid] + 1
            self._probe_attempts[pid] = attempts
            if policy.ready.mode in (ReadyMode.AUTO, ReadyMode.HTTP):
                delay = backoff(attempts, policy.scan_base_s, policy.scan_cap_s)
            else:
                delay = backoff(attempts, policy.probe_base_s, policy.probe_cap_s)
        out.append(act.StartTimer(key=TimerKey(TimerKind.PROBE_RETRY, pid), delay_s=delay))
        if detail:
            out.append(
                act.report(EventName.WORKER_PROBE_FAILED, Level.DEBUG, pid=pid, detail=detail)
            )
        return False

    def last_seen(self, worker: Worker) -> str:
        """http: '; last answer: HTTP 503 Service Unavailable' (or what the last try saw),
        to end the reason of a ready timeout with; '' in the other modes."""
        if self._policy.ready.mode is not ReadyMode.HTTP:
            return ""
        if answer := self._answers.get(worker.pid):
            return f"; last answer: {answer}"
        if last := self._last_try.get(worker.pid):
            return f"; no answer from it; last try: {last}"
        return "; never seen accepting or serving, so never asked"

    def notified(self, worker: Worker, out: list[act.Action]) -> bool:
        """READY=1 arrived: True if that alone makes the worker ready.

        Under ``auto`` it does not at once: gunicorn, for one, says READY=1 from its
        arbiter before it forks the workers that accept. So READY=1 triggers a scan now,
        and is taken on its own word only if /proc shows nobody accepting within the
        notify grace (a server that accepts in a way /proc cannot show).
        Under ``http:`` it counts for nothing: the worker must answer.
        """
        if self._policy.ready.mode is ReadyMode.HTTP:
            return False
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
