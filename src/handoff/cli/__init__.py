"""The ``handoff`` command line: ``main`` (click, errors, exit codes), and the control
commands (``reload``, ``status``, ``stop``, ``scale``) with their client."""
