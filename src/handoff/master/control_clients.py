"""Control clients that wait: for the next reload to start, for a reload's result (and its
--keep-previous window), for a rollback's or an upgrade's result. Kept apart from the
request handling so that a re-exec can hand the waiting ones over (``records``) and take
them back (``place``) in one place.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass, field
from enum import StrEnum

from handoff.core.model import GenId, MasterState
from handoff.core.policy import ReloadOutcome
from handoff.master.resume_state import ClientRecord


@dataclass(slots=True)
class Client:
    sock: socket.socket
    deadline: float
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytearray = field(default_factory=bytearray)
    answered: bool = False  # the request was read; nothing more is read from it
    closing: bool = False  # close once the outbox is flushed
    wants_write: bool = False
    verify: bool = False  # reload --verify: answered at the end of the window
    rolled_back: dict[str, object] | None = None  # a rollback's restart it waits for


class Awaits(StrEnum):
    NEXT_RELOAD = "next-reload"  # asked for a reload that has not started yet
    RELOAD = "reload"  # a reload's result
    UPGRADE = "upgrade"  # the upgrade's result


class Placement(StrEnum):
    """What to do with a handed-over client once the machine has taken over."""

    WAITING = "waiting"  # it waits on
    ANSWER_LAST = "answer-last"  # its reload ended meanwhile: answer with the outcome
    INTERRUPTED = "interrupted"  # what it waited for did not survive the re-exec


class Waiting:
    def __init__(self) -> None:
        self.next_reload: list[Client] = []
        self.reloads: dict[GenId, list[Client]] = {}
        self.upgrades: list[Client] = []
        # Not handed over across a re-exec (its window, or restart, is not carried):
        self.verifying: dict[GenId, list[Client]] = {}  # reload --verify, by generation
        self.rollbacks: dict[GenId, list[Client]] = {}  # a rollback's restart, by generation

    def reload_started(self, gen: GenId) -> None:
        self.reloads.setdefault(gen, []).extend(self.next_reload)
        self.next_reload = []

    def all_reloads(self) -> list[Client]:
        return [client for clients in self.reloads.values() for client in clients]

    def forget(self, client: Client) -> None:
        self.next_reload = [c for c in self.next_reload if c is not client]
        self.upgrades = [c for c in self.upgrades if c is not client]
        for waiting in (self.reloads, self.verifying, self.rollbacks):
            for clients in waiting.values():
                if client in clients:
                    clients.remove(client)

    def records(self) -> list[ClientRecord]:
        """The waiting clients, to hand over across a re-exec (a client whose last line
        cannot be finished now is left out: it would otherwise read half a line)."""
        waiting = [(c, Awaits.NEXT_RELOAD, 0) for c in self.next_reload]
        waiting += [(c, Awaits.RELOAD, gen) for gen, cs in self.reloads.items() for c in cs]
        waiting += [(c, Awaits.UPGRADE, 0) for c in self.upgrades]
        records = []
        for client, kind, gen in waiting:
            if client.outbox:
                with contextlib.suppress(OSError):
                    client.sock.settimeout(0.5)
                    client.sock.sendall(client.outbox)
                    client.outbox.clear()
                client.sock.setblocking(False)
            if not client.outbox:
                records.append(ClientRecord(fd=client.sock.fileno(), waiting=kind, gen=gen))
        return records

    def place(
        self,
        client: Client,
        record: ClientRecord,
        *,
        running: GenId | None,
        last: ReloadOutcome | None,
        state: MasterState,
    ) -> Placement:
        """Put a handed-over client back where it waits, or say how to answer it."""
        if record.waiting == Awaits.UPGRADE:
            self.upgrades.append(client)
            return Placement.WAITING
        wanted = GenId(record.gen) if record.waiting == Awaits.RELOAD else running
        if wanted is not None and wanted == running:
            self.reloads.setdefault(wanted, []).append(client)
            return Placement.WAITING
        if last is not None and wanted == last.gen:
            return Placement.ANSWER_LAST
        if record.waiting == Awaits.NEXT_RELOAD and state is not MasterState.RUNNING:
            self.next_reload.append(client)  # a queued reload starts later
            return Placement.WAITING
        return Placement.INTERRUPTED
