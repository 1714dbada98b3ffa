"""Soak: a thousand reloads under load, then what the master holds.

    python -m bench.soak [--reloads N] [--workers W] [--seconds-between S]
                         [--json OUT] [--picture PNG] [-v]

A real `handoff run` master with W workers of the built-in demo app (asyncio, READY=1)
under keep-alive and fresh-connection load (handoff.demo.drill), reloaded N times,
--seconds-between apart. The master is looked at from outside right after its first
generation serves and again after the last reload has settled: its open fds
(/proc/PID/fd), RSS, threads (/proc/PID/task) and zombie children. Every reload's duration
as the master reported it (`reload.succeeded` `duration_s`) goes into the distribution
and, with matplotlib (the `bench` extra), a histogram (--picture). Zero failed requests
and every reload succeeded are expected: the exit status is 0 only then, and only if
nothing grew: no zombie, no thread more, no more fds than a generation still draining
holds (4 per worker).

Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

from handoff.demo.drill import DrillConfig, run_drill


def holdings(pid: int) -> dict[str, int]:
    """What a process holds now: fds, RSS, threads, zombie children."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    rss_kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    zombies = 0
    for child in children:
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        zombies += state == "Z"
    return {
        "fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),
        "rss_kib": rss_kib,
        "threads": len(list(Path(f"/proc/{pid}/task").iterdir())),
        "children": len(children),
        "zombies": zombies,
    }


def histogram(durations: list[float], path: Path, title: str) -> bool:
    try:
        import matplotlib  # noqa: PLC0415 - optional: the bench extra

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("soak: no picture: pip install -e '.[bench]' (matplotlib)", file=sys.stderr)
        return False
    figure, axis = plt.subplots(figsize=(8, 3.2))
    axis.hist([d * 1000 for d in durations], bins=60, color="tab:blue")
    axis.set_xlabel("reload duration, ms (new generation started -> serving)")
    axis.set_ylabel("reloads")
    median = statistics.median(durations) * 1000
    axis.axvline(median, color="black", linestyle=":", linewidth=1)
    axis.set_title(f"{title}: median {median:.0f} ms", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


async def soak(args: argparse.Namespace) -> dict[str, object]:
    seen: dict[str, dict[str, int]] = {}
    master: list[int] = []

    def at_start(pid: int) -> None:
        master.append(pid)
        seen["after_start"] = holdings(pid)

    def at_end() -> None:
        seen["after_reloads"] = holdings(master[0])

    say = (lambda line: print(f"  {line}", file=sys.stderr)) if args.verbose else None
    config = DrillConfig(
        command=(sys.executable, "-m", "handoff.demo.app"),
        workers=args.workers,
        reloads=args.reloads,
        settle_s=args.seconds_between,
        keepalive_clients=4,
        fresh_clients=2,
        after_reloads=at_end,
    )
    result = await run_drill(config, say, on_ready=at_start)
    durations = [r.duration_s for r in result.reloads if r.ok and r.duration_s is not None]
    ordered = sorted(durations)
    return {
        "command": sys.argv,
        "reloads": args.reloads,
        "reloads_ok": sum(r.ok for r in result.reloads),
        "workers": args.workers,
        "seconds_between": args.seconds_between,
        "requests_ok": result.load.ok,
        "requests_failed": result.load.total_failures(),
        "failures_by_class": {str(k): v for k, v in result.load.failures.items() if v},
        "master_exit_code": result.master_exit_code,
        "master": seen,
        "reload_s": {
            "median": round(statistics.median(ordered), 4),
            "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 4),
            "p99": round(ordered[int(0.99 * (len(ordered) - 1))], 4),
            "max": round(ordered[-1], 4),
            "min": round(ordered[0], 4),
        }
        if ordered
        else {},
        "durations_s": durations,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--reloads", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds-between", type=float, default=0.2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--picture", type=Path, default=None)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    document = asyncio.run(soak(args))
    durations = document.pop("durations_s")
    assert isinstance(durations, list)
    summary = {k: v for k, v in document.items() if k != "command"}
    print(json.dumps(summary, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps({**document, "durations_s": durations}) + "\n")
    if args.picture is not None:
        title = f"{document['reloads_ok']} reloads of {args.workers} workers under load"
        histogram(durations, args.picture, title)
    master = document["master"]
    assert isinstance(master, dict)
    start, end = master.get("after_start", {}), master.get("after_reloads", {})
    # The last old generation may still be draining: its pidfds and pipes (a few per worker).
    grew = (
        end.get("fds", 0) > start.get("fds", 0) + 4 * args.workers
        or end.get("threads", 0) > start.get("threads", 0)
        or end.get("zombies", 0) > 0
    )
    clean = document["requests_failed"] == 0 and document["reloads_ok"] == args.reloads
    return 0 if clean and not grew else 1


if __name__ == "__main__":
    sys.exit(main())
