"""Answering control clients that wait: a reload's progress and result (through the
--keep-previous window with ``verify``), a canary's, a promote's, a rollback's and an
upgrade's. Built from the machine's reports and read-only state; the control server
(control_server.py) owns the sockets and hands each request that waits here.

docs/control.md is the contract for every line sent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Final, Protocol

from handoff.core import actions as act
from handoff.core.model import Generation, GenId
from handoff.core.policy import ReloadOutcome
from handoff.core.rollback import Window
from handoff.formats.control_protocol import encode, error_line
from handoff.formats.log_events import EventName
from handoff.master.control_clients import Client, Placement, Waiting
from handoff.master.health_server import HealthView
from handoff.master.reload_progress import PROGRESS_EVENTS, progress_message
from handoff.master.resume_state import ClientRecord

_INTERRUPTED: Final = "interrupted: the master re-executed itself; see 'handoff status'"
_ACCEPTED: Final = {
    EventName.RELOAD_REQUESTED: "started",
    EventName.RELOAD_QUEUED: "queued",
    EventName.RELOAD_REFUSED: "refused",
}

Send = Callable[[Client, bytes], None]


class MasterView(HealthView, Protocol):
    """What the control server reads of the machine's state (``Supervisor`` is one)."""

    @property
    def workers_target(self) -> int: ...

    @property
    def last_reload(self) -> ReloadOutcome | None: ...

    @property
    def window(self) -> Window | None: ...

    def generation(self, gen: GenId) -> Generation | None: ...

    def reloading(self) -> GenId | None: ...


class Answers:
    """Who waits for what, and the lines that answer them; see the module docstring.

    send writes a line to a client; finish writes its last line and closes it.
    """

    def __init__(self, view: Callable[[], MasterView], send: Send, finish: Send) -> None:
        self.waiting = Waiting()
        self._view = view
        self._send = send
        self._finish = finish

    # -- requests that wait ----------------------------------------------------------------

    def reload(self, client: Client, reports: Sequence[act.Report], *, wait: bool) -> None:
        """A reload was asked for (the client waits in ``waiting.next_reload`` if wait):
        answer a refusal or, without wait, whether it started."""
        refused = _first(reports, EventName.RELOAD_REFUSED)
        if refused is not None:
            self.waiting.forget(client)
            self._finish(client, error_line(f"reload refused: {refused.fields.get('reason')}"))
        elif not wait:
            accepted = next((_ACCEPTED[r.event] for r in reports if r.event in _ACCEPTED), "queued")
            self._finish(client, encode("result", ok=True, accepted=accepted))

    def rollback(
        self, client: Client, reports: Sequence[act.Report], *, wait: bool, switch_ms: float
    ) -> None:
        """A rollback was asked for: answer it, now or (a restart, waited for) once done.
        switch_ms: how long the master took to act on it (the whole switch, for reattach)."""
        refused = _first(reports, EventName.ROLLBACK_REFUSED)
        rolled = _first(reports, EventName.RELOAD_ROLLED_BACK)
        done = _first(reports, EventName.ROLLBACK_FINISHED)
        if refused is not None or rolled is None:
            why = "no rollback" if refused is None else refused.fields.get("reason")
            self._finish(client, error_line(f"rollback refused: {why}"))
        elif done is not None:
            self._finish(client, _rollback_line(done.fields, rolled.fields, switch_ms))
        elif not wait:
            fields = rolled.fields
            line = encode(
                "result", ok=True, accepted="started", path=fields["path"], gen=fields["to"]
            )
            self._finish(client, line)
        else:
            client.rolled_back = dict(rolled.fields)
            self.waiting.rollbacks.setdefault(GenId(int(str(rolled.fields["to"]))), []).append(
                client
            )

    def promote(self, client: Client, reports: Sequence[act.Report], *, wait: bool) -> None:
        """A promote was asked for: refused, or the canary's reload goes on (waited for)."""
        refused = _first(reports, EventName.PROMOTE_REFUSED)
        promoted = _first(reports, EventName.CANARY_PROMOTED)
        if refused is not None or promoted is None:
            why = "no canary" if refused is None else refused.fields.get("reason")
            self._finish(client, error_line(f"promote refused: {why}"))
        elif not wait:
            self._finish(client, encode("result", ok=True, accepted="promoted", **promoted.fields))
        else:
            self.waiting.reloads.setdefault(GenId(int(str(promoted.fields["gen"]))), []).append(
                client
            )

    def upgrade_finished(self, **fields: object) -> None:
        """Answer the clients waiting for the upgrade (fields: ok, and what else to say)."""
        clients, self.waiting.upgrades = self.waiting.upgrades, []
        for client in clients:
            self._finish(client, encode("result", **fields))

    # -- what the machine reports ----------------------------------------------------------

    def on_report(self, report: act.Report) -> None:
        """Route progress and results to the clients waiting for them."""
        view = self._view()
        gen = report.fields.get("gen")
        match report.event:
            case EventName.RELOAD_REQUESTED:
                started = view.reloading()
                if started is not None:
                    self.waiting.reload_started(started)
            case EventName.RELOAD_SUCCEEDED | EventName.RELOAD_FAILED:
                outcome = view.last_reload
                if outcome is not None:
                    for client in self.waiting.reloads.pop(outcome.gen, []):
                        self._reload_ended(client, outcome, report.fields, view.window)
            case EventName.CANARY_READY if isinstance(gen, int):
                for client in self.waiting.reloads.pop(GenId(gen), []):
                    self._finish(client, encode("result", ok=True, canary=True, **report.fields))
            case EventName.RELOAD_CONFIRMED | EventName.RELOAD_ROLLED_BACK if isinstance(gen, int):
                for client in self.waiting.verifying.pop(GenId(gen), []):
                    self._finish(client, _window_line(report))
            case EventName.ROLLBACK_FINISHED if isinstance(gen, int):
                for client in self.waiting.rollbacks.pop(GenId(gen), []):
                    self._finish(client, _rollback_line(report.fields, client.rolled_back))
            case EventName.MASTER_STOPPING | EventName.MASTER_LEAVING:
                self._stopping()
            case _:
                pass
        self._progress(report)

    def place(self, client: Client, record: ClientRecord) -> None:
        """A client a re-exec handed over: put it back where it waits, or answer it."""
        view = self._view()
        last = view.last_reload
        placed = self.waiting.place(
            client, record, running=view.reloading(), last=last, state=view.state
        )
        if placed is Placement.ANSWER_LAST and last is not None:
            self._finish(client, outcome_line(last))
        elif placed is Placement.INTERRUPTED:
            self._finish(client, encode("result", ok=False, reason=_INTERRUPTED))

    # -- helpers -------------------------------------------------------------------------

    def _reload_ended(
        self,
        client: Client,
        outcome: ReloadOutcome,
        fields: Mapping[str, object],
        window: Window | None,
    ) -> None:
        watched = window is not None and window.serving == outcome.gen
        if not (client.verify and outcome.ok and watched):
            self._finish(client, outcome_line(outcome, fields))
            return
        message = f"generation {outcome.gen} serving; the previous one is kept, watching it"
        line = encode(
            "progress", event=EventName.RELOAD_SUCCEEDED.value, gen=outcome.gen, message=message
        )
        self._send(client, line)
        self.waiting.verifying.setdefault(outcome.gen, []).append(client)

    def _stopping(self) -> None:
        cancelled = encode("result", ok=False, reason="cancelled: master stopping")
        waiting, self.waiting.next_reload = self.waiting.next_reload, []
        for clients in (waiting, *self.waiting.verifying.values()):
            for client in clients:
                self._finish(client, cancelled)
        self.waiting.verifying.clear()

    def _progress(self, report: act.Report) -> None:
        gen = report.fields.get("gen")
        if report.event not in PROGRESS_EVENTS or not isinstance(gen, int):
            return
        reloads = {**self.waiting.reloads}  # with the rollbacks' restarts, waited for alike
        for target, clients in self.waiting.rollbacks.items():
            reloads[target] = [*reloads.get(target, []), *clients]
        if not reloads:
            return
        message = progress_message(report, self._view().generation(GenId(gen)))
        if message is None:
            return
        line = encode("progress", event=report.event.value, gen=gen, message=message)
        if report.event is EventName.GENERATION_DRAINING:
            # The old generation's draining belongs to the reload in progress.
            targets = [client for clients in reloads.values() for client in clients]
        else:
            targets = list(reloads.get(GenId(gen), []))
        for client in targets:
            self._send(client, line)


