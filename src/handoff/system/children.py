"""Child processes: fork + execve with the sockets in place, pidfds, signals, reaping.

Why fork + execve and not subprocess: LISTEN_PID must be the
worker's own pid, which only exists after fork. Forking is safe because the master is
single-threaded. Between fork and exec the child only moves fds, resets signals, sets
its session and changes directory; an exec failure (or a failed step before it, such as
the chdir) travels back as errno over a close-on-exec pipe.

Why the child searches PATH and changes directory, and the wait for its exec is
bounded: a release on a hung NFS or FUSE mount blocks ``stat``, ``chdir`` and ``execve``
in D state. In the child that costs one worker; in the master it would freeze the loop
(no reaping, no timers, no watchdog).

Why pidfds: a pidfd names one process for good, so a signal sent through it can never
hit a recycled pid (descendants found in /proc are checked by start time instead),
and ``waitid(P_PIDFD)`` reaps exactly that child (never ``waitpid(-1)``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import math
import os
import resource
import select
import signal
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, NoReturn

from handoff.core.model import ExitStatus, Pid
from handoff.errors import PlatformError, SpawnError
from handoff.formats.identity import WorkerIdentity
from handoff.formats.worker_contract import FIRST_LISTEN_FD
from handoff.system import signals

_PR_SET_PDEATHSIG: Final = 1
_PR_SET_CHILD_SUBREAPER: Final = 36
_PR_CAP_AMBIENT: Final = 47
_PR_CAP_AMBIENT_CLEAR_ALL: Final = 4
_libc = ctypes.CDLL(None, use_errno=True)

# How long spawn waits to learn whether execve worked. A child still in execve after
# this (its file on a hung mount) is returned as started; if its exec fails later, it
# exits 127 and that is handled like any worker's exit.
EXEC_RESULT_WAIT_S: Final = 2.0
# Errors of one PATH candidate that mean "not here, try the next one": what execvpe(3)
# passes over, and what shutil.which skipped (missing, not executable, a directory).
_NOT_HERE: Final = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.ELOOP, errno.ESTALE, errno.ENODEV,
     errno.ETIMEDOUT}
)  # fmt: skip
_NOT_FOUND: Final = 0  # the errno slot of the child's report: no candidate was there
# After the errno: a failed step's name follows this byte (an exec failure's path never
# starts with NUL).
_STEP: Final = b"\0"


@dataclass(frozen=True, slots=True, kw_only=True)
class SpawnRequest:
    # A path to execve as it is; or, with search_path set, a command name looked up in
    # it by the child (a name with a slash is not looked up, but missing is "not found").
    executable: str
    argv: Sequence[str]
    env: Mapping[str, str]
    search_path: str | None = None
    listen_fds: Sequence[int] = ()
    set_listen_pid: bool = False
    die_with_parent: bool = True
    # The soft RLIMIT_NOFILE the child gets back (the master raised its own; a worker
    # that uses select() needs fds below 1024). None: keep the master's.
    fd_soft_limit: int | None = None
    # Where the child's stdout and stderr go (a pipe the master reads); None: the master's.
    output: int | None = None
    # The directory the child changes into before its exec (resolved then: a symlink
    # flipped since the last spawn is followed); None: the master's.
    cwd: str | None = None
    # --user/--group: the child switches to it right after setsid; None: the master's.
    identity: WorkerIdentity | None = None


@dataclass(slots=True)
class Child:
    pid: Pid
    pidfd: int
    # spawn saw the exec happen (its directory entered, its program running); False: it
    # was still on its way (EXEC_RESULT_WAIT_S), or the child was adopted.
    exec_seen: bool = False

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def check_platform() -> None:
    """Fail clearly where the kernel or a seccomp filter lacks pidfds."""
    try:
        fd = os.pidfd_open(os.getpid())
    except OSError as exc:
        raise PlatformError(
            f"pidfd_open is not available ({errno.errorcode.get(exc.errno or 0, exc.errno)})",
            hint="handoff needs Linux >= 5.4; a container's seccomp profile may block pidfd_open",
        ) from None
    os.close(fd)


def become_subreaper() -> None:
    """Orphans of worker trees are re-parented to the master, so it can find and reap them."""
    if _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise PlatformError(
            "prctl(PR_SET_CHILD_SUBREAPER) failed", hint="handoff needs Linux >= 3.4"
        )


def spawn(request: SpawnRequest, *, exec_wait_s: float = EXEC_RESULT_WAIT_S) -> Child:
    """Start a child in its own session; raise SpawnError if it cannot be started.

    Every failure is a SpawnError, the kernel refusing a resource (EMFILE, EAGAIN,
    ENOMEM) included: a worker that cannot start is a failed worker, never a failed master.
    A child whose execve has neither worked nor failed within exec_wait_s is returned as
    started (see EXEC_RESULT_WAIT_S).
    """
    candidates = exec_candidates(request.executable, request.search_path)
    if not candidates:
        raise SpawnError(f"command not found: '{request.executable}'")
    try:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
    except OSError as exc:
        raise refused("pipe2", exc) from None
    parent = os.getpid()
    try:
        with signals.blocked():
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child; its only way out is exec or _exit
                os.close(read_end)
                _exec_child(request, candidates, write_end, parent)
    except OSError as exc:
        os.close(read_end)
        os.close(write_end)
        raise refused("fork", exc) from None
    os.close(write_end)
    try:
        pidfd = os.pidfd_open(pid)  # the child cannot be reaped before we wait: no race
    except OSError as exc:
        # It exists, but cannot be watched: take it back by pid (not reaped yet, so the
        # pid is still this child's).
        os.close(read_end)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise refused("pidfd_open", exc) from None
    try:
        data = read_until_closed(read_end, exec_wait_s)
    finally:
        os.close(read_end)
    child = Child(Pid(pid), pidfd, exec_seen=data is not None)
    if data and len(data) >= 4:
        wait(child, block=True)
        child.close()
        (code,) = struct.unpack("i", data[:4])
        if data[4:5] == _STEP:  # a step before the exec failed; its name follows
            raise SpawnError(f"{data[5:].decode(errors='replace')}: {os.strerror(code)}")
        if code == _NOT_FOUND:
            raise SpawnError(f"command not found: '{request.executable}'")
        path = os.fsdecode(data[4:]) or request.executable
        raise SpawnError(f"cannot execute '{path}': {os.strerror(code)}")
    return child


def exec_candidates(executable: str, search_path: str | None) -> list[str]:
    """The paths the child tries in turn: string work only, nothing is looked at on disk.

    The same paths, in the same order, as shutil.which(executable, path=search_path).
    """
    if search_path is None or "/" in executable:
        return [executable]
    seen: set[str] = set()
    paths = []
    for directory in search_path.split(os.pathsep) if search_path else ():
        if directory not in seen:
            seen.add(directory)
            paths.append(os.path.join(directory, executable))
    return paths


def refused(call: str, exc: OSError) -> SpawnError:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return SpawnError(
        f"cannot start a process: {call}: {os.strerror(exc.errno or errno.EIO)} ({name})",
        hint="the master is out of file descriptors, processes or memory: see "
        "LimitNOFILE=, TasksMax= or the container's limits",
    )


def raise_fd_limit() -> int:
    """Raise the master's soft RLIMIT_NOFILE to its hard limit; return the old soft limit.

    Each worker costs the master a pidfd (two per slot during a reload), on top of its
    control clients: systemd's default soft limit of 1024 runs out near 500 workers.
    Workers get the old soft limit back (``SpawnRequest.fd_soft_limit``).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft


