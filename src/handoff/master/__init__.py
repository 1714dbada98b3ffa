"""The master process: its lifetime, its event loop and the pieces the loop delegates to.

``serve`` (start-up and clean-up order), ``loop`` (one thread, one selector: turn, feed,
execute), ``sources`` (what the loop waits on), ``system`` (the seam to the kernel),
``workers`` (the worker table), ``probes`` (readiness probes, scans, detaching),
``systemd`` (notifications, watchdog, fd store), ``control_server`` and
``reload_progress`` (the control socket), ``status``, ``logs``.
"""
