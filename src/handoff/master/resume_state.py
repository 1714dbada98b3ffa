"""What a master hands to the code it re-executes in place: the open fds and the state.

The fds stay open across ``execve`` (their close-on-exec flag cleared): the listening
sockets, the control socket and the clients waiting on it, the workers' notify socket,
the warden's lifeline, the read ends of the workers' output pipes. Their numbers and
meaning, the machine's snapshot and a few counters travel as one JSON document in a
memfd whose number is in ``HANDOFF_RESUME``. The new master removes that variable at
once (workers never see it), reads the document (bounded), validates all of it before
it touches anything, and closes the memfd.

``HANDOFF_PREFLIGHT`` carries the same document to the pre-flight of ``handoff upgrade``:
the new code must be able to read it, or the upgrade does not happen.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import MutableMapping
from dataclasses import asdict, dataclass, field
from typing import Final

from handoff import __version__
from handoff.core.snapshot import MachineSnapshot, SnapshotError
from handoff.formats.options import BindKind, BindSpec
from handoff.system.sockets import Listener

RESUME_VARIABLE: Final = "HANDOFF_RESUME"
PREFLIGHT_VARIABLE: Final = "HANDOFF_PREFLIGHT"
_MAX_DOCUMENT: Final = 64 << 20
FORMAT: Final = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerRecord:
    fd: int
    spec: BindSpec
    address: str
    name: str
    created_path: str | None = None
    stored: bool = False

    @classmethod
    def of(cls, listener: Listener) -> ListenerRecord:
        return cls(
            fd=listener.fileno(),
            spec=listener.spec,
            address=listener.address,
            name=listener.name,
            created_path=listener.created_path,
            stored=listener.stored,
        )

    def adopt(self) -> Listener:
        """The listener again, on the fd that stayed open across the exec."""
        sock = socket.socket(fileno=self.fd)
        sock.set_inheritable(False)
        return Listener(
            spec=self.spec,
            sock=sock,
            address=self.address,
            name=self.name,
            created_path=self.created_path,
            stored=self.stored,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientRecord:
    """A control client waiting for an answer: for the next reload, a reload, an upgrade."""

    fd: int
    waiting: str  # "next-reload", "reload" or "upgrade"
    gen: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputRecord:
    """A worker's output pipe (master/worker_output.py): its read end, whose it is, the
    unfinished line (bytes as surrogate escapes) and the last lines."""

    fd: int
    pid: int
    gen: int
    worker: int
    partial: str = ""
    tail: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class LastWords:
    """The last output lines of the worker that failed a reload (for ``handoff status``)."""

    gen: int
    worker: int
    pid: int
    lines: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumeState:
    reason: str  # "crash" or "upgrade"
    version: str  # the version of the code that wrote it
    listeners: tuple[ListenerRecord, ...]
    notify_fd: int
    notify_address: str
    warden_pid: int
    warden_lifeline: int
    relay: tuple[int, int, int, int] | None = None  # pid, counter memfd, original fd 1 and 2
    control_fd: int | None = None
    clients: tuple[ClientRecord, ...] = ()
    machine: MachineSnapshot | None = None
    started_at: float = 0.0
    worker_fd_limit: int | None = None
    crashes: tuple[float, ...] = ()  # when the master crashed recently (monotonic)
    failpoints: str = ""  # what is left of HANDOFF_FAILPOINT
    counters: dict[str, int] = field(default_factory=dict)
    generation_env: dict[str, dict[str, str]] = field(default_factory=dict)  # --env-file
    generation_dirs: dict[str, str] = field(default_factory=dict)  # --chdir, pinned
    outputs: tuple[OutputRecord, ...] = ()  # the workers' output pipes
    last_failure: LastWords | None = None
    health_fd: int | None = None  # --health's listening socket (master/health_server.py)

    def fds(self) -> list[int]:
        """Every fd that must stay open across the exec."""
        fds = [record.fd for record in self.listeners]
        fds += [self.notify_fd, self.warden_lifeline]
        fds += [client.fd for client in self.clients]
        if self.control_fd is not None:
            fds.append(self.control_fd)
        if self.health_fd is not None:
            fds.append(self.health_fd)
        if self.relay is not None:
            fds += [fd for fd in self.relay[1:] if fd >= 0]
        fds += [record.fd for record in self.outputs]
        return fds

    def to_json(self) -> bytes:
        data = asdict(self)
        data["format"] = FORMAT
        data["machine"] = None if self.machine is None else self.machine.to_dict()
        return json.dumps(data).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ResumeState:
        """Validate and rebuild; raise SnapshotError naming what does not fit."""
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise SnapshotError("the state is not JSON") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SnapshotError(f"state format {_get(data, 'format')!r}, expected {FORMAT}")
        try:
            machine = data["machine"]
            return cls(
                reason=str(data["reason"]),
                version=str(data["version"]),
                listeners=tuple(_listener(item) for item in data["listeners"]),
                notify_fd=int(data["notify_fd"]),
                notify_address=str(data["notify_address"]),
                warden_pid=int(data["warden_pid"]),
                warden_lifeline=int(data["warden_lifeline"]),
                relay=None if data["relay"] is None else _four(data["relay"]),
                control_fd=None if data["control_fd"] is None else int(data["control_fd"]),
                # Absent in the state of a version before --health.
                health_fd=None if data.get("health_fd") is None else int(data["health_fd"]),
                clients=tuple(ClientRecord(**item) for item in data["clients"]),
                machine=None if machine is None else MachineSnapshot.from_dict(machine),
                started_at=float(data["started_at"]),
                worker_fd_limit=None
                if data["worker_fd_limit"] is None
                else int(data["worker_fd_limit"]),
                crashes=tuple(float(t) for t in data["crashes"]),
                failpoints=str(data["failpoints"]),
                counters={str(k): int(v) for k, v in data["counters"].items()},
                # Absent in the state of a version before --env-file.
                generation_env={
                    str(int(gen)): {str(k): str(v) for k, v in env.items()}
                    for gen, env in data.get("generation_env", {}).items()
                },
                generation_dirs={
                    str(int(gen)): str(path)
                    for gen, path in data.get("generation_dirs", {}).items()
                },
                # Absent in the state of a version before attributed worker output.
                outputs=tuple(_output(item) for item in data.get("outputs", ())),
                last_failure=_last_words(data.get("last_failure")),
            )
        except SnapshotError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SnapshotError(f"the state does not fit this version ({exc!r})") from None


def _listener(item: dict[str, object]) -> ListenerRecord:
    spec = dict(item["spec"])  # type: ignore[call-overload]
    spec["kind"] = BindKind(spec["kind"])
    return ListenerRecord(
        fd=int(item["fd"]),  # type: ignore[call-overload]
        spec=BindSpec(**spec),
        address=str(item["address"]),
        name=str(item["name"]),
        created_path=None if item.get("created_path") is None else str(item["created_path"]),
        stored=item.get("stored") is True,
    )


def _output(item: dict[str, object]) -> OutputRecord:
    return OutputRecord(
        fd=int(item["fd"]),  # type: ignore[call-overload]
        pid=int(item["pid"]),  # type: ignore[call-overload]
        gen=int(item["gen"]),  # type: ignore[call-overload]
        worker=int(item["worker"]),  # type: ignore[call-overload]
        partial=str(item["partial"]),
        tail=tuple(str(line) for line in item["tail"]),  # type: ignore[attr-defined]
    )


def _last_words(item: dict[str, object] | None) -> LastWords | None:
    if item is None:
        return None
    return LastWords(
        gen=int(item["gen"]),  # type: ignore[call-overload]
        worker=int(item["worker"]),  # type: ignore[call-overload]
        pid=int(item["pid"]),  # type: ignore[call-overload]
        lines=tuple(str(line) for line in item["lines"]),  # type: ignore[attr-defined]
    )


def _four(value: list[object]) -> tuple[int, int, int, int]:
    pid, counter, out, err = (int(v) for v in value)  # type: ignore[call-overload]
    return pid, counter, out, err


def _get(data: object, key: str) -> object:
    return data.get(key) if isinstance(data, dict) else None


def write_memfd(state: ResumeState, fd: int | None = None) -> int:
    """The state in a memfd (a new one, or fd emptied first), at offset 0. The caller
    clears close-on-exec where the exec'd code must inherit it."""
    if fd is None:
        fd = os.memfd_create("handoff-state", os.MFD_CLOEXEC)
    else:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
    data = state.to_json()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def take(environ: MutableMapping[str, str], variable: str = RESUME_VARIABLE) -> ResumeState | None:
    """The state a re-exec left, if this master is one: removes the variable, reads the
    memfd (bounded) and closes it. Raise SnapshotError if it cannot be used."""
    value = environ.pop(variable, None)
    if value is None:
        return None
    if not value.isdigit():
        raise SnapshotError(f"{variable}={value!r} is not an fd number")
    fd = int(value)
    try:
        chunks = []
        size = 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > _MAX_DOCUMENT:
                raise SnapshotError(f"the state is larger than {_MAX_DOCUMENT} bytes")
    except OSError as exc:
        raise SnapshotError(f"cannot read the state from fd {fd}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return ResumeState.from_json(b"".join(chunks))


def this_version() -> str:
    return __version__