def read_until_closed(fd: int, wait_s: float) -> bytes | None:
    """Read fd until its writers are all gone (end of file); None if that takes longer
    than wait_s (what was read so far is dropped)."""
    deadline = time.monotonic() + wait_s
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(math.ceil(left * 1000)):
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _exec_child(  # pragma: no cover - runs in the forked child
    request: SpawnRequest, candidates: Sequence[str], error_pipe: int, parent: int
) -> None:
    report = struct.pack("i", _NOT_FOUND)
    try:
        os.setsid()
        if request.identity is not None:  # first: PR_SET_PDEATHSIG is cleared by a switch
            _switch_user(request.identity, error_pipe)
        if request.die_with_parent:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:
                os._exit(1)  # the master died before prctl took effect
        signals.reset_in_child()
        if request.cwd is not None:
            try:
                os.chdir(request.cwd)
            except OSError as exc:
                _fail_step(error_pipe, f"chdir {request.cwd}", exc)
        count = len(request.listen_fds)
        top = FIRST_LISTEN_FD + count
        # Move every fd we keep above the target range first, so a dup2 never overwrites a
        # source; dup2 onto a different fd also clears close-on-exec, which we need.
        # (dup2 of an fd onto itself would keep CLOEXEC set.)
        moved = [_dup_above(fd, top) for fd in request.listen_fds]
        output = None if request.output is None else _dup_above(request.output, top)
        error_pipe = _dup_above(error_pipe, top + count)
        for index, fd in enumerate(moved):
            os.dup2(fd, FIRST_LISTEN_FD + index, inheritable=True)
        if output is not None:
            os.dup2(output, 1, inheritable=True)
            os.dup2(output, 2, inheritable=True)
        os.closerange(top, error_pipe)
        os.closerange(error_pipe + 1, _fd_limit())
        if request.fd_soft_limit is not None:
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (request.fd_soft_limit, hard))
        env = dict(request.env)
        if request.set_listen_pid:
            env["LISTEN_PID"] = str(os.getpid())
        searching = request.search_path is not None
        for path in candidates:
            try:
                os.execve(path, list(request.argv), env)
            except OSError as exc:
                # EACCES (not ours to execute: --user) is what is reported if no other
                # candidate is found, as execvp(3) does: not "command not found".
                if not (searching and exc.errno in _NOT_HERE) or exc.errno == errno.EACCES:
                    report = struct.pack("i", exc.errno or errno.EIO) + os.fsencode(path)
                if not (searching and exc.errno in _NOT_HERE):
                    break
    except OSError as exc:
        report = struct.pack("i", exc.errno or errno.EIO)
    except BaseException:  # nothing may escape into a copy of the master
        report = b""
    # The master may have stopped waiting (EXEC_RESULT_WAIT_S) and closed its end: the
    # exit status 127 says it then, not a death by SIGPIPE.
    with contextlib.suppress(BaseException):
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        os.write(error_pipe, report)
    os._exit(127)