def outcome_line(outcome: ReloadOutcome, reported: Mapping[str, object] | None = None) -> bytes:
    """reported: the fields of the reload's report; a failed one's worker, pid and output
    (the failing worker's last lines, bounded: formats/worker_lines.py) are passed on."""
    result: dict[str, object] = {"gen": outcome.gen, "duration_s": outcome.duration_s}
    if not outcome.ok:
        result["reason"] = outcome.reason
        for key in ("worker", "pid", "output"):
            if reported is not None and key in reported:
                result[key] = reported[key]
    return encode("result", ok=outcome.ok, **result)


def _rollback_line(
    done: Mapping[str, object], rolled: Mapping[str, object] | None, switch_ms: float | None = None
) -> bytes:
    """A rollback's result: ok, the path, the generation serving now, where it came from."""
    fields = {k: done[k] for k in ("path", "gen", "duration_s", "reason") if k in done}
    if rolled is not None:
        fields["from"] = rolled.get("gen")
    if switch_ms is not None:
        fields["switch_ms"] = switch_ms
    return encode("result", ok=bool(done.get("ok")), **fields)


def _window_line(report: act.Report) -> bytes:
    """reload --verify: the window ended (confirmed), or the reload was rolled back."""
    fields = report.fields
    if report.event is EventName.RELOAD_CONFIRMED:
        return encode("result", ok=True, confirmed=True, **fields)
    reason = f"rolled back ({fields.get('path')}): {fields.get('reason')}"
    return encode(
        "result",
        ok=False,
        rolled_back=True,
        gen=fields.get("gen"),
        to=fields.get("to"),
        reason=reason,
    )


def _first(reports: Sequence[act.Report], event: EventName) -> act.Report | None:
    return next((r for r in reports if r.event is event), None)
