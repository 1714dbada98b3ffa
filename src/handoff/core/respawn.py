"""Respawning the serving generation's lost workers: crash accounting and capped backoff.

Pure. Written like ``Readiness``: ``Generations`` owns one ``Respawns`` and keeps every
state change of workers and generations to itself; this helper keeps only its own
bookkeeping (crashes in a row per slot, which slots wait for a respawn timer) and returns
the timers and reports to act on. A slot whose worker was ready for ``stable_after_s``
before it died starts a fresh backoff; one that dies sooner counts one more crash in a row,
and ``crash_loop_after`` crashes in a row are reported as a crash loop (still respawned,
at the capped delay).
"""

from __future__ import annotations

from handoff.core import actions as act
from handoff.core.model import GenId
from handoff.core.policy import Policy, backoff
from handoff.core.timers import TimerKey, TimerKind
from handoff.formats.log_events import EventName, Level


def respawn_key(gen: GenId, slot: int) -> TimerKey:
    return TimerKey(TimerKind.RESPAWN, gen, slot)


class Respawns:
    """The slots waiting to be respawned, and how often each crashed in a row."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._crashes: dict[tuple[GenId, int], int] = {}
        self._pending: dict[GenId, set[int]] = {}

    def schedule(
        self,
        gen: GenId,
        slot: int,
        *,
        ready_for_s: float | None,
        reason: str,
        out: list[act.Action],
    ) -> None:
        """A worker of the serving generation was lost: respawn its slot after a backoff.

        ready_for_s is how long the lost worker had been ready (None: it never was).
        """
        policy = self._policy
        stable = ready_for_s is not None and ready_for_s >= policy.stable_after_s
        crashes = 1 if stable else self._crashes.get((gen, slot), 0) + 1
        self._crashes[(gen, slot)] = crashes
        delay = backoff(crashes, policy.respawn_base_s, policy.respawn_cap_s)
        self._pending.setdefault(gen, set()).add(slot)
        out.append(act.StartTimer(key=respawn_key(gen, slot), delay_s=delay))
        crash_loop = crashes >= policy.crash_loop_after
        out.append(
            act.report(
                EventName.WORKER_CRASH_LOOP if crash_loop else EventName.WORKER_RESPAWN_SCHEDULED,
                Level.ERROR if crash_loop else Level.WARNING,
                gen=gen,
                worker=slot,
                reason=reason,
                crashes=crashes,
                delay_s=delay,
            )
        )

    def restore(self, gen: GenId, slot: int, delay_s: float, out: list[act.Action]) -> None:
        """After a re-exec: the slot still waits for its respawn, due in delay_s."""
        self._pending.setdefault(gen, set()).add(slot)
        out.append(act.StartTimer(key=respawn_key(gen, slot), delay_s=delay_s))

    def take(self, key: TimerKey) -> bool:
        """The slot's respawn timer fired: True if the slot was still waiting for it."""
        waiting = self._pending.get(GenId(key.ident), set())
        if key.slot not in waiting:
            return False
        waiting.discard(key.slot)
        return True

    def cancel(self, gen: GenId, out: list[act.Action], *, from_slot: int = 0) -> None:
        """Respawn none of the generation's slots from from_slot on (draining, or scaled down)."""
        waiting = self._pending.get(gen, set())
        for slot in sorted(s for s in waiting if s >= from_slot):
            waiting.discard(slot)
            out.append(act.CancelTimer(key=respawn_key(gen, slot)))

    def crashes(self, gen: GenId, slot: int) -> int:
        """How many times in a row the slot's worker died before it was stable."""
        return self._crashes.get((gen, slot), 0)

    def waiting(self, gen: GenId, slot: int) -> bool:
        """Does this slot wait for its respawn timer?"""
        return slot in self._pending.get(gen, set())

    def pending(self, gen: GenId) -> bool:
        """Does a slot of the generation still wait for its respawn timer?"""
        return bool(self._pending.get(gen))

    def forget(self, gen: GenId) -> None:
        """The generation is gone: drop its bookkeeping."""
        self._pending.pop(gen, None)
        for key in [k for k in self._crashes if k[0] == gen]:
            del self._crashes[key]
