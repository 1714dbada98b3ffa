"""Two handoff instances behind a real HAProxy that health-checks their /readyz.

A on 127.0.0.2, B on 127.0.0.3, each with its health endpoint (`--health`) on its own
port; HAProxy checks `GET /readyz` every 500 ms (fall 2, rise 2, check timeout 2 s) with
the configuration docs/fleet.md gives. Under continuous GET and POST load through
HAProxy: reload A, then B; then the maintenance cycle for each: SIGTERM, wait until the
master exits, start it again, wait until HAProxy has it up. With `--shutdown-delay 2` no
request may fail in any step, whether HAProxy retries failed connections or not; without
the delay the failures are measured, with HAProxy's retries and without (printed with
-s, figures in docs/fleet.md).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from tests.integration.balancers import BalancerLoad, Haproxy, free_port, haproxy, needs_haproxy
from tests.integration.harness import Master

PER_STEP = 200
pytestmark = needs_haproxy


class Instance:
    """One handoff master on its own loopback address, restartable on the same ports."""

    def __init__(self, directory: Path, host: str, delay: float | None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.host, self.delay = directory, host, delay
        self.port, self.health = free_port(host), free_port(host)
        self.version = directory / "version"
        self.version.write_text("v0")
        self.master: Master | None = None

    def start(self) -> Master:
        args = ["--workers", "2", "--drain-timeout", "30", "--ready", "auto"]
        args += ["--health", f"{self.host}:{self.health}"]
        args += ["--control", str(self.directory / "control.sock")]
        if self.delay is not None:
            args += ["--shutdown-delay", str(self.delay)]
        command = [sys.executable, "-m", "handoff.demo.app", "--version-file", str(self.version)]
        self.master = Master(command, args=args, binds=(f"{self.host}:{self.port}",))
        self.master.wait_ready()
        return self.master

    def reload(self, number: int) -> None:
        assert self.master is not None
        self.version.write_text(f"v{number}")
        outcome = self.master.reload()
        assert outcome["event"] == "reload.succeeded", outcome
        old = outcome["gen"] - 1
        self.master.wait_for("generation.gone", where=lambda e: e["gen"] == old)

    def stop(self) -> None:
        """Wait until the master, already sent SIGTERM, has exited 0."""
        assert self.master is not None
        assert self.master.wait_exit(60) == 0
        self.master.kill()

    def kill(self) -> None:
        if self.master is not None:
            self.master.kill()


def maintenance_cycle(
    tmp_path: Path, delay: float | None, *, retries: bool = True
) -> list[tuple[str, int]]:
    """Reload A, B; stop and restart A, then B. Failed requests so far, after each step."""
    a = Instance(tmp_path / "a", "127.0.0.2", delay)
    b = Instance(tmp_path / "b", "127.0.0.3", delay)
    steps: list[tuple[str, int]] = []
    try:
        a.start()
        b.start()
        servers = {"a": (a.host, a.port, a.health), "b": (b.host, b.port, b.health)}
        with haproxy(tmp_path / "haproxy", servers, retries=retries) as balancer:
            balancer.wait_state("a", "UP")
            balancer.wait_state("b", "UP")
            with BalancerLoad("127.0.0.1", balancer.port) as load:
                load.wait_for_requests(PER_STEP)
                for number, instance in enumerate((a, b), start=1):
                    instance.reload(number)
                    load.wait_for_requests(PER_STEP)
                    steps.append((f"reload {instance.host}", load.failed()))
                for name, instance in (("a", a), ("b", b)):
                    restart(balancer, name, instance, load)
                    steps.append((f"stop+start {instance.host}", load.failed()))
            shown = f"shutdown delay {delay}, HAProxy retries {retries}"
            print(f"HAProxy maintenance, {shown}: {steps}; {load.summary()}")
    finally:
        a.kill()
        b.kill()
    return steps


def restart(balancer: Haproxy, name: str, instance: Instance, load: BalancerLoad) -> None:
    """SIGTERM, exit, start again, UP in HAProxy, then PER_STEP more answers."""
    assert instance.master is not None
    instance.master.signal(signal.SIGTERM)
    balancer.wait_state(name, "DOWN")
    if instance.delay is not None:
        # /readyz said 503 at once: HAProxy took the instance out while it still served.
        assert instance.master.process.poll() is None, "the master left before HAProxy saw it"
    instance.stop()
    instance.start()
    balancer.wait_state(name, "UP")
    load.wait_for_requests(PER_STEP)


@pytest.mark.timeout(180)
def test_maintenance_with_shutdown_delay_fails_no_request(tmp_path: Path) -> None:
    steps = maintenance_cycle(tmp_path, 2.0)
    assert steps[-1][1] == 0, steps  # counts so far: zero at the end is zero in every step


@pytest.mark.timeout(180)
def test_maintenance_without_shutdown_delay_is_measured(tmp_path: Path) -> None:
    steps = maintenance_cycle(tmp_path, None)
    # Reloads never fail a request, delay or not: the failures come from the stops.
    assert steps[1][1] == 0, steps


@pytest.mark.timeout(180)
def test_maintenance_without_delay_or_balancer_retries_is_measured(tmp_path: Path) -> None:
    """What the delay is for: a balancer that retries nothing (`retries 0`) sends requests
    to a stopping instance until its checks see it down; those fail (printed, figures in
    docs/fleet.md). Its reloads still fail nothing."""
    steps = maintenance_cycle(tmp_path, None, retries=False)
    assert steps[1][1] == 0, steps


@pytest.mark.timeout(180)
def test_maintenance_with_delay_needs_no_balancer_retries(tmp_path: Path) -> None:
    steps = maintenance_cycle(tmp_path, 2.0, retries=False)
    assert steps[-1][1] == 0, steps
