"""What the kernel lets this master do, asked once at start.

``pidfd_getfd`` (detaching a worker from the listening sockets, system/detach.py) is the
one call a seccomp profile commonly refuses: Docker's default profile and systemd's
``SystemCallFilter=@system-service`` without it. Refused with an errno, detaching fails
per worker and falls back to the stop signal anyway; asking once at start makes that a
single clear warning with a hint instead of a reason on every reload. A filter that
kills (SIGSYS) instead of returning an errno cannot be asked: docs/systemd.md says so.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from typing import Final

# pidfd_getfd has the same number on every architecture handoff runs on.
_SYS_PIDFD_GETFD: Final = {"x86_64": 438, "aarch64": 438}
# Errors that say the master is short of something right now, not that the call is
# refused: the probe tells nothing then, and detaching stays on.
_TRANSIENT: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def pidfd_getfd(pidfd: int, target: int) -> int:
    """A copy (close-on-exec) of the target fd of the process pidfd names."""
    number = _SYS_PIDFD_GETFD.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, "pidfd_getfd: unknown architecture")
    fd = _libc.syscall(number, pidfd, target, 0)
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(fd)


def pidfd_getfd_refusal() -> str | None:
    """Why pidfd_getfd is refused to this process (e.g. ``"Operation not permitted
    (EPERM)"``), or None if it works (or the answer is unknown).

    It copies one of the master's own fds through its own pidfd: a process may always
    do that to itself, so only the kernel's age or a seccomp filter can say no.
    """
    try:
        pidfd = os.pidfd_open(os.getpid())
    except OSError:
        return None  # check_platform reports a missing pidfd_open
    try:
        os.close(pidfd_getfd(pidfd, pidfd))
    except OSError as exc:
        code = exc.errno or errno.EIO
        if code in _TRANSIENT:
            return None
        return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    finally:
        os.close(pidfd)
    return None
