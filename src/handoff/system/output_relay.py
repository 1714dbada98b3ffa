"""The output relay: a small forked process between the workers' output and a log reader
that can go away.

When the master's stdout or stderr is a pipe or a socket (`| tee`, `| logger`, a
container's log driver, journald's stream), the reader may vanish or stall. Written to
directly, the workers would then get EPIPE (and die of SIGPIPE unless they ignore it)
and the master could block. So, like the warden, the master forks a relay at start: the
master's own fd 1 and 2 become pipes the relay reads, and the relay copies them to the
original stdout and stderr. Workers inherit the pipes: they never see the reader go
away; what the relay cannot deliver it drops, and counts in a memfd the master reads
for ``handoff status`` (``log_lines_dropped``). The pipes stay the master's fd 1 and 2
across a re-exec in place, so the relay serves the new code too.

A terminal or a regular file is written to directly, as before (a worker keeps its
colours on a terminal): their readers do not go away.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import stat
import struct
from dataclasses import dataclass

from handoff.core.model import Pid
from handoff.system.process_tree import set_title

_CHUNK = 65536
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
    """Is this fd a pipe or a socket: a reader that can go away or stall?"""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


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
        dropped = 0
        while sources:
            readable, _, _ = select.select(list(sources), [], [])
            for source in readable:
                data = os.read(source, _CHUNK)
                if not data:
                    del sources[source]
                    continue
                if not _deliver(sources[source], data):
                    dropped += 1
                    os.pwrite(counter, _COUNTER.pack(dropped), 0)
    except BaseException:  # - never run the master's code in the relay
        code = 1
    os._exit(code)


def _deliver(fd: int, data: bytes) -> bool:  # pragma: no cover - runs in the relay
    """Write it all; False if the reader is gone or refuses (it is dropped, never retried)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [], 1.0)  # someone made the destination non-blocking
        except OSError:
            return False
    return True
