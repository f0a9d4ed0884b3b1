"""The gateway link's hand-written AMQP codec agrees with pamqp in both directions."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import decode as pamqp_decode
from pamqp import frame as pamqp_frame
from pamqp.body import ContentBody
from pamqp.commands import Basic, Channel, Connection
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from workers.gateway import amqp_codec as codec
from workers.gateway.amqp_io import Prepared, Properties

# what pamqp can encode in a table (it refuses bytes)
header_values = st.recursive(
    st.one_of(
        st.text(max_size=40),
        st.integers(-(2**63), 2**63 - 1),
        st.booleans(),
        st.none(),
    ),
    lambda inner: st.dictionaries(st.text(min_size=1, max_size=10), inner, max_size=3),
    max_leaves=6,
)
header_tables = st.dictionaries(st.text(min_size=1, max_size=20), header_values, max_size=6)
# the replies the gateway gets: long strings and booleans (the decoder's own fast path)
reply_tables = st.dictionaries(
    st.text(min_size=1, max_size=20), st.one_of(st.text(max_size=60), st.booleans()), max_size=4
)
short = st.text(max_size=60).filter(lambda s: len(s.encode()) <= 255)
names = st.text(alphabet="abcXYZ019-_.:", max_size=127)  # what pamqp accepts as a name
frame_maxes = st.sampled_from([4096, 8192, 131072])


def pamqp_frames(data: bytes) -> list[tuple[int, Any]]:
    out = []
    while data:
        used, channel, value = pamqp_frame.unmarshal(data)
        out.append((channel, value))
        data = data[used:]
    return out


def content_frames(
    channel: int, properties: Basic.Properties, body: bytes, frame_max: int
) -> bytes:
    size = frame_max - 8
    out = [pamqp_frame.marshal(ContentHeader(0, len(body), properties), channel)]
    for start in range(0, len(body), size):
        out.append(pamqp_frame.marshal(ContentBody(body[start : start + size]), channel))
    return b"".join(out)


def props_dict(p: Basic.Properties) -> dict[str, Any]:
    return {k: getattr(p, k) for k in p.__slots__}


# -- our bytes decode with pamqp ------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    headers=header_tables,
    routing_key=short,
    body=st.binary(max_size=20000),
    message_id=st.text(alphabet="0123456789abcdef", min_size=1, max_size=40),
    channel=st.integers(1, 65535),
    frame_max=frame_maxes,
)
def test_publish_decodes_with_pamqp(
    headers: dict[str, Any],
    routing_key: str,
    body: bytes,
    message_id: str,
    channel: int,
    frame_max: int,
) -> None:
    prepared = Prepared(Properties(headers=headers, reply_to="gateway.reply.x", delivery_mode=2))
    data = codec.publish_method(channel, routing_key) + codec.encode_content(
        channel, prepared.prefix, message_id.encode(), body, frame_max
    )
    frames = pamqp_frames(data)
    assert all(ch == channel for ch, _ in frames)
    method, header = frames[0][1], frames[1][1]
    assert isinstance(method, Basic.Publish)
    assert (method.exchange, method.routing_key, method.mandatory) == ("", routing_key, True)
    assert isinstance(header, ContentHeader)
    assert header.body_size == len(body)
    want = Properties(
        headers=headers, reply_to="gateway.reply.x", delivery_mode=2, message_id=message_id
    )
    assert props_dict(header.properties) == props_dict(want)
    bodies = [f for _, f in frames[2:]]
    assert all(isinstance(f, ContentBody) and len(f.value) <= frame_max - 8 for f in bodies)
    assert b"".join(f.value for f in bodies) == body
    # the same bytes as pamqp's own encoding
    assert data == codec.publish_method(channel, routing_key) + content_frames(
        channel, want, body, frame_max
    )


def test_pamqp_content_for_other_properties() -> None:
    properties = Properties(headers={"x-dead-reason": "session_gone"}, priority=3, app_id="a")
    data = codec.encode_content_pamqp(5, properties, b"x" * 5000, 4096)
    frames = pamqp_frames(data)
    assert props_dict(frames[0][1].properties) == props_dict(properties)
    assert b"".join(f.value for _, f in frames[1:]) == b"x" * 5000


# -- pamqp's bytes decode with ours ---------------------------------------------------------


def deliver_bytes(
    channel: int, tag: int, redelivered: bool, exchange: str, routing_key: str,
    properties: Basic.Properties, body: bytes, frame_max: int, consumer_tag: str = "ctag",
) -> bytes:  # fmt: skip
    method = Basic.Deliver(
        consumer_tag=consumer_tag,
        delivery_tag=tag,
        redelivered=redelivered,
        exchange=exchange,
        routing_key=routing_key,
    )
    return pamqp_frame.marshal(method, channel) + content_frames(
        channel, properties, body, frame_max
    )


def view(event: codec.Event) -> tuple[Any, ...]:
    kind, channel, value = event
    if isinstance(value, codec.Delivery):
        d = value
        return (
            kind, channel, d.consumer_tag, d.delivery_tag, d.redelivered, d.exchange,
            d.routing_key, d.headers, d.body, props_dict(d.properties()),
        )  # fmt: skip
    if kind == codec.EV_METHOD:
        return (kind, channel, type(value).__name__, value.__dict__ if hasattr(value, "__dict__") else None)  # fmt: skip
    return (kind, channel, value)


@settings(max_examples=200, deadline=None)
@given(
    headers=st.one_of(header_tables, reply_tables),
    body=st.binary(max_size=20000),
    tag=st.integers(0, 2**63 - 1),
    redelivered=st.booleans(),
    exchange=names,
    routing_key=short,
    consumer_tag=short,
    channel=st.integers(1, 65535),
    frame_max=frame_maxes,
    correlation_id=st.one_of(st.none(), short),
    content_type=st.one_of(st.none(), short),
)
def test_deliver_from_pamqp(
    headers: dict[str, Any], body: bytes, tag: int, redelivered: bool, exchange: str,
    routing_key: str, consumer_tag: str, channel: int, frame_max: int,
    correlation_id: str | None, content_type: str | None,
) -> None:  # fmt: skip
    properties = Properties(
        headers=headers or None, correlation_id=correlation_id, content_type=content_type
    )
    data = deliver_bytes(
        channel, tag, redelivered, exchange, routing_key, properties, body, frame_max,
        consumer_tag,
    )  # fmt: skip
    decoder = codec.Decoder(frame_max)
    events = decoder.feed(data)
    assert len(events) == 1
    kind, ch, d = events[0]
    assert (kind, ch) == (codec.EV_DELIVER, channel)
    assert (d.consumer_tag, d.delivery_tag, d.redelivered) == (consumer_tag, tag, redelivered)
    assert (d.exchange, d.routing_key, d.body) == (exchange, routing_key, body)
    pamqp_header = pamqp_frames(pamqp_frame.marshal(ContentHeader(0, len(body), properties), 1))
    want = pamqp_header[0][1].properties
    assert d.headers == want.headers
    assert props_dict(d.properties()) == props_dict(want)


def test_long_string_that_is_not_utf8_stays_bytes_as_in_pamqp() -> None:
    raw = b"\xff\xfe"
    table = b"\x01kS" + len(raw).to_bytes(4, "big") + raw + b"\x01bt\x01"
    data = len(table).to_bytes(4, "big") + table
    ours, end = codec.decode_headers(data, 0)
    assert end == len(data)
    assert ours == pamqp_decode.field_table(data)[1] == {"k": raw, "b": True}


@given(tag=st.integers(0, 2**63 - 1), multiple=st.booleans(), requeue=st.booleans())
def test_ack_and_nack_from_pamqp(tag: int, multiple: bool, requeue: bool) -> None:
    data = pamqp_frame.marshal(Basic.Ack(delivery_tag=tag, multiple=multiple), 1)
    data += pamqp_frame.marshal(Basic.Nack(delivery_tag=tag, multiple=multiple, requeue=requeue), 3)
    assert codec.Decoder().feed(data) == [
        (codec.EV_ACK, 1, (tag, int(multiple))),
        (codec.EV_NACK, 3, (tag, int(multiple))),
    ]


def test_other_frames_from_pamqp() -> None:
    body = b"gone"
    data = b"".join(
        (
            pamqp_frame.marshal(Basic.ConsumeOk(consumer_tag="c1"), 2),
            pamqp_frame.marshal(Heartbeat(), 0),
            pamqp_frame.marshal(
                Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="", routing_key="q"),
                1,
            ),
            content_frames(1, Properties(message_id="m1"), body, 4096),
            pamqp_frame.marshal(
                Channel.Close(reply_code=404, reply_text="NOT_FOUND", class_id=0, method_id=0), 2
            ),
            pamqp_frame.marshal(Connection.Blocked(reason="memory"), 0),
        )
    )
    events = codec.Decoder().feed(data)
    assert [(k, ch) for k, ch, _ in events] == [
        (codec.EV_METHOD, 2),
        (codec.EV_HEARTBEAT, 0),
        (codec.EV_RETURN, 1),
        (codec.EV_METHOD, 2),
        (codec.EV_METHOD, 0),
    ]
    assert events[0][2].consumer_tag == "c1"
    ret = events[2][2]
    assert ret.method.reply_code == 312 and ret.routing_key == "q" and ret.body == body
    assert ret.properties().message_id == "m1"
    assert events[3][2].reply_code == 404
    assert events[4][2].reason == "memory"


def test_empty_body_delivery_has_no_body_frame() -> None:
    data = deliver_bytes(2, 7, False, "", "q", Properties(headers={"x-close": True}), b"", 4096)
    (event,) = codec.Decoder().feed(data)
    assert event[2].body == b"" and event[2].headers == {"x-close": True}


# -- segmentation ---------------------------------------------------------------------------


def stream() -> tuple[bytes, list[tuple[Any, ...]]]:
    parts = [
        pamqp_frame.marshal(Basic.Ack(delivery_tag=1, multiple=True), 1),
        deliver_bytes(
            2, 1, False, "", "r", Properties(headers={"x-session": "s1"}), b"a" * 9000, 4096
        ),
        pamqp_frame.marshal(Heartbeat(), 0),
        deliver_bytes(2, 2, True, "", "r", Properties(headers={"x-close": True}), b"", 4096),
        pamqp_frame.marshal(Basic.Nack(delivery_tag=5), 1),
        pamqp_frame.marshal(
            Channel.Close(reply_code=404, reply_text="x", class_id=0, method_id=0), 2
        ),
    ]
    data = b"".join(parts)
    return data, [view(e) for e in codec.Decoder(4096).feed(data)]


def test_split_at_every_byte() -> None:
    data, whole = stream()
    assert len(whole) == 6
    for cut in range(1, len(data)):
        decoder = codec.Decoder(4096)
        got = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        assert [view(e) for e in got] == whole, cut


def test_byte_by_byte() -> None:
    data, whole = stream()
    decoder = codec.Decoder(4096)
    got = []
    for i in range(len(data)):
        got += decoder.feed(data[i : i + 1])
    assert [view(e) for e in got] == whole


@given(cuts=st.lists(st.integers(0, 20000), max_size=12))
def test_any_segmentation(cuts: list[int]) -> None:
    data, whole = stream()
    points = sorted({c % (len(data) + 1) for c in cuts})
    decoder = codec.Decoder(4096)
    got: list[codec.Event] = []
    last = 0
    for p in [*points, len(data)]:
        got += decoder.feed(data[last:p])
        last = p
    assert [view(e) for e in got] == whole


# -- what is refused ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (pamqp_frame.marshal(Basic.Ack(delivery_tag=1), 1)[:-1] + b"\x00", "end byte"),
        (b"\x01\x00\x01\x00\x10\x00\x00", "frame_max"),
        (b"\x09\x00\x00\x00\x00\x00\x00\xce", "unknown frame type"),
        (pamqp_frame.marshal(ContentBody(b"x"), 1), "without its header"),
        (pamqp_frame.marshal(ContentHeader(0, 1, Properties()), 1), "without its method"),
        (b"\x01\x00\x01\x00\x00\x00\x04\x00\x3c\x00\x50\xce", "wrong size"),
    ],
)
def test_refused(data: bytes, why: str) -> None:
    with pytest.raises(codec.FrameError, match=why):
        codec.Decoder(4096).feed(data)


def test_more_body_than_announced_is_refused() -> None:
    data = pamqp_frame.marshal(
        Basic.Deliver(consumer_tag="c", delivery_tag=1, exchange="", routing_key="q"), 2
    )
    data += pamqp_frame.marshal(ContentHeader(0, 2, Properties()), 2)
    data += pamqp_frame.marshal(ContentBody(b"abc"), 2)
    with pytest.raises(codec.FrameError, match="more body"):
        codec.Decoder().feed(data)
