"""The listening sockets at a stop: shut their door, close them once nobody accepts.

A stop takes every worker off the sockets. Were the master to keep its copy open until it
exits, a connection arriving meanwhile would wait in the accept queue for nobody and be
reset at the exit (a balancer sees a hang, then a reset). Instead, at the start of the
stop, new handshakes are dropped (system/listener_door.py) while the workers, still on the
sockets through the settle, take what is queued; once no worker accepts, the master
closes its copy: when the draining workers have closed theirs, a new connection is
refused at once. What was still queued then is counted (``dropped``, target 0).

A socket systemd holds too (passed to us, ``fd:``, or kept in its fd store) is left as it
is: it outlives this master, and what waits in its queue is the next master's to serve.
"""

from __future__ import annotations

from collections.abc import Iterable

from handoff.core import actions as act
from handoff.formats.log_events import EventName
from handoff.formats.options import BindKind
from handoff.master.logs import emit
from handoff.system.listen_queue import accept_queue
from handoff.system.listener_door import refuse_new_connections
from handoff.system.sockets import Listener, close_listeners


def at_stop(
    step: act.StopTakingConnections | act.CloseListeners, listeners: Iterable[Listener]
) -> int:
    """Carry out one of the machine's stop steps; the connections it dropped."""
    if isinstance(step, act.CloseListeners):
        return close_listeners_early(listeners)
    stop_taking_connections(listeners)
    return 0


def held_alone(listeners: Iterable[Listener]) -> list[Listener]:
    """The listeners no one outside this master holds, still open."""
    return [
        lst
        for lst in listeners
        if lst.spec.kind is not BindKind.FD and not lst.stored and lst.sock.fileno() >= 0
    ]


def queued(listener: Listener) -> int:
    """Connections waiting in a TCP listener's accept queue (0 for a unix socket)."""
    found = accept_queue(listener.sock)
    return 0 if found is None else found[0]


def stop_taking_connections(listeners: Iterable[Listener]) -> None:
    for listener in held_alone(listeners):
        if refuse_new_connections(listener.sock):
            emit(EventName.LISTENER_CLOSING, address=listener.address, queued=queued(listener))


def close_listeners_early(listeners: Iterable[Listener]) -> int:
    """Close the master's copy of every listener it alone holds; the connections dropped."""
    dropped = 0
    for listener in held_alone(listeners):
        left = queued(listener)
        close_listeners([listener])  # a unix socket's file goes too: a connect finds none
        emit(EventName.LISTENER_CLOSED, address=listener.address, dropped=left)
        dropped += left
    return dropped


def abandoned_connections(listeners: Iterable[Listener]) -> int:
    """At exit: what waits on the listeners this master alone still holds (reset at close)."""
    return sum(queued(listener) for listener in held_alone(listeners))
