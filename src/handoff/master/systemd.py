"""What the master tells systemd, derived from its own reports and state.

Layer 0 (pure). READY=1 once the first generation serves; RELOADING=1 with
MONOTONIC_USEC when a reload starts and READY=1 when it ends (succeeded or failed: the
reload cycle always closes); STOPPING=1; and STATUS= always saying what serves and how
the last reload ended.
"""

from __future__ import annotations

from handoff.core.machine import Supervisor
from handoff.core.model import GenerationState
from handoff.formats.log_events import EventName


def status_text(machine: Supervisor) -> str:
    active = machine.generation_in(GenerationState.ACTIVE)
    if active is None:
        serving = "no generation serving"
    else:
        serving = (
            f"generation {active.id} serving, {active.ready_count()} of {active.size} workers ready"
        )
    last = machine.last_reload
    if last is None:
        return serving
    if last.ok:
        return f"{serving}; last reload: generation {last.gen} ok in {last.duration_s:g} s"
    return f"{serving}; last reload failed: {last.reason}"


def messages_for(event: str, monotonic_usec: int) -> dict[str, str] | None:
    """The state change to announce for a report, or None (STATUS is added by the caller)."""
    match event:
        case EventName.MASTER_READY | EventName.RELOAD_SUCCEEDED | EventName.RELOAD_FAILED:
            return {"READY": "1"}
        case EventName.RELOAD_REQUESTED:
            return {"RELOADING": "1", "MONOTONIC_USEC": str(monotonic_usec)}
        case EventName.MASTER_STOPPING:
            return {"STOPPING": "1"}
        case (
            EventName.GENERATION_ACTIVE
            | EventName.GENERATION_GONE
            | EventName.WORKER_EXITED
            | EventName.WORKER_READY
            | EventName.MASTER_SCALED
        ):
            return {}
        case _:
            return None
