"""The gateway benchmark's split of a round trip: the client's send clock and the echo
backend's receive clock travel in the payload."""

from __future__ import annotations

import time

from bench.gateway.clients import PAYLOAD, STAMP, legs, stamped
from bench.gateway.processes import stamp_echo
from workers.gateway.backend import ServerEvent
from workers.gateway.config import EVENT_DATA


def _event(body: bytes, event: str = EVENT_DATA) -> ServerEvent:
    return ServerEvent(event, "s", None, None, None, body, "reply")


def test_the_two_legs_add_up_to_the_round_trip_and_keep_the_payload():
    started = time.monotonic_ns()
    sent = stamped()
    assert len(sent) == len(PAYLOAD) and sent[STAMP.size :] == PAYLOAD[STAMP.size :]
    time.sleep(0.002)
    (reply,) = stamp_echo(_event(sent))
    time.sleep(0.003)
    now = time.monotonic_ns()
    split = legs(reply.body, now)
    assert split is not None
    to_backend, from_backend = split
    assert 0.002 <= to_backend and 0.003 <= from_backend
    assert abs((to_backend + from_backend) - (now - STAMP.unpack_from(sent)[0]) / 1e9) < 1e-9
    assert (now - started) / 1e9 >= to_backend + from_backend
    assert reply.body[STAMP.size :] == sent[STAMP.size :]


def test_an_echo_that_did_not_pass_the_backend_has_no_legs():
    # the direct TCP echo server returns the bytes unchanged: no backend clock in them
    assert legs(stamped(), time.monotonic_ns()) is None
    assert legs(b"short", time.monotonic_ns()) is None


def test_connect_and_disconnect_events_get_no_answer():
    assert stamp_echo(_event(b"", "connect")) == []
