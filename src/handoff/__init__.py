"""handoff: a Linux process supervisor that owns the listening sockets.

The master binds the sockets once, hands them to worker processes, and reloads by
starting a new generation of workers that must prove readiness before the old one drains.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
