"""The control tests' fixtures: a test module takes them as a pytest plugin, with

    pytest_plugins = ("tests.integration.control_fixtures",)

and never imports this module by name: pytest must import it first to rewrite its
asserts, and a module need not import a fixture it only names as a parameter.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator

import pytest

from tests.integration.control_harness import Clients


@pytest.fixture
def clients() -> Iterator[Clients]:
    """Client processes a test starts; any still running at teardown is killed."""
    started: Clients = []
    yield started
    for client in started:
        if client.poll() is None:
            client.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            client.communicate(timeout=10)
