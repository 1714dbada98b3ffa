"""handoff: a Linux process supervisor that owns the listening sockets.

The invariant the whole product keeps: the listening sockets belong to the master and
never close while it runs, and a new generation of workers takes traffic only once every
one of its workers has proved it is ready; until then the old generation serves. So a
reload refuses no connection, and a broken release never replaces a working one.

The map (imports point down this list; docs/architecture.md has the whole picture):

- ``errors``: ``HandoffError`` (a message, a hint, an exit code), used by every layer.
- ``formats/``: pure parsers of what crosses a boundary: the options, the worker
  contract, the control protocol, /proc text, the log event names.
- ``core/``: the decisions, pure: ``Supervisor.handle(event, now) -> actions``, its
  records, events, actions, timers, readiness and respawn helpers.
- ``system/``: the OS mechanics, one kernel facility each: children and pidfds, signals,
  sockets, the warden, detaching, process trees, the accepting scan, notify sockets,
  systemd's sockets.
- ``master/``: the event loop and the pieces it delegates to (workers, probes, systemd,
  the control server, status, logs), reaching the kernel through the ``System`` seam.
- ``cli/``: the click commands and the control client.
- ``demo/``: ``handoff demo``, its app, the reload drill and the load generator; the
  master never imports it.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
