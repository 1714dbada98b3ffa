"""What a generation's workers start with besides the command: the ``--env-file``
values and the release directory. A generation is one release with one configuration.

The env files are read at a generation's first spawn (the start of a reload, in the
loop: system/deploy_paths.py bounds the read) and their values kept for that generation
while it lives; a file that cannot be used fails every spawn of that generation with the
same reason (file, line, why), read once.

A generation's first workers enter ``--chdir`` as it resolves then (the child does the
``chdir``: a hung mount costs a worker, never the loop). The first one seen to exec pins
the directory it entered, by the kernel's name for it (``/proc/PID/cwd``, no I/O on the
directory's filesystem); respawns and scale-ups enter that pinned release. So neither a
flip of ``current`` before the reload nor a release that failed to start (``current``
left on it) reaches the generation that serves.

A rollback's restart (``Generation.release_of``) starts with the values and the directory
of the generation it goes back to, kept for that purpose after it is gone (the machine's
``previous_release``): the release symlink may have been flipped since.

Both are kept in ``Holdings`` (``generation_env``, ``generation_dirs``), which a master
re-executed in place is handed, and dropped once their generation is gone.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Protocol

from handoff.core.model import Generation, GenerationState, GenId, Pid
from handoff.errors import HandoffError, SpawnError
from handoff.formats.log_events import EventName
from handoff.formats.options import RunConfig
from handoff.master.holdings import Holdings
from handoff.master.logs import emit
from handoff.master.system import System
from handoff.system.children import Child
from handoff.system.deploy_paths import read_env_files


class Releases(Protocol):
    """What the setup reads of the machine (``Supervisor`` is one)."""

    @property
    def generations(self) -> Mapping[GenId, Generation]: ...

    @property
    def previous_release(self) -> GenId | None: ...


class GenerationSetup:
    """Per generation: its env files' values and its release directory."""

    def __init__(
        self,
        system: System,
        config: RunConfig,
        holdings: Holdings,
        machine: Releases,
    ) -> None:
        self._system = system
        self._workdir = config.workdir
        self._env_files = config.env_files
        self._machine = machine  # its generations not yet gone, the release kept to go back
        self._env = holdings.generation_env  # gen -> its --env-file values
        self._dirs = holdings.generation_dirs  # gen -> the release it runs (pinned)
        self._env_errors: dict[GenId, str] = {}  # gen -> why its env files cannot be used

    def environment(self, gen: GenId) -> Mapping[str, str]:
        """The generation's --env-file values: read at its first spawn, then kept.
        Raise SpawnError (file, line, reason) if they cannot be read."""
        self._forget_gone(gen)
        if gen in self._env_errors:
            raise SpawnError(self._env_errors[gen])
        release = self._release_of(gen)
        if gen not in self._env and release in self._env:
            self._env[gen] = self._env[release]  # a rollback's restart: as it was
        if gen not in self._env:
            if not self._env_files:
                return {}
            try:
                variables = read_env_files(self._env_files)
            except HandoffError as exc:
                self._env_errors[gen] = exc.message
                raise SpawnError(exc.message) from None
            self._env[gen] = variables
            files = list(self._env_files)
            emit(EventName.ENV_FILES_LOADED, gen=gen, files=files, variables=len(variables))
        return self._env[gen]

    def directory(self, gen: GenId, live: Collection[Pid]) -> str | None:
        """Where a worker of gen starts (see the module docstring). live: the workers
        running now, whose directory can be asked when none was pinned (a child still on
        its way to exec, a master re-executed by a version that pinned nothing)."""
        generation = self._machine.generations.get(gen)
        release = self._release_of(gen)
        if self._workdir is None:
            return None
        if release in self._dirs:
            return self._dirs[release]  # a rollback's restart: the release it goes back to
        starting = generation is None or generation.state is GenerationState.STARTING
        if starting:
            return self._workdir
        if gen in self._dirs:
            return self._dirs[gen]
        assert generation is not None
        for worker in generation.workers.values():
            if worker.ready_at is not None and worker.pid in live:
                found = self._system.directory(worker.pid)
                if found is not None:
                    self._dirs[gen] = found
                    return found
        return self._workdir

    def spawned(self, gen: GenId, child: Child) -> None:
        """Pin the generation's directory to the one its first exec'd worker entered."""
        if self._workdir is not None and gen not in self._dirs and child.exec_seen:
            found = self._system.directory(child.pid)
            if found is not None:
                self._dirs[gen] = found

    def _release_of(self, gen: GenId) -> GenId | None:
        generation = self._machine.generations.get(gen)
        return None if generation is None else generation.release_of

    def _forget_gone(self, gen: GenId) -> None:
        live = self._machine.generations
        kept = {gen, *live, self._machine.previous_release}
        kept.update(g.release_of for g in live.values())
        for store in (self._env, self._dirs):
            for gone in [g for g in store if g not in kept]:
                del store[gone]
        self._env_errors = {g: why for g, why in self._env_errors.items() if g in live}
