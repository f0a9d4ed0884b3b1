"""The lanes' hand-encoded basic.publish method frame (workers.delay.lanes.publish_method)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import frame as pamqp_frame
from pamqp.commands import Basic

from workers.delay.lanes import publish_method

PAMQP_NAMES = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:", max_size=127
)


@given(channel=st.integers(1, 65535), exchange=PAMQP_NAMES, routing_key=st.text(max_size=80))
def test_same_bytes_as_pamqp_where_pamqp_accepts_the_name(channel, exchange, routing_key):
    expected = pamqp_frame.marshal(
        Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True), channel
    )
    assert publish_method(channel, exchange, routing_key) == expected


@given(exchange=st.text(min_size=1, max_size=60).filter(lambda t: len(t.encode()) <= 255))
def test_names_pamqp_refuses_are_encoded_and_decode_back(exchange):
    frame = publish_method(1, exchange, "rk")
    # pamqp's decoder does not validate: the broker reads what was meant
    _, channel, method = pamqp_frame.unmarshal(frame)
    assert channel == 1
    assert isinstance(method, Basic.Publish)
    assert (method.exchange, method.routing_key, method.mandatory) == (exchange, "rk", True)


def test_too_long_is_refused():
    with pytest.raises(ValueError):
        publish_method(1, "x" * 256, "rk")
    with pytest.raises(ValueError):
        publish_method(1, "ok", "é" * 128)
