"""A reload's progress in words, for the clients of ``handoff reload --wait``.

Pure. Built from one report of the machine and the state of the generation it is about
(how many of its workers are ready now, how many it has), never from counting reports.
"""

from __future__ import annotations

from typing import Final

from handoff.core.actions import Report
from handoff.core.model import Generation
from handoff.formats.log_events import EventName

PROGRESS_EVENTS: Final = frozenset(
    {
        EventName.GENERATION_STARTED,
        EventName.WORKER_READY,
        EventName.WORKER_EXITED,
        EventName.WORKER_SPAWN_FAILED,
        EventName.WORKER_NOT_READY,
        EventName.GENERATION_ACTIVE,
        EventName.GENERATION_DRAINING,
        EventName.GENERATION_FAILED,
    }
)


def progress_message(report: Report, gen: Generation | None) -> str | None:
    """The line a waiting client is shown for this report, or None."""
    fields = report.fields
    number = fields.get("gen")
    match report.event:
        case EventName.GENERATION_STARTED:
            return f"generation {number} started: {fields.get('workers')} workers"
        case EventName.WORKER_READY:
            via = fields.get("via")
            how = f"{via}: {fields['detail']}" if fields.get("detail") else via
            ready = gen.ready_count() if gen is not None else "?"
            size = gen.size if gen is not None else "?"
            return f"generation {number}: {ready} of {size} workers ready ({how})"
        case EventName.WORKER_SPAWN_FAILED:
            why = fields.get("reason")
            return f"generation {number}: worker {fields.get('worker')} not started: {why}"
        case EventName.WORKER_EXITED:
            return f"generation {number}: worker {fields.get('worker')} {fields.get('status')}"
        case EventName.WORKER_NOT_READY:  # the reason names the worker already
            return f"generation {number}: {fields.get('reason')}"
        case EventName.GENERATION_ACTIVE:
            return f"generation {number} serving ({fields.get('duration_s')} s after it started)"
        case EventName.GENERATION_DRAINING:
            return f"generation {number} draining ({fields.get('signal')})"
        case EventName.GENERATION_FAILED:
            return f"generation {number} failed: {fields.get('reason')}"
        case _:
            return None