def _switch_user(identity: WorkerIdentity, error_pipe: int) -> None:  # pragma: no cover
    """In the child, --user/--group: groups, then gid, then uid (each step takes away the
    right to make the ones before it); checked, since a switch that half happened must
    not exec. The kernel clears PR_SET_PDEATHSIG when credentials change: the caller
    sets it after this."""
    uid, gid = identity.uid, identity.gid
    try:
        if set(os.getgroups()) != set(identity.groups):  # setgroups needs CAP_SETGID
            os.setgroups(list(identity.groups))
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
            raise PermissionError(errno.EPERM, "the switch did not take")
    except OSError as exc:
        _fail_step(error_pipe, f"cannot switch to {identity.describe()}", exc)
    # A master with ambient capabilities (AmbientCapabilities= with User=) would pass
    # them on to the worker across exec: the worker gets none. (From root, setresuid
    # has cleared them already.) EINVAL on kernels before 4.3, which have none.
    _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def _fail_step(  # pragma: no cover - runs in the forked child
    error_pipe: int, step: str, exc: OSError
) -> NoReturn:
    """A step before the exec failed: report its errno and name (after _STEP), exit."""
    report = struct.pack("i", exc.errno or errno.EIO) + _STEP + os.fsencode(step)
    with contextlib.suppress(BaseException):
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        os.write(error_pipe, report)
    os._exit(127)


def _dup_above(fd: int, minimum: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, minimum)


def _fd_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def wait(child: Child, *, block: bool = False) -> ExitStatus | None:
    """Reap the child if it has exited; None if it still runs."""
    flags = os.WEXITED | (0 if block else os.WNOHANG)
    result = os.waitid(os.P_PIDFD, child.pidfd, flags)
    if result is None:
        return None
    if result.si_code == os.CLD_EXITED:
        return ExitStatus(code=result.si_status)
    return ExitStatus(signal=result.si_status)


def send_signal(child: Child, sig: signal.Signals) -> bool:
    """Signal the child through its pidfd; False if it has already exited."""
    try:
        signal.pidfd_send_signal(child.pidfd, sig)
    except ProcessLookupError:
        return False
    return True


def kill_group(pgid: int) -> bool:
    """SIGKILL a process group; False if it is empty."""
    return signal_group(pgid, signal.SIGKILL)


def signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Signal a process group; False if it is empty.

    Safe while the group leader is unreaped: its pid (the pgid) cannot be recycled; and
    after, as long as the group has a member: the kernel does not hand out a pid that
    is still some group's id.
    """
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True
