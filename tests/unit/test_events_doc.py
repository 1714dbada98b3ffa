"""docs/events.md catalogues every log event the master can emit, and nothing else.

The names are one enumeration, ``EventName``; every member must be used by the master's
code (a name nothing emits is a stale promise), and nothing may spell a name out as a
string literal instead of using the member.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from handoff.formats.log_events import EventName

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ROOT / "src" / "handoff"
# The master process's packages; the demo and its tools read events, they do not emit them.
MASTER_PACKAGES = ("core", "system", "master", "cli")


def documented_events() -> set[str]:
    text = (ROOT / "docs" / "events.md").read_text()
    return set(re.findall(r"^### `([a-z_]+\.[a-z_]+)`", text, flags=re.MULTILINE))


def master_sources() -> list[Path]:
    return [
        path for package in MASTER_PACKAGES for path in sorted((SOURCES / package).glob("*.py"))
    ]


def used_members() -> set[str]:
    """Every EventName.MEMBER the master's modules mention."""
    used: set[str] = set()
    for path in master_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            match node:
                case ast.Attribute(value=ast.Name(id="EventName"), attr=member):
                    used.add(member)
    return used


def test_every_event_name_is_documented() -> None:
    assert {name.value for name in EventName} - documented_events() == set()


def test_every_documented_event_is_a_name() -> None:
    assert documented_events() - {name.value for name in EventName} == set()


def test_every_event_name_is_emitted_by_the_master() -> None:
    assert len(EventName) > 20
    assert {name.name for name in EventName} - used_members() == set()


def test_no_event_name_is_spelled_out_as_a_string() -> None:
    names = {name.value for name in EventName}
    spelled: list[str] = []
    for path in [*master_sources(), *sorted((SOURCES / "formats").glob("*.py"))]:
        if path.name == "log_events.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                spelled.append(f"{path.name}:{node.lineno} {node.value}")

    assert spelled == []
