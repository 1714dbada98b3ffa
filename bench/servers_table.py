"""Render the server matrix (.matrix/results.jsonl) as the markdown table of docs/servers.md.

    python bench/servers_table.py [--results FILE ...] [--write docs/servers.md]

The server tests (tests/integration/test_servers_*.py) append one JSON line per run
through tests/integration/matrix.py. The newest line for each (server, variant) is one
row. Without --write the table is printed; with --write it replaces what is between the
`<!-- matrix -->` and `<!-- /matrix -->` markers in that file. Several --results files
(e.g. from several checkouts or CI jobs) are merged; the newest line wins.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO / ".matrix" / "results.jsonl"
BEGIN = "<!-- matrix -->"
END = "<!-- /matrix -->"
RESCUE_BEGIN = "<!-- rescue-matrix -->"
RESCUE_END = "<!-- /rescue-matrix -->"
COLUMNS = (
    "server",
    "variant",
    "readiness path",
    "detach path",
    "reloads",
    "requests",
    "refused",
    "failed fresh / reload",
    "failed keep-alive / reload (by class)",
    "notes",
)


def load(paths: Iterable[Path], suite: str = "") -> list[dict[str, Any]]:
    """The newest entry per (server, variant, rescue) of one suite ("": the server tests;
    "rescue": tests/integration/test_rescue.py), sorted by server then variant."""
    newest: dict[tuple[str, str, bool], dict[str, Any]] = {}
    for path in paths:
        if not path.exists():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise SystemExit(f"{path}:{number}: not JSON: {exc}") from None
            if row.get("suite", "") != suite:
                continue
            key = (row["server"], row["variant"], bool(row.get("rescue")))
            if key not in newest or row.get("recorded_at", "") >= newest[key].get(
                "recorded_at", ""
            ):
                newest[key] = row
    return [newest[key] for key in sorted(newest)]


def _number(value: float) -> str:
    return f"{value:g}" if value == int(value) else f"{value:.2f}".rstrip("0")


def _per_reload(total: float, by_class: Mapping[str, float]) -> str:
    if not total:
        return "0"
    classes = ", ".join(
        f"{name} {_number(value)}" for name, value in sorted(by_class.items()) if value
    )
    return f"{_number(total)} ({classes})"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def readiness(row: Mapping[str, Any]) -> str:
    via = row.get("ready_via") or "?"
    # The port each test bound is noise in a table: 127.0.0.1:46775 -> 127.0.0.1:PORT.
    detail = re.sub(r"(\d|\]):\d+\b", r"\1:PORT", row.get("ready_detail") or "")
    return f"{via}: {detail}" if detail else via


def render(rows: Iterable[Mapping[str, Any]]) -> str:
    """The markdown table (header, separator and one line per row)."""
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in rows:
        cells = [
            row["server"],
            row["variant"],
            readiness(row),
            row.get("detach_path") or "?",
            row["reloads"],
            f"{row['requests']:,}",
            row["refused"],
            _per_reload(row["failed_fresh_per_reload"], row["failed_fresh_per_reload_by_class"]),
            _per_reload(
                row["failed_keepalive_per_reload"],
                row["failed_keepalive_per_reload_by_class"],
            ),
            row.get("notes", ""),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


RESCUE_COLUMNS = (
    "server",
    "variant",
    "reloads",
    "keep-alive clients",
    "failed keep-alive / reload, without rescue (by class)",
    "with --rescue-keepalive",
    "requests handed on / reload",
    "released (reason: count, all reloads)",
)


def render_rescue(rows: Iterable[Mapping[str, Any]]) -> str:
    """The keep-alive rescue table: each server's run without and with rescue, one line."""
    pairs: dict[tuple[str, str], dict[bool, Mapping[str, Any]]] = {}
    for row in rows:
        pairs.setdefault((row["server"], row["variant"]), {})[bool(row["rescue"])] = row
    lines = [
        "| " + " | ".join(RESCUE_COLUMNS) + " |",
        "|" + "|".join("---" for _ in RESCUE_COLUMNS) + "|",
    ]
    for (server, variant), pair in sorted(pairs.items()):
        with_, without = pair.get(True), pair.get(False)
        shown = with_ or without
        assert shown is not None
        reloads = int(shown["reloads"])
        released = (with_ or {}).get("rescue_released") or {}
        cells = [
            server,
            variant,
            reloads,
            shown.get("keepalive_clients", "?"),
            _failed_keepalive(without) if without else "not run (see the table above)",
            _failed_keepalive(with_) if with_ else "-",
            _number(with_["rescue_handed"] / reloads) if with_ else "-",
            ", ".join(f"{why}: {n}" for why, n in released.items()) or "none",
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _failed_keepalive(row: Mapping[str, Any]) -> str:
    return _per_reload(
        row["failed_keepalive_per_reload"], row["failed_keepalive_per_reload_by_class"]
    )


def replace_section(document: str, table: str, begin: str = BEGIN, end: str = END) -> str:
    """Document with the text between the markers replaced by table."""
    start = document.find(begin)
    stop = document.find(end)
    if start < 0 or stop < start:
        raise SystemExit(f"no '{begin}' ... '{end}' section to replace")
    return document[: start + len(begin)] + "\n" + table + document[stop:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--results",
        type=Path,
        action="append",
        help=f"a results file (repeatable; default {DEFAULT_RESULTS.relative_to(REPO)})",
    )
    parser.add_argument("--write", type=Path, help="replace the matrix section of this file")
    args = parser.parse_args(argv)
    results = args.results or [DEFAULT_RESULTS]
    sections = [(render(rows), BEGIN, END) for rows in [load(results)] if rows] + [
        (render_rescue(rows), RESCUE_BEGIN, RESCUE_END)
        for rows in [load(results, "rescue")]
        if rows
    ]
    if not sections:
        print("no results: run the server tests first", file=sys.stderr)
        return 1
    if args.write:
        document = args.write.read_text()
        for table, begin, end in sections:
            document = replace_section(document, table, begin, end)
        args.write.write_text(document)
    else:
        sys.stdout.write("\n".join(table for table, _, _ in sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
