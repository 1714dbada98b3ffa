"""``/proc/net/netstat``: the kernel's TCP extension counters, as a name -> value map.

Pure. The file is pairs of lines, a header of names then their values, each line starting
with its group (``TcpExt:``); ``ListenOverflows`` and ``ListenDrops`` are what /metrics
reports (connections dropped because an accept queue was full, or for any reason).
"""

from __future__ import annotations

from typing import Final

MAX_TEXT: Final = 64 * 1024


def parse_netstat(text: str) -> dict[str, int]:
    """Every ``Group:`` counter, keyed ``Group.Name`` (``TcpExt.ListenDrops``)."""
    counters: dict[str, int] = {}
    lines = text[:MAX_TEXT].splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        group, _, name_text = names.partition(":")
        value_group, _, value_text = values.partition(":")
        if group != value_group:
            continue
        for name, value in zip(name_text.split(), value_text.split(), strict=False):
            if value.isdigit():
                counters[f"{group}.{name}"] = int(value)
    return counters
