"""The decisions, pure: no OS, clock or logging, so tests replay exact event sequences.

``machine.Supervisor.handle(event, now) -> actions`` is the only code that changes the
records of ``model``; ``readiness`` and ``respawn`` are helpers it owns that return
actions. ``events`` are its inputs, ``actions`` its outputs, ``timers`` a heap of named
deadlines, ``policy`` its settings and arithmetic.
"""
