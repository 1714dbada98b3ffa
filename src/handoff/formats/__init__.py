"""Pure parsers and vocabularies of what crosses a boundary: no OS, clock or logging.

``options`` (the command line), ``worker_contract`` (what a worker gets: fds,
environment, placeholders, the notify wire format), ``control_protocol`` (the control
socket's lines), ``procfs`` (what /proc says about a waiting process), ``log_events``
(the names of the master's log events).
"""
