"""The OS mechanics, one kernel facility each; no decisions and no logging.

``children`` (fork + execve, pidfds, reaping), ``signals`` (the wakeup-fd inbox),
``sockets`` (listeners), ``warden`` (kills worker groups if the master dies),
``detach`` (takes an old worker off the listening socket), ``process_tree`` (/proc:
trees, kill trees, strays; psutil for usage; titles), ``accepting_scan`` (/proc: who waits on the
socket), ``worker_notify`` (the master's notify socket), ``systemd_notify`` and
``systemd_sockets`` (talking to systemd, sockets it passes), ``runtime_files`` (the
control directory, socket files, the pidfile), ``output_relay`` (between the workers'
output and a log reader), ``adoption`` (the children a re-executed master finds).
"""
