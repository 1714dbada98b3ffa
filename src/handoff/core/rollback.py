"""Rolling back to the previous generation, by hand or by itself, and the window in which
that generation is kept parked (--keep-previous, --verify, --rollback-after).

Pure. Functions of the ``Supervisor``, written out of its class (which stays small); they
are its own and change its state as its methods do. Generations change only through
``Generations``, workers only through ``WorkerLifecycle``.

A rollback takes one of three paths:

- **cancel**: a reload is in progress (a canary, a rollout, a generation starting): it is
  undone, and the serving generation goes on serving, whole (``rollout.undo``);
- **reattach**: the previous generation is parked (its workers detached, not signalled):
  their epoll registrations are put back (``ReattachListeners``) before the serving
  generation is taken off the socket and drained. Instant, warm, nothing refused.
- **restart**: nothing is parked (the window is over, ``--keep-previous 0``, or no parked
  worker is left): a new generation starts from the previous generation's release (its
  pinned directory and env files: ``Generation.release_of``), readiness-gated like a
  reload; the serving one goes on serving until it is ready, and keeps serving if it fails.

The window: after a reload that parked its predecessor, the new generation is watched
until the parked one's time is up. ``--rollback-after N`` crashes of its workers, or N
``--verify`` checks failed in a row, roll back by themselves (``reload.rolled_back``);
the window's end confirms the reload (``reload.confirmed``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, assert_never

from handoff.core import actions as act
from handoff.core import events as ev
from handoff.core import rollout
from handoff.core.model import Generation, GenerationState, GenId, MasterState, Pid, WorkerState
from handoff.core.timers import TimerKey, TimerKind
from handoff.formats.log_events import EventName, Level

if TYPE_CHECKING:
    from handoff.core.machine import Supervisor

AUTOMATIC = "automatic"  # the source of a rollback handoff decided itself
TIMERS = frozenset({TimerKind.KEEP_PREVIOUS, TimerKind.VERIFY})


@dataclass(slots=True)
class Window:
    """The serving generation under watch while the one it replaced is parked."""

    serving: GenId
    parked: GenId
    checks: int = 0  # --verify checks passed
    failures: int = 0  # --verify checks failed in a row
    crashes: int = 0  # its workers' crashes since it began serving
    checking: bool = False  # a --verify check runs (until it answers, or times out)


@dataclass(frozen=True, slots=True)
class Restarting:
    """A rollback on the restart path, until its generation serves or fails."""

    source: str
    started_at: float


def on_event(
    self: Supervisor,
    event: ev.RollbackRequested | ev.DetachFailed | ev.ReattachFailed | ev.VerifyFinished,
    now: float,
    out: list[act.Action],
) -> None:
    match event:
        case ev.RollbackRequested(source=source):
            request(self, source, f"rollback requested ({source})", now, out)
        case ev.DetachFailed(pid=pid, reason=reason):
            _not_parked(self, pid, reason, out)
        case ev.ReattachFailed(pid=pid, reason=reason):
            _not_reattached(self, pid, reason, out)
        case ev.VerifyFinished(gen=gen, ok=ok, detail=detail):
            _verified(self, gen, ok=ok, detail=detail, now=now, out=out)
        case _:
            assert_never(event)


def on_timer(self: Supervisor, key: TimerKey, now: float, out: list[act.Action]) -> None:
    window = self.window
    if key.kind is TimerKind.KEEP_PREVIOUS:
        _window_ended(self, key, out)
    elif window is None or window.serving != key.ident:
        return  # a VERIFY timer that outlived its window
    elif window.checking:  # the check overran: it counts as failed (the next one kills it)
        detail = f"the check gave no answer within {self.policy.verify_timeout_s:g} s"
        _verified(self, window.serving, ok=False, detail=detail, now=now, out=out)
    else:
        window.checking = True
        out.append(act.RunVerify(gen=window.serving))
        out.append(act.StartTimer(key=key, delay_s=self.policy.verify_timeout_s))


def refusal(self: Supervisor) -> str | None:
    """Why a rollback cannot be done now, or None."""
    if self.state in (MasterState.STOPPING, MasterState.LEAVING):
        return "the master is stopping"
    if self.state is MasterState.STARTING:
        return "the first generation is still starting: there is no previous one"
    if self.restarting is not None:
        return "a rollback is already in progress"
    if self.state is MasterState.RELOADING:
        return None  # the reload in progress is undone
    if _parked(self) is None and self._gens.previous_release is None:
        return (
            "nothing to roll back to: no reload has replaced a generation since the master "
            "started, or the last rollback went back to it already"
        )
    return None


def next_path(self: Supervisor) -> tuple[str, GenId | None]:
    """What a rollback would do now: its path and the generation that would serve (or
    start, for a restart: the one whose release it runs); ("", None) if it is refused."""
    serving = self.generation_in(GenerationState.ACTIVE)
    if refusal(self) is not None or serving is None:
        return "", None
    if self.state is MasterState.RELOADING:
        return "cancel", serving.id
    parked = _parked(self)
    if parked is not None:
        return "reattach", parked.id
    return "restart", self._gens.previous_release


def request(self: Supervisor, source: str, reason: str, now: float, out: list[act.Action]) -> None:
    """Roll back: cancel a reload in progress; else put the parked generation back
    (reattach) or start the previous release again (restart). An automatic rollback (the
    window's watch) cancels a reload in progress too, and goes on to the parked one."""
    why = refusal(self)
    if why is not None:
        out.append(act.report(EventName.ROLLBACK_REFUSED, Level.WARNING, source=source, reason=why))
        return
    gens = self._gens
    serving = self.generation_in(GenerationState.ACTIVE)
    assert serving is not None  # RUNNING or RELOADING
    starting = self.generation_in(GenerationState.STARTING)
    if self.state is MasterState.RELOADING and starting is not None:
        # A reload in progress (a canary, a rollout) is undone; the serving one stays,
        # unless the window's watch asked: then on to the parked generation.
        self._cancel_reload(now, out, reason="cancelled: rollback")
        gens.drain(starting, "rolled back", self._stop_signal_name(), out)
        rollout.undo(self, out)
        if source != AUTOMATIC or _parked(self) is None:
            out.append(_rolled_back(starting.id, serving.id, "cancel", source, reason))
            out.append(_finished("cancel", serving.id))
            return
    close_window(self, out)
    parked = _parked(self)
    if parked is not None:
        out.append(_rolled_back(serving.id, parked.id, "reattach", source, reason))
        gens.reinstate(parked, self.workers_target, out)  # back on the socket first
        gens.drain(serving, "rolled back", self._stop_signal_name(), out)
        gens.previous_release = None
        out.append(_finished("reattach", parked.id))
        return
    release = gens.previous_release
    assert release is not None  # refusal() said so
    out.append(_rolled_back(serving.id, gens.next_id, "restart", source, reason))
    self.state = MasterState.RELOADING
    self._reload_started_at = now
    self.restarting = Restarting(source=source, started_at=now)
    gens.start(self.workers_target, now, out, release_of=release)


def finished(
    self: Supervisor, gen: Generation, *, ok: bool, reason: str, now: float, out: list[act.Action]
) -> None:
    """A reload ended; if it was a rollback's restart, report how the rollback went."""
    restarting, self.restarting = self.restarting, None
    if restarting is None:
        return
    fields: dict[str, object] = {"ok": ok, "path": "restart", "gen": gen.id}
    fields["duration_s"] = round(now - restarting.started_at, 4)
    if not ok:
        fields["reason"] = reason
    level = Level.INFO if ok else Level.ERROR
    out.append(act.report(EventName.ROLLBACK_FINISHED, level, **fields))


def open_window(self: Supervisor, serving: Generation, out: list[act.Action]) -> None:
    """A reload parked its predecessor: watch the new generation until the window ends."""
    close_window(self, out, superseded_by=serving.id)
    parked = _parked(self)
    if parked is None:
        return
    self.window = Window(serving=serving.id, parked=parked.id)
    if self.policy.verify_interval_s > 0:
        key = TimerKey(TimerKind.VERIFY, serving.id)
        out.append(act.StartTimer(key=key, delay_s=self.policy.verify_interval_s))


def close_window(
    self: Supervisor, out: list[act.Action], *, superseded_by: GenId | None = None
) -> None:
    """The window ends without a rollback of its own (a later reload, a stop, a rollback)."""
    window, self.window = self.window, None
    if window is None:
        return
    out.append(act.CancelTimer(key=TimerKey(TimerKind.VERIFY, window.serving)))
    if superseded_by is not None:
        _confirmed(window, out, ended=f"superseded by generation {superseded_by}")


def _window_ended(self: Supervisor, key: TimerKey, out: list[act.Action]) -> None:
    """The parked generation's time is up: drain it; the reload that parked it stands."""
    parked = self.generation(GenId(key.ident))
    window = self.window
    if window is not None and window.parked == key.ident:
        self.window = None
        out.append(act.CancelTimer(key=TimerKey(TimerKind.VERIFY, window.serving)))
        _confirmed(window, out, ended="window")
    if parked is not None and parked.state is GenerationState.PARKED:
        keep = f"kept {self.policy.keep_previous_s:g} s (--keep-previous)"
        self._gens.drain(parked, keep, self._stop_signal_name(), out)


def crashed(
    self: Supervisor, gen: Generation, reason: str, now: float, out: list[act.Action]
) -> bool:
    """A serving worker died; True if that rolled back (--rollback-after crashes)."""
    window = self.window
    if window is None or window.serving != gen.id:
        return False
    window.crashes += 1
    limit = self.policy.rollback_after
    if window.crashes < limit:
        return False
    why = f"generation {gen.id}: {window.crashes} worker crashes in the window; last: {reason}"
    request(self, AUTOMATIC, why, now, out)
    return True


def _verified(
    self: Supervisor, gen: GenId, *, ok: bool, detail: str, now: float, out: list[act.Action]
) -> None:
    """A --verify check finished: count it; N failed in a row roll back."""
    window = self.window
    if window is None or window.serving != gen or not window.checking:
        return  # the window ended while the check ran, or it was counted as timed out
    window.checking = False
    limit = self.policy.rollback_after
    if ok:
        window.checks += 1
        window.failures = 0
    else:
        window.failures += 1
        out.append(
            act.report(
                EventName.VERIFY_FAILED,
                Level.WARNING,
                gen=gen,
                detail=detail,
                failures=window.failures,
                rollback_after=limit,
            )
        )
        if window.failures >= limit:
            why = f"--verify failed {window.failures} times in a row: {detail}"
            request(self, AUTOMATIC, why, now, out)
            return
    key = TimerKey(TimerKind.VERIFY, gen)
    out.append(act.StartTimer(key=key, delay_s=self.policy.verify_interval_s))


def _not_parked(self: Supervisor, pid: Pid, reason: str, out: list[act.Action]) -> None:
    """Detaching a parked worker failed: it would go on accepting with the old code."""
    worker = self._gens.workers.get(pid)
    if worker is None or worker.state is not WorkerState.PARKED:
        return
    out.append(
        act.report(
            EventName.WORKER_NOT_PARKED,
            Level.WARNING,
            gen=worker.gen,
            worker=worker.slot,
            pid=worker.pid,
            reason=reason,
        )
    )
    self._gens.workers.stop(worker, out)


def _not_reattached(self: Supervisor, pid: Pid, reason: str, out: list[act.Action]) -> None:
    """A worker put back could not be: it does not accept; replace it in its slot."""
    worker = self._gens.workers.get(pid)
    if worker is not None and worker.state is WorkerState.READY:
        self._gens.workers.stop(worker, out, respawn_reason=f"not put back: {reason}")


def _parked(self: Supervisor) -> Generation | None:
    """The parked generation, if a worker of it is still parked (one can be put back)."""
    parked = self.generation_in(GenerationState.PARKED)
    if parked is None:
        return None
    if any(w.state is WorkerState.PARKED for w in parked.workers.values()):
        return parked
    return None


def _rolled_back(gen: GenId, to: GenId, path: str, source: str, reason: str) -> act.Report:
    return act.report(
        EventName.RELOAD_ROLLED_BACK,
        Level.WARNING,
        gen=gen,
        to=to,
        path=path,
        source=source,
        reason=reason,
    )


def _finished(path: str, gen: GenId) -> act.Report:
    """A rollback done at once (the reattach and cancel paths)."""
    return act.report(EventName.ROLLBACK_FINISHED, ok=True, path=path, gen=gen, duration_s=0.0)


def _confirmed(window: Window, out: list[act.Action], *, ended: str) -> None:
    out.append(
        act.report(
            EventName.RELOAD_CONFIRMED,
            gen=window.serving,
            previous=window.parked,
            checks=window.checks,
            crashes=window.crashes,
            ended=ended,
        )
    )
