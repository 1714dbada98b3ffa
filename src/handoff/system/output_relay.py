"""The output relay: a small forked process between the workers' output and a log reader
that can go away.

When the master's stdout or stderr is a pipe or a socket (`| tee`, `| logger`, a
container's log driver, journald's stream), the reader may vanish or stall; a file may
fill its disk. Written to directly, the workers would then get EPIPE (and die of SIGPIPE
unless they ignore it), block, or fail with ENOSPC, and the master could block. So, like
the warden, the master forks a relay at start: the master's own fd 1 and 2 become pipes
the relay reads, and the relay copies them to the original stdout and stderr. Workers
inherit the pipes. The relay always reads them at once, so a writer never waits on the
reader; it writes on without blocking, keeps up to ``BACKLOG`` bytes a stalled reader
has not taken yet, and drops what does not fit or cannot be delivered, counting it in a
memfd the master reads for ``handoff status`` (``log_lines_dropped``). The pipes stay the
master's fd 1 and 2 across a re-exec in place, so the relay serves the new code too.

A terminal is written to directly, as before (a worker keeps its colours).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import stat
import struct
from dataclasses import dataclass

from handoff.core.model import Pid
from handoff.system.process_tree import set_title

_CHUNK = 65536
BACKLOG = 1 << 20  # bytes per stream a stalled reader may owe before output is dropped
_COUNTER = struct.Struct("Q")


@dataclass(slots=True)
class OutputRelay:
    pid: Pid
    counter: int  # memfd holding how many chunks the relay had to drop
    originals: tuple[int, int]  # the master's original stdout and stderr (-1: not relayed)

    def dropped(self) -> int:
        with contextlib.suppress(OSError, struct.error):
            return int(_COUNTER.unpack(os.pread(self.counter, _COUNTER.size, 0))[0])
        return 0

    def fds(self) -> list[int]:
        """What must stay open across a re-exec."""
        return [self.counter, *(fd for fd in self.originals if fd >= 0)]

    def finish(self) -> None:
        """At exit: give the master its own stdout and stderr back (the relay then ends
        once the last worker is gone), so that its last words are not lost."""
        for target, original in zip((1, 2), self.originals, strict=True):
            if original >= 0:
                with contextlib.suppress(OSError):
                    os.dup2(original, target)

    @classmethod
    def adopt(cls, pid: int, counter: int, originals: tuple[int, int]) -> OutputRelay:
        for fd in (counter, *originals):
            if fd >= 0:
                os.set_inheritable(fd, False)
        return cls(Pid(pid), counter, originals)


def relayed(fd: int) -> bool:
    """Is this fd a pipe, a socket or a file (a reader that can go away or stall, a disk
    that can fill)? A terminal is not relayed."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISREG(mode)


def start_relay(name: str) -> OutputRelay | None:
    """Fork the relay if stdout or stderr needs one; make the master's fd 1 and 2 its pipes."""
    targets = [fd for fd in (1, 2) if relayed(fd)]
    if not targets:
        return None
    counter = os.memfd_create("handoff-relay", os.MFD_CLOEXEC)
    os.write(counter, _COUNTER.pack(0))
    pipes = {fd: os.pipe2(os.O_CLOEXEC) for fd in targets}
    originals = tuple(
        os.dup(fd) if fd in pipes else -1 for fd in (1, 2)
    )  # inheritable=False by default
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the relay
        _relay({read: fd for fd, (read, _) in pipes.items()}, counter, name)
    for fd, (read, write) in pipes.items():
        os.close(read)
        os.dup2(write, fd)  # inheritable: workers get it as their stdout or stderr
        os.close(write)
    return OutputRelay(Pid(pid), counter, (originals[0], originals[1]))


def _relay(sources: dict[int, int], counter: int, name: str) -> None:  # pragma: no cover
    code = 0
    try:
        # Ctrl-C reaches the master's whole group: the relay must outlive a graceful stop.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                    signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGPIPE):  # fmt: skip
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        keep = sorted({2, counter, *sources})
        for low, high in zip(keep, [*keep[1:], 1 << 16], strict=True):
            os.closerange(low + 1, high)
        set_title(f"handoff: output relay [{name}]")
        _copy(sources, {target: _Sink(target) for target in set(sources.values())}, counter)
    except BaseException:  # - never run the master's code in the relay
        code = 1
    os._exit(code)


class _Sink:  # pragma: no cover - runs in the relay
    """One destination, written without ever blocking, with what it still owes."""

    def __init__(self, target: int) -> None:
        mode = os.fstat(target).st_mode
        self.socket: socket.socket | None = None
        self.fd = target
        self.shared = False  # a pipe written through the (blocking) description we were given
        if stat.S_ISSOCK(mode):
            self.socket = socket.socket(fileno=os.dup(target))
        elif stat.S_ISFIFO(mode):
            # A description of our own: O_NONBLOCK on it changes nobody else's. A pipe
            # another user made (the master started by root, then running as a service
            # user) cannot be reopened: then each write waits for room first (`shared`).
            try:
                self.fd = os.open(f"/proc/self/fd/{target}", os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                self.shared = True
        self.backlog = bytearray()

    def take(self, data: bytes) -> bool:
        """Queue data; False (dropped) if the reader already owes too much."""
        if len(self.backlog) + len(data) > BACKLOG:
            return False
        self.backlog += data
        return True

    def flush(self) -> bool:
        """Write what the destination takes now; False if it failed (the backlog is lost)."""
        try:
            if self.socket is not None:
                sent = self.socket.send(self.backlog, socket.MSG_DONTWAIT)
            elif self.shared:
                sent = self._write_shared()
            else:
                sent = os.write(self.fd, self.backlog)
        except BlockingIOError:
            return True
        except OSError:
            self.backlog.clear()
            return False
        del self.backlog[:sent]
        return True

    def _write_shared(self) -> int:
        """A pipe with room (POLLOUT) takes PIPE_BUF bytes without blocking."""
        sent = 0
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        while sent < len(self.backlog):
            events = poller.poll(0)
            if not events or events[0][1] & (select.POLLERR | select.POLLHUP):
                if events and not sent:
                    raise BrokenPipeError
                break
            sent += os.write(self.fd, self.backlog[sent : sent + select.PIPE_BUF])
        if not sent:
            raise BlockingIOError
        return sent


def _copy(
    sources: dict[int, int], sinks: dict[int, _Sink], counter: int
) -> None:  # pragma: no cover
    """Read the sources as they come, write each sink when it can; until every source has
    ended and what is owed is written (or the reader has not taken it within 5 s)."""
    dropped = reported = 0
    while True:
        owed = [sink for sink in sinks.values() if sink.backlog]
        if not sources and not owed:
            return
        waiting = [sink.fd if sink.socket is None else sink.socket.fileno() for sink in owed]
        readable, writable, _ = select.select(list(sources), waiting, [], None if sources else 5.0)
        if not readable and not writable:
            return
        for source in readable:
            data = os.read(source, _CHUNK)
            if not data:
                del sources[source]
            elif not sinks[sources[source]].take(data):
                dropped += 1
        for sink in owed:
            if not sink.flush():
                dropped += 1
        if dropped != reported:
            os.pwrite(counter, _COUNTER.pack(dropped), 0)
            reported = dropped
