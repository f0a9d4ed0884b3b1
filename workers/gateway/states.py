"""The life of a gateway session as a pure state machine: its states, the events that move
it, and the one table of allowed moves. :class:`~workers.gateway.session.Session` drives it
from its socket callbacks; nothing here does I/O.

::

    HANDSHAKE --hello/accept--> JOINING --welcome--> OPEN
        |                   |                   |
        +------close--------+-------close-------+--> CLOSING --lost--> CLOSED
        +------lost---------+-------lost--------+-------------------->

States are ordered as a session lives them, so ``state >= CLOSING`` reads "no longer takes
input" and ``state < OPEN`` "not welcomed yet".
"""

from __future__ import annotations

import enum


class State(enum.IntEnum):
    HANDSHAKE = 0  # accepted, waiting for HELLO (or a PROXY protocol header)
    JOINING = 1  # HELLO accepted, waiting for a server
    OPEN = 2  # WELCOME sent: DATA flows both ways
    CLOSING = 3  # BYE or ERROR written, the socket is closing
    CLOSED = 4  # the socket is gone (publishing of what was read goes on)

    @property
    def label(self) -> str:
        """The name in the admin views and logs."""
        return self.name.lower()


class Event(enum.Enum):
    HELLO = "hello"  # a HELLO was accepted
    ACCEPT = "accept"  # a listener without HELLO (length, lines, raw) took the connection
    WELCOME = "welcome"  # the balancer gave the session a server
    CLOSE = "close"  # the gateway closes (BYE, ERROR)
    LOST = "lost"  # the socket went


class InvalidTransition(Exception):
    """An event the state does not take: a bug in the driver, never the client's doing."""


_LIVE = (State.HANDSHAKE, State.JOINING, State.OPEN)

TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.HANDSHAKE, Event.HELLO): State.JOINING,
    (State.HANDSHAKE, Event.ACCEPT): State.JOINING,
    (State.JOINING, Event.WELCOME): State.OPEN,
    **{(s, Event.CLOSE): State.CLOSING for s in _LIVE},
    **{(s, Event.LOST): State.CLOSED for s in (*_LIVE, State.CLOSING)},
}


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise InvalidTransition(f"{event.value} in state {state.label}") from None
