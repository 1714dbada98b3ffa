"""What the master reads of a deploy on disk: the ``--env-file`` files and the start
directory the workers' default ``--chdir`` comes from.

The env files are read by the master at the start of each generation (a reload), so
reading one must never hang or flood it: opened non-blocking (a FIFO put in a file's
place would block ``open`` until a writer came), regular files only, at most
``MAX_ENV_FILE_BYTES`` each. A file on a hung network mount can still block the read:
keep env files on a local disk (the release's own code may live anywhere: the workers
change into their directory themselves, system/children.py).

The start directory is the one handoff was started in, *by the name it was given*: a
shell inside ``/srv/app/current`` has ``PWD=/srv/app/current`` while ``getcwd()`` says
``/srv/app/releases/41``; only the name follows a later flip of the symlink. ``$PWD`` is
trusted when it names the same directory as ``getcwd()`` (what a shell checks), and set
right in the master's own environment otherwise, so that a master re-executed in place
(same environment, command line) finds the same name again without looking.
"""

from __future__ import annotations

import os
import stat
from collections.abc import MutableMapping, Sequence

from handoff.errors import ConfigError
from handoff.formats.env_file import MAX_ENV_FILE_BYTES, EnvFileError, parse_env_file


def read_env_files(paths: Sequence[str]) -> dict[str, str]:
    """The variables the files set, in order (a later file wins); raise EnvFileError."""
    variables: dict[str, str] = {}
    for path in paths:
        variables.update(parse_env_file(_read_bounded(path), path))
    return variables


def _read_bounded(path: str) -> bytes:
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise EnvFileError(path, 0, exc.strerror or str(exc)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise EnvFileError(path, 0, "not a regular file")
        chunks = []
        size = 0
        while size <= MAX_ENV_FILE_BYTES and (chunk := os.read(fd, 1 << 16)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise EnvFileError(path, 0, exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    return b"".join(chunks)  # parse_env_file refuses what is over the limit


def start_directory(environ: MutableMapping[str, str], *, fresh: bool) -> str | None:
    """The directory handoff was started in, by name; None if it cannot be told.

    fresh: a new master (not one re-executed in place), which checks ``$PWD`` against
    ``getcwd()`` and corrects ``$PWD`` in environ when it is wrong. A re-executed master
    takes ``$PWD`` as it was left: looking again after a flip would find it "wrong".
    """
    named = environ.get("PWD", "")
    if not fresh and _plausible(named):
        return named
    try:
        actual = os.getcwd()
    except OSError:  # the directory was removed under us
        return named if _plausible(named) else None
    if _plausible(named) and _same_directory(named, actual):
        return named
    environ["PWD"] = actual
    return actual


def _plausible(path: str) -> bool:
    """An absolute path without '.' or '..' parts (what a shell accepts in $PWD)."""
    return path.startswith("/") and not {".", ".."} & set(path.split("/"))


def _same_directory(first: str, second: str) -> bool:
    try:
        a, b = os.stat(first), os.stat(second)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def workers_directory(chdir: str | None, start: str | None, *, fresh: bool) -> str | None:
    """Where each worker is started: --chdir (relative to the start directory), else the
    start directory; None: where the master is. At a fresh start a --chdir that is not a
    directory is a ConfigError (exit 2); a re-executed master never looks (its workers
    report a missing directory when they are spawned)."""
    if chdir is None:
        return start
    if not chdir.startswith("/"):
        if start is None:
            raise ConfigError(
                f"--chdir {chdir}: relative, but the current directory no longer exists",
                hint="give an absolute --chdir, or start handoff from an existing directory",
            )
        chdir = os.path.join(start, chdir)
    chdir = "/" + "/".join(part for part in chdir.split("/") if part not in ("", "."))
    if fresh and not os.path.isdir(chdir):
        reason = "not a directory" if os.path.exists(chdir) else "no such directory"
        raise ConfigError(
            f"--chdir {chdir}: {reason}",
            hint="--chdir names the directory the workers run in, e.g. the release "
            "symlink /srv/app/current; create it first",
        )
    return chdir


def absolute_paths(paths: Sequence[str], start: str | None) -> tuple[str, ...]:
    """Relative --env-file paths, joined to the start directory's name (so a relative
    path under a release symlink follows a flip too)."""
    if start is None:
        return tuple(paths)
    return tuple(os.path.join(start, path) for path in paths)


def process_directory(pid: int) -> str | None:
    """The directory a process runs in, as /proc/PID/cwd names it; None if it cannot be
    read or the directory was removed. readlink builds the name from the kernel's cache
    of the path: nothing is asked of the directory's filesystem, so a hung mount cannot
    block it."""
    try:
        path = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None
    return path if path.startswith("/") and not path.endswith(" (deleted)") else None


def in_directory(command: str, workdir: str | None) -> str:
    """A relative command path with a slash (``./venv/bin/gunicorn``), as the workers
    will find it: in their directory. Names without a slash are looked up in PATH."""
    if workdir is None or "/" not in command or command.startswith("/"):
        return command
    return os.path.join(workdir, command)
