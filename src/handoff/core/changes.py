"""What a change of a generation means for the master: ``Generations`` returns one of these
from a worker event, and the ``Supervisor`` acts on it (generations.py).

Pure.
"""

from __future__ import annotations

from dataclasses import dataclass

from handoff.core.model import Generation


@dataclass(frozen=True, slots=True)
class Complete:
    """Every worker of this starting generation is ready: it may serve."""

    gen: Generation


@dataclass(frozen=True, slots=True)
class CanaryReady:
    """Every worker of this canary is ready: it serves beside the active generation."""

    gen: Generation


@dataclass(frozen=True, slots=True)
class Failing:
    """This starting generation lost a worker before it served: it fails."""

    gen: Generation
    reason: str


@dataclass(frozen=True, slots=True)
class Crashed:
    """A worker of this serving generation died (it is respawned)."""

    gen: Generation
    reason: str


@dataclass(frozen=True, slots=True)
class GivingUp:
    """Every worker of this serving generation keeps crashing (--give-up-after)."""

    gen: Generation
    reason: str


Change = Complete | CanaryReady | Failing | Crashed | GivingUp | None
