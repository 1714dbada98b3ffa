"""What the peers bench runs: the app, the gunicorn command, its pairs and scenarios."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

APPS: Final = Path(__file__).resolve().parents[2] / "tests" / "integration" / "apps"
GUNICORN: Final = str(Path(sys.executable).with_name("gunicorn"))
GUNICORN_WORKERS: Final = 2
BAD_RELOAD: Final = 3  # the reload that deploys the bad release
SLOW_IMPORT_S: Final = 3.0  # versioned_app.SLOW_IMPORT_S


@dataclass(frozen=True, slots=True)
class Pair:
    """One gunicorn configuration, reloaded both ways."""

    key: str
    title: str
    worker_args: tuple[str, ...]


SYNC: Final = Pair("sync", "gunicorn sync workers (--workers 2)", ())
GTHREAD: Final = Pair(
    "gthread",
    "gunicorn gthread workers with keep-alive (--workers 2 -k gthread --threads 4 --keep-alive 5)",
    ("-k", "gthread", "--threads", "4", "--keep-alive", "5"),
)
PAIRS: Final = (SYNC, GTHREAD)


@dataclass(frozen=True, slots=True)
class Scenario:
    """What each reload deploys."""

    key: str
    title: str
    bad_release: str | None  # VERSION_FILE content of reload BAD_RELOAD; None: all healthy
    pairs: tuple[Pair, ...]
    steady: bool = False  # no reload: the same load for as long as the others take

    def reloads(self, asked: int) -> int:
        return 0 if self.steady else asked

    def final_load_s(self, asked: int, seconds_between: float) -> float:
        """Load after the last reload: for steady, the whole run's length."""
        return seconds_between * (asked + 1 if self.steady else 1)

    def release(self, number: int) -> str:
        """VERSION_FILE content for reload number (0: the first generation)."""
        if self.bad_release is not None and number == BAD_RELOAD:
            return self.bad_release
        return f"v{number}"


SCENARIOS: Final = (
    Scenario("healthy", "every release healthy", None, PAIRS),
    Scenario(
        "broken",
        f"reload {BAD_RELOAD} deploys a release that raises at import, the next ones are healthy",
        "broken",
        (SYNC,),
    ),
    Scenario(
        "slow",
        f"reload {BAD_RELOAD} deploys a release whose import takes {SLOW_IMPORT_S:g} s",
        "slow",
        (SYNC,),
    ),
    Scenario(
        "steady",
        "no reload: the cost of the tool in the data path (against bare gunicorn)",
        None,
        PAIRS,
        steady=True,
    ),
)


def gunicorn_argv(bind: str, pair: Pair, *, preload: bool) -> tuple[str, ...]:
    return (
        GUNICORN,
        "--bind",
        bind,
        "--workers",
        str(GUNICORN_WORKERS),
        "--no-control-socket",
        *(("--preload",) if preload else ()),
        *pair.worker_args,
        "--chdir",
        str(APPS),
        "versioned_app:wsgi",
    )
