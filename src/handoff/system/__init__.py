"""The OS mechanics, one kernel facility each; no decisions and no logging.

``children`` (fork + execve, pidfds, reaping), ``signals`` (the wakeup-fd inbox),
``sockets`` (listeners), ``warden`` (kills worker groups if the master dies),
``detach`` (takes an old worker off the listening socket), ``process_tree`` (psutil:
descendants, kill trees, titles, usage), ``accepting_scan`` (/proc: who waits on the
socket), ``worker_notify`` (the master's notify socket), ``systemd_notify`` and
``systemd_sockets`` (talking to systemd, sockets it passes).
"""
