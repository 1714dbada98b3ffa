"""How ``handoff status`` and a failed reload look on a terminal: the status as a table,
a failing worker's last output lines.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def last_output(result: Mapping[str, object]) -> list[str]:
    """The failing worker's last lines in a reload's result (``output``), indented under a
    heading that names it; none if the master did not read them (direct output)."""
    output = result.get("output")
    if not isinstance(output, list) or not output:
        return []
    who = f"worker {result.get('worker')} (pid {result.get('pid')})" if "pid" in result else ""
    heading = f"  last output of {who or 'the worker'}, generation {result.get('gen')}:"
    return [heading, *(f"  | {text}" for text in output)]


def render_status(report: Mapping[str, Any]) -> str:
    """The status as a readable table."""
    master = report["master"]
    sockets = ", ".join(s["address"] for s in master["sockets"])
    lines = [
        f"master   pid {master['pid']}  {master['name']}  {master['state']}  "
        f"up {master['uptime_s']:.0f} s  ready={master['ready']}  workers={master['workers']}",
        f"sockets  {sockets}",
        f"control  {master['control']}",
    ]
    last = report.get("last_reload")
    if last:
        outcome = "ok" if last["ok"] else f"failed: {last['reason']}"
        lines.append(f"reload   generation {last['gen']} {outcome} ({last['duration_s']} s)")
        lines.extend(last_output(last))
    lines.extend(_rollback_lines(report.get("rollback"), report["generations"]))
    rescue = report.get("rescue")
    if rescue and rescue["enabled"]:
        released = ", ".join(f"{why} {n}" for why, n in rescue["released"].items()) or "none"
        lines.append(
            f"rescue   {rescue['handed']} requests handed on, {rescue['copied']} connections "
            f"copied; released: {released}; master CPU {rescue['cpu_s']} s"
        )
    lines.append("")
    lines.append(
        f"{'gen':>4} {'state':<9} {'worker':>6} {'pid':>8} {'state':<9} {'age s':>8} "
        f"{'cpu s':>7} {'rss MiB':>8} {'conns':>6} {'procs':>5}"
    )
    for gen in report["generations"]:
        for worker in gen["workers"] or [None]:
            if worker is None:
                lines.append(f"{gen['gen']:>4} {_gen_state(gen):<9} {'-':>6}")
                continue
            lines.append(
                f"{gen['gen']:>4} {_gen_state(gen):<9} {worker['worker']:>6} {worker['pid']:>8} "
                f"{worker['state']:<9} {worker['age_s']:>8.1f} {worker['cpu_s']:>7.2f} "
                f"{worker['rss_bytes'] / 1048576:>8.1f} {worker['connections']:>6} "
                f"{worker['processes']:>5}"
            )
    return "\n".join(lines)


def _gen_state(gen: Mapping[str, Any]) -> str:
    return "canary" if gen.get("canary") else str(gen["state"])


def _rollback_lines(plan: Mapping[str, Any] | None, generations: list[Any]) -> list[str]:
    """What a rollback would do now, and the --keep-previous window under way."""
    if not plan or not plan.get("path"):
        return []
    path, to = plan["path"], plan.get("to")
    what = {
        "reattach": f"generation {to}'s parked workers back on the socket",
        "restart": f"generation {to}'s release started again",
        "cancel": f"the reload in progress undone; generation {to} serves on",
    }.get(path, path)
    parked = next((g for g in generations if g.get("parked_for_s") is not None), None)
    left = f" ({parked['parked_for_s']:.0f} s left)" if parked else ""
    lines = [f"rollback {path}: {what}{left}"]
    window = plan.get("window")
    if window:
        lines.append(
            f"window   generation {window['serving']} watched: {window['checks']} checks "
            f"passed, {window['failures']} failed in a row, {window['crashes']} crashes"
        )
    return lines
