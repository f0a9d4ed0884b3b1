"""The gateway's hand-assembled publish frames are byte for byte what pamqp writes."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from aiormq.abc import ChannelFrame
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from workers.gateway.amqp_io import BatchPublisher, Prepared, Properties

# what pamqp can encode in a table (it refuses bytes)
header_values = st.one_of(
    st.text(max_size=40), st.integers(-(2**31), 2**31 - 1), st.booleans(), st.none()
)


def reference(channel: Any, routing_key: str, body: bytes, properties: Properties) -> bytes:
    size = channel.max_content_size
    bodies = [ContentBody(body[i : i + size]) for i in range(0, len(body), size)]
    frames = [
        Basic.Publish(exchange="", routing_key=routing_key, mandatory=True),
        ContentHeader(properties=properties, body_size=len(body)),
        *bodies,
    ]
    return ChannelFrame.marshall(channel_number=channel.number, frames=frames).payload


def encode(channel: Any, routing_key: str, body: bytes, prepared: Prepared, mid: str) -> bytes:
    publisher = BatchPublisher.__new__(BatchPublisher)
    publisher._methods = {}
    loop = asyncio.new_event_loop()
    try:
        fut = loop.create_future()
        return publisher._encode(channel, (routing_key, body, prepared, fut, 0.0), mid)
    finally:
        loop.close()


@settings(max_examples=300, deadline=None)
@given(
    headers=st.dictionaries(st.text(min_size=1, max_size=20), header_values, max_size=6),
    reply_to=st.one_of(st.none(), st.text(max_size=60)),
    delivery_mode=st.sampled_from([None, 1, 2]),
    content_type=st.one_of(st.none(), st.text(max_size=20)),
    body=st.binary(max_size=700),
    max_content=st.sampled_from([50, 256, 131064]),
    number=st.integers(1, 2047),
    routing_key=st.text(max_size=60),
    counter=st.integers(1, 2**40),
)
def test_prepared_frames_equal_pamqp(
    headers: dict[str, Any],
    reply_to: str | None,
    delivery_mode: int | None,
    content_type: str | None,
    body: bytes,
    max_content: int,
    number: int,
    routing_key: str,
    counter: int,
) -> None:
    channel = SimpleNamespace(number=number, max_content_size=max_content)
    fields: dict[str, Any] = {
        "headers": headers or None,
        "reply_to": reply_to,
        "delivery_mode": delivery_mode,
        "content_type": content_type,
    }
    mid = f"abc{counter:x}"
    expected = reference(channel, routing_key, body, Properties(**fields, message_id=mid))
    assert encode(channel, routing_key, body, Prepared(Properties(**fields)), mid) == expected


def test_gateway_data_properties() -> None:
    channel = SimpleNamespace(number=1, max_content_size=131064)
    fields: dict[str, Any] = {
        "headers": {
            "x-event": "data",
            "x-session": "0123456789abcdef0123456789abcdef",
            "x-client-id": "",
            "x-client-addr": "127.0.0.1:40000",
            "x-gateway": "host-1234",
        },
        "reply_to": "gateway.reply.host-1234",
        "delivery_mode": 2,
    }
    body = b"p" * 256
    expected = reference(channel, "gateway.server.s1", body, Properties(**fields, message_id="m1"))
    assert encode(channel, "gateway.server.s1", body, Prepared(Properties(**fields)), "m1") == (
        expected
    )


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"message_id": "set"}, id="message-id-set"),
        pytest.param({"app_id": "after-message-id"}, id="field-after-message-id"),
        pytest.param({"timestamp": None, "message_type": "t"}, id="type-after-message-id"),
    ],
)
def test_prepared_refuses_what_it_cannot_encode(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Prepared(Properties(**fields))


def test_prepared_unencodable_header_raises() -> None:
    # A lone surrogate cannot be UTF-8: the worker then falls back to the pamqp path, which
    # fails the publish as "unencodable" (tests/integration/test_gateway_faults.py).
    with pytest.raises(UnicodeEncodeError):
        Prepared(Properties(headers={"x-client-id": "\ud800"}))
