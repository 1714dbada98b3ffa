"""docs/events.md catalogues every log event the master can emit, and nothing else."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ROOT / "src" / "handoff"
# Modules of the master process; the demo and load tools print their own output.
MASTER_MODULES = ("machine", "readiness", "loop", "master", "cli", "control")
# An event name is a string literal "noun.past_verb" whose noun is one of these.
EVENT_NAME = re.compile(
    r"^(master|listener|generation|worker|reload|readiness|scale|control|signal|notify|stray|warden)\.[a-z_]+$"
)


def emitted_events() -> set[str]:
    """Every event-shaped string literal in the master's modules (names chosen by a
    conditional expression count too)."""
    events: set[str] = set()
    for module in MASTER_MODULES:
        tree = ast.parse((SOURCES / f"{module}.py").read_text())
        for node in ast.walk(tree):
            is_text = isinstance(node, ast.Constant) and isinstance(node.value, str)
            if is_text and EVENT_NAME.match(node.value):
                events.add(node.value)
    return events


def documented_events() -> set[str]:
    text = (ROOT / "docs" / "events.md").read_text()
    return set(re.findall(r"^### `([a-z_]+\.[a-z_]+)`", text, flags=re.MULTILINE))


def test_every_emitted_event_is_documented() -> None:
    emitted = emitted_events()
    assert len(emitted) > 20, "the extractor found too few events: has the emit style changed?"
    assert emitted - documented_events() == set()


def test_every_documented_event_is_emitted() -> None:
    assert documented_events() - emitted_events() == set()
