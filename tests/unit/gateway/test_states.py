"""The gateway session's state machine (workers.gateway.states): the table of moves."""

from __future__ import annotations

import itertools

import pytest

from workers.gateway.states import TRANSITIONS, Event, InvalidTransition, State, next_state

ALLOWED = {
    (State.HANDSHAKE, Event.HELLO): State.JOINING,
    (State.HANDSHAKE, Event.ACCEPT): State.JOINING,
    (State.JOINING, Event.WELCOME): State.OPEN,
    (State.HANDSHAKE, Event.CLOSE): State.CLOSING,
    (State.JOINING, Event.CLOSE): State.CLOSING,
    (State.OPEN, Event.CLOSE): State.CLOSING,
    (State.HANDSHAKE, Event.LOST): State.CLOSED,
    (State.JOINING, Event.LOST): State.CLOSED,
    (State.OPEN, Event.LOST): State.CLOSED,
    (State.CLOSING, Event.LOST): State.CLOSED,
}


@pytest.mark.parametrize(("state", "event"), list(itertools.product(State, Event)))
def test_every_state_and_event(state: State, event: Event) -> None:
    if (state, event) in ALLOWED:
        assert next_state(state, event) is ALLOWED[state, event]
    else:
        with pytest.raises(InvalidTransition, match=f"{event.value} in state {state.label}"):
            next_state(state, event)


def test_the_table_is_exactly_the_allowed_moves() -> None:
    assert TRANSITIONS == ALLOWED


def test_closed_is_final_and_every_state_reaches_it() -> None:
    assert not any(state is State.CLOSED for state, _ in TRANSITIONS)
    for state in State:
        seen, todo = {state}, [state]
        while todo:
            here = todo.pop()
            for (src, _), dst in TRANSITIONS.items():
                if src is here and dst not in seen:
                    seen.add(dst)
                    todo.append(dst)
        assert State.CLOSED in seen


def test_states_are_ordered_as_a_session_lives_them() -> None:
    for (src, _), dst in TRANSITIONS.items():
        assert dst > src
    assert [s.label for s in State] == ["handshake", "joining", "open", "closing", "closed"]
