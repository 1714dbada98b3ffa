"""The names of the master's log events: one enumeration, catalogued in docs/events.md.

Pure. A log event is output (JSON lines for journald, log shippers and the drill that
reads them), so its name is a stable contract: renaming one is a breaking change. Inside
the master the same names tell the control server and the systemd glue what happened
(``Report.event``); they match on these members, never on string literals, so a typo
fails mypy instead of production. tests/unit/test_events_doc.py checks this enumeration
against docs/events.md in both directions.
"""

from __future__ import annotations

from enum import StrEnum


class EventName(StrEnum):
    """Every event the master logs, as ``noun.past_verb``."""

    LISTENER_BOUND = "listener.bound"
    LISTENER_STORED = "listener.stored"
    LISTENER_UNUSED = "listener.unused"
    LISTENER_CLOSING = "listener.closing"
    LISTENER_CLOSED = "listener.closed"
    MASTER_STARTED = "master.started"
    MASTER_READY = "master.ready"
    MASTER_NEVER_READY = "master.never_ready"
    MASTER_GAVE_UP = "master.gave_up"
    MASTER_LEAVING = "master.leaving"
    MASTER_STOPPING = "master.stopping"
    MASTER_EXITED = "master.exited"
    MASTER_CRASHED = "master.crashed"
    MASTER_REEXECUTING = "master.reexecuting"
    MASTER_RESUMED = "master.resumed"
    MASTER_CRASH_LOOP = "master.crash_loop"
    MASTER_REEXEC_FAILED = "master.reexec_failed"
    PIDFILE_LOST = "pidfile.lost"
    UPGRADE_REQUESTED = "upgrade.requested"
    UPGRADE_REFUSED = "upgrade.refused"
    UPGRADE_FAILED = "upgrade.failed"
    UPGRADE_SUCCEEDED = "upgrade.succeeded"
    CONTROL_LISTENING = "control.listening"
    CONTROL_REFUSED = "control.refused"
    HEALTH_LISTENING = "health.listening"
    HEALTH_REFUSED = "health.refused"
    MASTER_SCALED = "master.scaled"
    SCALE_REFUSED = "scale.refused"
    SIGNAL_FORWARDED = "signal.forwarded"
    READINESS_UNAVAILABLE = "readiness.unavailable"
    READINESS_LIMITED = "readiness.limited"
    WARDEN_EXITED = "warden.exited"
    STRAY_REAPED = "stray.reaped"
    STRAY_KILLED = "stray.killed"
    NOTIFY_IGNORED = "notify.ignored"
    RELOAD_REQUESTED = "reload.requested"
    RELOAD_QUEUED = "reload.queued"
    RELOAD_REFUSED = "reload.refused"
    RELOAD_SUCCEEDED = "reload.succeeded"
    RELOAD_FAILED = "reload.failed"
    RELOAD_ROLLED_BACK = "reload.rolled_back"
    RELOAD_CONFIRMED = "reload.confirmed"
    ROLLBACK_REFUSED = "rollback.refused"
    ROLLOUT_BATCH = "rollout.batch"
    CANARY_READY = "canary.ready"
    CANARY_PROMOTED = "canary.promoted"
    PROMOTE_REFUSED = "promote.refused"
    ROLLBACK_FINISHED = "rollback.finished"
    RESCUE_UNAVAILABLE = "rescue.unavailable"
    RESCUE_COPIED = "rescue.copied"
    RESCUE_RELEASED = "rescue.released"
    RESCUE_FINISHED = "rescue.finished"
    VERIFY_FAILED = "verify.failed"
    GENERATION_STARTED = "generation.started"
    GENERATION_ACTIVE = "generation.active"
    GENERATION_FAILED = "generation.failed"
    GENERATION_DRAINING = "generation.draining"
    GENERATION_PARKED = "generation.parked"
    GENERATION_RESTORED = "generation.restored"
    GENERATION_RESIZED = "generation.resized"
    GENERATION_GONE = "generation.gone"
    WORKER_SPAWNED = "worker.spawned"
    WORKER_SPAWN_FAILED = "worker.spawn_failed"
    WORKER_READY = "worker.ready"
    WORKER_NOT_READY = "worker.not_ready"
    WORKER_PROBE_FAILED = "worker.probe_failed"
    WORKER_SIGNALLED = "worker.signalled"
    WORKER_DETACHED = "worker.detached"
    WORKER_NOT_PARKED = "worker.not_parked"
    WORKER_REATTACHED = "worker.reattached"
    WORKER_KILLED = "worker.killed"
    WORKER_EXITED = "worker.exited"
    WORKER_RESPAWN_SCHEDULED = "worker.respawn_scheduled"
    WORKER_CRASH_LOOP = "worker.crash_loop"
    WORKER_OUTPUT = "worker.output"
    ENV_FILES_LOADED = "env_files.loaded"
    DETACH_UNAVAILABLE = "detach.unavailable"


class Level(StrEnum):
    """A log event's level."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
