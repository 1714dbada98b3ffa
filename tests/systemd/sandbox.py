"""A real systemd, PID 1 of private namespaces, driven by the tests through sandbox.sh.

``sandbox.sh`` (beside this file) does the booting and the tearing down, and keeps the
host safe (read its header). This module runs it with deadlines and turns what systemd
says into Python values. Units are installed in the sandbox's /etc/systemd/system (a
bind mount of DIR/units); files a service must read go to the sandbox's private /run,
which the host reaches through /proc/PID/root: services run with PrivateTmp=, so the
host's /tmp is not theirs.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Final

import psutil

SCRIPT: Final = Path(__file__).with_name("sandbox.sh")
# Every command the tests run inside the sandbox gets this long at most; a test's own
# timeout (pytest-timeout) is longer, so a hung systemctl fails the test with its output.
COMMAND_TIMEOUT_S: Final = 90.0


class SandboxError(AssertionError):
    """A sandbox command failed; the message has its output and systemd's console."""


class Sandbox:
    """One booted systemd; every method bounds its commands in time."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory.resolve()
        self.units = self.directory / "units"

    # -- life cycle --------------------------------------------------------------------

    def boot(self, timeout: float = 60.0) -> None:
        self._script("boot", str(self.directory), timeout=timeout)

    def down(self, timeout: float = 60.0) -> None:
        self._script("down", str(self.directory), timeout=timeout)

    @property
    def pid(self) -> int:
        """The host pid of the sandboxed systemd (PID 1 inside)."""
        return int((self.directory / "pid").read_text().strip())

    def alive(self) -> bool:
        try:
            return psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
        except (OSError, ValueError, psutil.Error):
            return False

    def console(self, lines: int = 40) -> str:
        """The end of systemd's own log (its /dev/console)."""
        with contextlib.suppress(OSError):
            text = (self.directory / "console.log").read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    # -- commands ----------------------------------------------------------------------

    def _script(
        self, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        argv = ["bash", str(SCRIPT), *args]
        try:
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise SandboxError(
                f"{' '.join(args)}: no answer within {timeout} s\n"
                f"stdout: {exc.stdout!r}\nstderr: {exc.stderr!r}\n"
                f"systemd console:\n{self.console()}"
            ) from None
        if check and result.returncode != 0:
            raise SandboxError(
                f"{' '.join(args)}: exit {result.returncode}\nstdout: {result.stdout}\n"
                f"stderr: {result.stderr}\nsystemd console:\n{self.console()}"
            )
        return result

    def ctl(
        self, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """systemctl ARGS inside the sandbox."""
        return self._script("ctl", str(self.directory), *args, check=check, timeout=timeout)

    def run(
        self, *argv: str, check: bool = True, timeout: float = COMMAND_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """Any command inside the sandbox's namespaces."""
        return self._script("run", str(self.directory), *argv, check=check, timeout=timeout)

    def popen_ctl(self, *args: str) -> subprocess.Popen[str]:
        """systemctl ARGS inside the sandbox, not waited for (the caller must wait)."""
        return subprocess.Popen(
            ["bash", str(SCRIPT), "ctl", str(self.directory), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    # -- what systemd knows ------------------------------------------------------------

    def show(self, unit: str, prop: str) -> str:
        return self.ctl("show", "-P", prop, unit).stdout.strip()

    def state(self, unit: str) -> str:
        return self.ctl("is-active", unit, check=False).stdout.strip()

    def main_pid(self, unit: str) -> int:
        return int(self.show(unit, "MainPID"))

    def status(self, unit: str) -> str:
        """`systemctl status` as a user sees it (exit 3 for an inactive unit is fine)."""
        return self.ctl("status", "--lines=30", "--full", unit, check=False).stdout

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, check=False).stdout

    def events(self, unit: str) -> list[dict[str, Any]]:
        """handoff's JSON log events in the unit's journal, oldest first."""
        events = []
        for line in self.journal(unit).splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict) and "event" in event:
                        events.append(event)
        return events

    # -- processes and files -----------------------------------------------------------

    def host_pid(self, pid: int) -> int:
        """The host pid of a process the sandbox calls pid."""
        for proc in psutil.Process(self.pid).children(recursive=True):
            with contextlib.suppress(OSError, psutil.Error):
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("NSpid:") and int(line.split()[-1]) == pid:
                        return proc.pid
        raise LookupError(f"no process {pid} in the sandbox")

    def host_path(self, inside: str) -> Path:
        """Where the host reaches a path of the sandbox's own mounts (e.g. its /run)."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    # -- units -------------------------------------------------------------------------

    def install(self, files: dict[str, str]) -> None:
        """Write unit files (names relative to /etc/systemd/system, drop-ins included)."""
        for name, text in files.items():
            path = self.units / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        self.ctl("daemon-reload")

    def uninstall(self, units: list[str]) -> None:
        """Stop units, forget their failures, remove their files (and drop-in dirs)."""
        if not units:
            return
        if self.alive():
            self.ctl("stop", *units, check=False)
            self.ctl("reset-failed", *units, check=False)
        for unit in units:
            with contextlib.suppress(FileNotFoundError):
                (self.units / unit).unlink()
            shutil.rmtree(self.units / f"{unit}.d", ignore_errors=True)
        if self.alive():
            self.ctl("daemon-reload", check=False)
