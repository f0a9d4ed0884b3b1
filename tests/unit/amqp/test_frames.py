"""bridge.amqp.frames: round trips, byte identity with pamqp, and a decoder that only ever
raises DecodeError, however the bytes are split, damaged or nested."""

from __future__ import annotations

import datetime
import decimal
import random
import struct
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import commands as pamqp_commands
from pamqp import constants as pamqp_constants
from pamqp import decode as pamqp_decode
from pamqp import encode as pamqp_encode
from pamqp import frame as pamqp_frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from bridge.amqp import frames

FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MEDIUM = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

UTC = datetime.UTC
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

# -- strategies ----------------------------------------------------------------------------


def _cut(text: str, limit: int) -> str:
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# any short string: up to 255 bytes of UTF-8, with the limits themselves drawn often
shortstrs = st.one_of(
    st.text(max_size=255).map(lambda s: _cut(s, 255)),
    st.sampled_from(["", "a" * 255, "é" * 127 + "a", "€" * 85, "\x00", "a b"]),
)
# the names pamqp accepts (its exchange/queue regex, at most 127 characters)
_NAME_RE = pamqp_constants.DOMAIN_REGEX["exchange-name"]
pamqp_names = st.one_of(
    st.text(alphabet="abcXYZ019-_.:@#,/+ ", max_size=127),
    st.sampled_from(["", "amq.direct", "x" * 127]),
)
# the names RabbitMQ accepts and pamqp refuses: non-ASCII, other punctuation, 128-255 bytes
refused_names = st.one_of(
    st.text(min_size=1, max_size=255)
    .map(lambda s: _cut(s, 255))
    .filter(lambda s: not (_NAME_RE.fullmatch(s) and len(s) <= 127)),
    st.sampled_from(["ünïcödé", "a!b*c$", "x" * 128, "y" * 255, "é" * 127, "日本語 queue"]),
)
not_utf8 = st.binary(min_size=1, max_size=40).filter(lambda b: not _is_utf8(b))

INT_EDGES = [
    0,
    -1,
    -128,
    -129,
    127,
    128,
    -32768,
    -32769,
    32767,
    32768,
    65535,
    65536,
    -(2**31),
    -(2**31) - 1,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    -(2**63),
    2**63 - 1,
]
int64s = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from(INT_EDGES))
f32s = st.floats(width=32, allow_nan=False)  # exactly representable: survive the 'f' type


def _pamqp_decimal_ok(value: decimal.Decimal) -> bool:
    try:
        pamqp_encode.decimal(value)
    except TypeError:
        return False
    return True


decimals = st.builds(
    lambda m, s: decimal.Decimal(m).scaleb(s),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-12, 2),
).filter(_pamqp_decimal_ok)
timezones = st.sampled_from(
    [
        UTC,
        datetime.timezone(datetime.timedelta(hours=5, minutes=30)),
        datetime.timezone(-datetime.timedelta(hours=8)),
    ]
)
# aware, whole seconds, 1970..2105 (beyond 2106 AMQP timestamps are read as milliseconds)
datetimes = st.datetimes(
    min_value=datetime.datetime(1970, 1, 2),
    max_value=datetime.datetime(2105, 12, 31),
    timezones=timezones,
).map(lambda d: d.replace(microsecond=0))

# leaves both codecs encode and that come back as they went
common_leaves = st.one_of(
    st.text(max_size=30),
    int64s,
    st.booleans(),
    st.none(),
    f32s,
    decimals,
    datetimes,
    st.binary(max_size=20).map(bytearray),
)
table_keys = st.text(max_size=12)
# over 128 bytes: both codecs cut them (not splitting a character)
long_keys = st.builds(
    lambda prefix, char, n: prefix + char * n,
    st.text(max_size=3),
    st.sampled_from(["k", "é", "€", "\U0001f600"]),
    st.integers(40, 140),
)


def _tables(leaves: st.SearchStrategy[Any], keys: st.SearchStrategy[str]) -> Any:
    values = st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)
        ),
        max_leaves=6,
    )
    return st.dictionaries(keys, values, max_size=5)


common_tables = _tables(common_leaves, table_keys)
pamqp_tables = _tables(common_leaves, st.one_of(table_keys, long_keys))
# ours also carries long strings that are not UTF-8 (as bytes, as pamqp decodes them)
our_tables = _tables(st.one_of(common_leaves, not_utf8), table_keys)

channels = st.integers(0, 65535)


def typed(value: Any) -> Any:
    """A value with the type of every leaf made explicit (True == 1 and 1.0 == 1 otherwise)."""
    if isinstance(value, dict):
        return ("dict", {k: typed(v) for k, v in value.items()})
    if isinstance(value, list):
        return ("list", [typed(v) for v in value])
    if type(value) is frames.Double:  # a float that remembers it came as d (pamqp: float)
        return ("float", value)
    return (type(value).__name__, value)


# -- methods -------------------------------------------------------------------------------

ALL_METHODS = list(frames.METHODS.values())
CONTENT_METHODS = {frames.BasicDeliver, frames.BasicReturn}
PLAIN_METHODS = [cls for cls in ALL_METHODS if cls not in CONTENT_METHODS]
NAME_FIELDS = {"queue", "exchange"}


def pamqp_class(cls: type[frames.Method]) -> Any:
    class_id, method_id = cls.INDEX
    return pamqp_commands.INDEX_MAPPING[(class_id << 16) | method_id]


def public_fields(cls: type[frames.Method]) -> list[tuple[str, str]]:
    return [(name, kind) for name, kind, _ in cls.FIELDS if name[0] != "_"]


def _our_kind(name: str, kind: str) -> st.SearchStrategy[Any]:
    return {
        "shortstr": shortstrs,
        "longstr": st.one_of(st.text(max_size=300), not_utf8),
        "octet": st.integers(0, 255),
        "short": st.integers(0, 65535),
        "long": st.integers(0, 2**32 - 1),
        "longlong": st.integers(0, 2**64 - 1),
        "bit": st.booleans(),
        "table": our_tables,
    }[kind]


def _pamqp_kind(name: str, kind: str) -> st.SearchStrategy[Any]:
    if kind == "shortstr" and name in NAME_FIELDS:
        return pamqp_names
    if kind == "shortstr" and name == "virtual_host":
        return st.text(max_size=127).map(lambda s: _cut(s, 255))
    return {
        "shortstr": shortstrs,
        "longstr": st.text(max_size=300),
        "octet": st.integers(0, 255),
        "short": st.integers(0, 65535),
        "long": st.integers(0, 2**32 - 1),
        "longlong": st.integers(0, 2**63 - 1),  # pamqp packs longlong signed
        "bit": st.booleans(),
        "table": pamqp_tables,
    }[kind]


def our_fields(cls: type[frames.Method]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({n: _our_kind(n, k) for n, k in public_fields(cls)})


def pamqp_fields(cls: type[frames.Method]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({n: _pamqp_kind(n, k) for n, k in public_fields(cls)})


def method_values(method: Any) -> dict[str, Any]:
    return {n: typed(getattr(method, n)) for n, _ in public_fields(type(method))}


def test_every_method_has_its_pamqp_twin_with_the_same_fields() -> None:
    assert len(ALL_METHODS) >= 30
    for cls in ALL_METHODS:
        twin = pamqp_class(cls)
        ours = [(name.lstrip("_"), kind) for name, kind, _ in cls.FIELDS]
        theirs = [(slot, twin.amqp_type(slot)) for slot in twin.__slots__]
        assert ours == theirs, cls.NAME
        assert frames.METHODS[cls.INDEX] is cls


@pytest.mark.parametrize("cls", PLAIN_METHODS, ids=lambda c: c.NAME)
@FAST
@given(data=st.data(), channel=channels)
def test_method_round_trips(cls: type[frames.Method], data: st.DataObject, channel: int) -> None:
    method = cls(**data.draw(our_fields(cls)))
    events = frames.Decoder().feed(frames.method_frame(channel, method))
    assert events == [(channel, method)]
    (_, decoded) = events[0]
    assert type(decoded) is cls
    assert method_values(decoded) == method_values(method)


@pytest.mark.parametrize("cls", ALL_METHODS, ids=lambda c: c.NAME)
@FAST
@given(data=st.data(), channel=channels)
def test_method_frame_is_what_pamqp_writes(
    cls: type[frames.Method], data: st.DataObject, channel: int
) -> None:
    fields = data.draw(pamqp_fields(cls))
    ours = frames.method_frame(channel, cls(**fields))
    assert ours == pamqp_frame.marshal(pamqp_class(cls)(**fields), channel)


@pytest.mark.parametrize("cls", sorted(CONTENT_METHODS, key=lambda c: c.NAME), ids=lambda c: c.NAME)
@FAST
@given(
    data=st.data(),
    channel=st.integers(1, 65535),
    body=st.binary(max_size=300),
    frame_max=st.sampled_from([9, 17, 64, 4096]),
)
def test_deliver_and_return_come_out_with_their_content(
    cls: type[frames.Method], data: st.DataObject, channel: int, body: bytes, frame_max: int
) -> None:
    method = cls(**data.draw(our_fields(cls)))
    fields = data.draw(our_property_fields)
    props = frames.Properties(**fields)
    decoder = frames.Decoder(frame_max=0)
    assert decoder.feed(frames.method_frame(channel, method)) == []  # not before its content
    content = frames.content_frames(channel, props.encode(), body, frame_max)
    events = decoder.feed(content)
    assert len(events) == 1
    got_channel, delivery = events[0]
    assert got_channel == channel == delivery.channel
    expected_type = frames.Delivery if cls is frames.BasicDeliver else frames.Returned
    assert type(delivery) is expected_type
    for name, _ in public_fields(cls):
        assert typed(getattr(delivery, name)) == typed(getattr(method, name)), name
    assert delivery.body == body
    assert delivery.properties == _expected_after_round_trip(fields)
    assert typed(delivery.headers) == typed(props.headers)
    assert delivery.raw_properties == props.encode()
    assert delivery.properties.error is None
    assert decoder.feed(b"") == []


# -- publish, ack, nack, content -----------------------------------------------------------


@MEDIUM
@given(channel=channels, exchange=pamqp_names, routing_key=shortstrs, mandatory=st.booleans())
def test_publish_frame_is_what_pamqp_writes(
    channel: int, exchange: str, routing_key: str, mandatory: bool
) -> None:
    ours = frames.publish_frame(channel, exchange, routing_key, mandatory)
    publish = pamqp_commands.Basic.Publish(
        exchange=exchange, routing_key=routing_key, mandatory=mandatory
    )
    assert ours == pamqp_frame.marshal(publish, channel)
    method = frames.BasicPublish(exchange=exchange, routing_key=routing_key, mandatory=mandatory)
    assert ours == frames.method_frame(channel, method)


tags = st.one_of(st.integers(0, 2**63 - 1), st.sampled_from([0, 1, 255, 256, 2**32, 2**63 - 1]))


@MEDIUM
@given(channel=channels, tag=tags, multiple=st.booleans(), requeue=st.booleans())
def test_ack_and_nack_frames_are_what_pamqp_writes(
    channel: int, tag: int, multiple: bool, requeue: bool
) -> None:
    ack = frames.ack_frame(channel, tag, multiple)
    assert ack == pamqp_frame.marshal(pamqp_commands.Basic.Ack(tag, multiple), channel)
    nack = frames.nack_frame(channel, tag, multiple, requeue)
    expected = pamqp_frame.marshal(pamqp_commands.Basic.Nack(tag, multiple, requeue), channel)
    assert nack == expected
    decoded = frames.Decoder().feed(ack + nack)
    assert decoded == [
        (channel, frames.BasicAck(delivery_tag=tag, multiple=multiple)),
        (channel, frames.BasicNack(delivery_tag=tag, multiple=multiple, requeue=requeue)),
    ]


@MEDIUM
@given(
    channel=channels, tag=st.integers(0, 2**64 - 1), multiple=st.booleans(), requeue=st.booleans()
)
def test_ack_and_nack_round_trip_the_whole_unsigned_range(
    channel: int, tag: int, multiple: bool, requeue: bool
) -> None:
    stream = frames.ack_frame(channel, tag, multiple) + frames.nack_frame(
        channel, tag, multiple, requeue
    )
    (_, ack), (_, nack) = frames.Decoder().feed(stream)
    assert (ack.delivery_tag, ack.multiple) == (tag, multiple)
    assert (nack.delivery_tag, nack.multiple, nack.requeue) == (tag, multiple, requeue)


def pamqp_content(
    channel: int, properties: pamqp_commands.Basic.Properties, body: bytes, frame_max: int
) -> bytes:
    size = frame_max - 8
    out = [pamqp_frame.marshal(ContentHeader(0, len(body), properties), channel)]
    for start in range(0, len(body), size):
        out.append(pamqp_frame.marshal(ContentBody(body[start : start + size]), channel))
    return b"".join(out)


@st.composite
def frame_max_and_body(draw: st.DrawFn) -> tuple[int, bytes]:
    frame_max = draw(st.one_of(st.sampled_from([9, 10, 16, 4096, 131072]), st.integers(9, 3000)))
    chunk = frame_max - 8
    edges = [0, 1, chunk - 1, chunk, chunk + 1, 2 * chunk, 2 * chunk + 1, 3 * chunk]
    size = draw(st.one_of(st.sampled_from(edges), st.integers(0, 3 * chunk + 1)))
    seed = draw(st.integers(0, 2**32))
    return frame_max, random.Random(seed).randbytes(size)


@MEDIUM
@given(channel=st.integers(1, 65535), fm_body=frame_max_and_body(), data=st.data())
def test_content_frames_are_what_pamqp_writes(
    channel: int, fm_body: tuple[int, bytes], data: st.DataObject
) -> None:
    frame_max, body = fm_body
    fields = data.draw(property_fields)
    ours = frames.content_frames(channel, frames.Properties(**fields).encode(), body, frame_max)
    assert ours == pamqp_content(channel, pamqp_properties(fields), body, frame_max)
    # and they decode back (a real frame_max is at least 4096; smaller ones: no limit)
    decoder = frames.Decoder(frame_max=frame_max if frame_max >= 4096 else 0)
    deliver = frames.BasicDeliver(consumer_tag="c", delivery_tag=7, exchange="x", routing_key="k")
    events = decoder.feed(frames.method_frame(channel, deliver) + ours)
    assert len(events) == 1
    assert events[0][1].body == body
    assert events[0][1].properties == _expected_after_round_trip(fields)


# -- properties ----------------------------------------------------------------------------

_PROPERTY_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "content_type": shortstrs,
    "content_encoding": shortstrs,
    "headers": common_tables,
    "delivery_mode": st.sampled_from([1, 2]),
    "priority": st.integers(0, 255),
    "correlation_id": shortstrs,
    "reply_to": shortstrs,
    "expiration": shortstrs,
    "message_id": shortstrs,
    "timestamp": datetimes,
    "type": shortstrs,
    "user_id": shortstrs,
    "app_id": shortstrs,
}
property_fields = st.fixed_dictionaries({}, optional=_PROPERTY_STRATEGIES)
# what ours carries beyond pamqp: bytes in headers, cluster_id, any delivery mode
our_property_fields = st.fixed_dictionaries(
    {},
    optional={
        **_PROPERTY_STRATEGIES,
        "headers": our_tables,
        "delivery_mode": st.integers(0, 255),
        "cluster_id": shortstrs,
    },
)


def pamqp_properties(fields: dict[str, Any]) -> pamqp_commands.Basic.Properties:
    mapped = {("message_type" if k == "type" else k): v for k, v in fields.items()}
    return pamqp_commands.Basic.Properties(**mapped)


def test_property_names_are_pamqps() -> None:
    theirs = [
        "type" if n == "message_type" else n for n in pamqp_commands.Basic.Properties.__slots__
    ]
    assert list(frames.PROPERTY_NAMES) == theirs


def _expected_after_round_trip(fields: dict[str, Any]) -> frames.Properties:
    # an empty short string is not sent (as pamqp): it comes back as None
    return frames.Properties(**{k: v for k, v in fields.items() if v != ""})


@MEDIUM
@given(fields=property_fields)
def test_properties_encode_as_pamqp_and_decode_back(fields: dict[str, Any]) -> None:
    encoded = frames.Properties(**fields).encode()
    assert encoded == pamqp_properties(fields).marshal()
    header = pamqp_frame.marshal(ContentHeader(0, 0, pamqp_properties(fields)), 1)
    assert frames.content_frames(1, encoded, b"", 4096) == header
    decoded = frames.Properties.decode(encoded)
    expected = _expected_after_round_trip(fields)
    assert decoded == expected
    assert decoded.error is None
    assert typed(decoded.headers) == typed(expected.headers)


@MEDIUM
@given(fields=our_property_fields)
def test_properties_pamqp_refuses_round_trip(fields: dict[str, Any]) -> None:
    decoded = frames.Properties.decode(frames.Properties(**fields).encode())
    expected = _expected_after_round_trip(fields)
    assert decoded == expected
    assert typed(decoded.headers) == typed(expected.headers)


@MEDIUM
@given(fields=our_property_fields, headers=st.one_of(st.none(), our_tables))
def test_replacing_the_headers_of_encoded_properties_is_encoding_them_with_those_headers(
    fields: dict[str, Any], headers: dict[str, Any] | None
) -> None:
    """Every other field byte for byte: the same bytes as encoding the properties with the
    new headers (none: no headers field at all)."""
    raw = frames.Properties(**fields).encode()
    expected = frames.Properties(**{**fields, "headers": headers or None}).encode()
    assert frames.replace_headers(raw, headers) == expected


def test_replacing_headers_refuses_a_value_it_cannot_write() -> None:
    raw = frames.Properties(message_id="m", headers={"a": 1}).encode()
    with pytest.raises(frames.EncodeError, match="property headers"):
        frames.replace_headers(raw, {"a": object()})
    assert frames.replace_headers(b"\x00\x01\x00\x00", {"a": 1}) is None  # continuation


def test_empty_strings_are_not_sent_as_pamqp() -> None:
    props = frames.Properties(content_type="", message_id="", headers={})
    assert (
        props.encode()
        == pamqp_properties({"content_type": "", "message_id": "", "headers": {}}).marshal()
    )
    assert frames.Properties.decode(props.encode()) == frames.Properties(headers={})


@MEDIUM
@given(fields=property_fields)
def test_pamqp_reads_our_properties(fields: dict[str, Any]) -> None:
    header = ContentHeader()
    header.unmarshal(b"\x00\x3c\x00\x00" + _U64.pack(0) + frames.Properties(**fields).encode())
    assert header.properties == pamqp_properties({k: v for k, v in fields.items() if v != ""})


# -- tables --------------------------------------------------------------------------------


@MEDIUM
@given(table=pamqp_tables)
def test_encode_and_decode_table_are_pamqps(table: dict[str, Any]) -> None:
    data = pamqp_encode.field_table(table)
    assert frames.encode_table(table) == data
    consumed, theirs = pamqp_decode.field_table(data)
    assert consumed == len(data)
    assert typed(frames.decode_table(data)) == typed(theirs)


@MEDIUM
@given(table=st.one_of(common_tables, our_tables))
def test_tables_round_trip(table: dict[str, Any]) -> None:
    assert typed(frames.decode_table(frames.encode_table(table))) == typed(table)


def test_bytes_values_round_trip_as_bytes() -> None:
    table = {"raw": b"\xff\xfe\x00", "nested": {"list": [b"\x80", "text"]}}
    encoded = frames.encode_table(table)
    assert typed(frames.decode_table(encoded)) == typed(table)
    # pamqp refuses bytes, and decodes what we wrote to the same
    with pytest.raises(TypeError):
        pamqp_encode.field_table(table)
    assert typed(pamqp_decode.field_table(encoded)[1]) == typed(table)


# wire tables built by hand: every field type, including those no encoder writes
def _pack(fmt: str, value: Any) -> bytes:
    return struct.pack(fmt, value)


_raw_leaves = st.one_of(
    st.booleans().map(lambda v: b"t" + bytes((int(v),))),
    st.integers(-128, 127).map(lambda v: b"b" + _pack(">b", v)),
    st.integers(0, 255).map(lambda v: b"B" + _pack(">B", v)),
    st.integers(-(2**15), 2**15 - 1).map(lambda v: b"s" + _pack(">h", v)),
    st.integers(0, 2**16 - 1).map(lambda v: b"u" + _pack(">H", v)),
    st.integers(-(2**31), 2**31 - 1).map(lambda v: b"I" + _pack(">i", v)),
    st.integers(0, 2**32 - 1).map(lambda v: b"i" + _pack(">I", v)),
    int64s.map(lambda v: b"l" + _pack(">q", v)),
    int64s.map(lambda v: b"L" + _pack(">q", v)),
    f32s.map(lambda v: b"f" + _pack(">f", v)),
    st.floats(allow_nan=False).map(lambda v: b"d" + _pack(">d", v)),
    st.tuples(st.integers(0, 255), st.integers(-(2**31), 2**31 - 1)).map(
        lambda t: b"D" + struct.pack(">Bi", *t)
    ),
    st.binary(max_size=30).map(lambda v: b"S" + _U32.pack(len(v)) + v),
    st.one_of(st.integers(0, 2**32 - 1), st.integers(2**32, 253402300799999)).map(
        lambda v: b"T" + _U64.pack(v)
    ),
    st.just(b"V"),
    st.just(b"\x00"),
    st.binary(max_size=20).map(lambda v: b"x" + _U32.pack(len(v)) + v),
)
_raw_keys = st.text(max_size=60).map(lambda s: _cut(s, 255)).map(lambda s: s.encode())


def _raw_table(items: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(bytes((len(k),)) + k + v for k, v in items)
    return _U32.pack(len(body)) + body


def _raw_array(values: list[bytes]) -> bytes:
    body = b"".join(values)
    return _U32.pack(len(body)) + body


_raw_values = st.recursive(
    _raw_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda vs: b"A" + _raw_array(vs)),
        st.lists(st.tuples(_raw_keys, inner), max_size=4).map(lambda it: b"F" + _raw_table(it)),
    ),
    max_leaves=6,
)
raw_tables = st.lists(st.tuples(_raw_keys, _raw_values), max_size=6).map(_raw_table)


@MEDIUM
@given(data=raw_tables)
def test_decode_table_reads_every_field_type_as_pamqp(data: bytes) -> None:
    consumed, theirs = pamqp_decode.field_table(data)
    assert consumed == len(data)
    assert typed(frames.decode_table(data)) == typed(theirs)


def test_a_double_is_written_back_as_a_double() -> None:
    """A ``d`` value read from a table is written back as ``d``, bit for bit (a relay such as
    delay must not turn a producer's 64-bit float into a 32-bit one); a plain float is
    written as ``f``, as pamqp writes it."""
    value = 0.1 + 2**-40
    wire = _raw_table(
        [
            (b"n", b"A" + _raw_array([b"d" + _pack(">d", 1e300)])),  # keys sorted, as written
            (b"price", b"d" + _pack(">d", value)),
        ]
    )
    decoded = frames.decode_table(wire)
    assert decoded["price"] == value and type(decoded["price"]) is frames.Double
    assert frames.encode_table(decoded) == wire
    assert frames.encode_table({"plain": 1.5}) == pamqp_encode.field_table({"plain": 1.5})
    assert frames.encode_table({"plain": 1.5}).endswith(b"f" + _pack(">f", 1.5))


# -- names pamqp refuses -------------------------------------------------------------------


def _unvalidated(pamqp_cls: Any) -> Any:
    return type(pamqp_cls.__name__, (pamqp_cls,), {"validate": lambda self: None})


@MEDIUM
@given(channel=channels, exchange=refused_names, queue=refused_names, routing_key=shortstrs)
def test_names_pamqp_refuses_are_encoded_and_decoded(
    channel: int, exchange: str, queue: str, routing_key: str
) -> None:
    with pytest.raises(ValueError):
        pamqp_frame.marshal(pamqp_commands.Basic.Publish(exchange=exchange), channel)
    methods = [
        frames.BasicPublish(exchange=exchange, routing_key=routing_key, mandatory=True),
        frames.QueueBind(queue=queue, exchange=exchange, routing_key=routing_key),
        frames.QueueDeclare(queue=queue, durable=True, arguments={"x-queue-type": "quorum"}),
        frames.QueueDeclareOk(queue=queue, message_count=3, consumer_count=1),
        frames.BasicConsume(queue=queue, consumer_tag=routing_key),
    ]
    for method in methods:
        encoded = frames.method_frame(channel, method)
        # what pamqp would write without its name checks
        twin = _unvalidated(pamqp_class(type(method)))
        assert encoded == pamqp_frame.marshal(twin(**method_values_raw(method)), channel)
        assert frames.Decoder().feed(encoded) == [(channel, method)]
    publish = frames.publish_frame(channel, exchange, routing_key, True)
    assert publish == frames.method_frame(channel, methods[0])
    deliver = frames.BasicDeliver(
        consumer_tag="c", delivery_tag=1, exchange=exchange, routing_key=routing_key
    )
    events = frames.Decoder().feed(
        frames.method_frame(channel, deliver)
        + frames.content_frames(channel, frames.Properties().encode(), b"", 4096)
    )
    assert (events[0][1].exchange, events[0][1].routing_key) == (exchange, routing_key)


def method_values_raw(method: Any) -> dict[str, Any]:
    return {n: getattr(method, n) for n, _ in public_fields(type(method))}


# -- decoding, however split ---------------------------------------------------------------


def _content(channel: int, method: frames.Method, props: frames.Properties, body: bytes) -> bytes:
    return frames.method_frame(channel, method) + frames.content_frames(
        channel, props.encode(), body, 64
    )


def sample_stream() -> bytes:
    props = frames.Properties(
        content_type="application/json",
        headers={"x-a": [1, "two", {"three": 3.5}], "x-b": None, "x-c": bytearray(b"\x00")},
        delivery_mode=2,
        message_id="m-1",
        timestamp=datetime.datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
    )
    body = bytes(range(256))[:200]
    deliver = frames.BasicDeliver(
        consumer_tag="ctag", delivery_tag=42, redelivered=True, exchange="ex", routing_key="rk"
    )
    header_and_body = frames.content_frames(1, props.encode(), body, 64)
    header_end = 8 + _U32.unpack_from(header_and_body, 3)[0]
    header, bodies = header_and_body[:header_end], header_and_body[header_end:]
    first_body_end = 8 + 56
    return b"".join(
        (
            frames.method_frame(1, frames.BasicConsumeOk(consumer_tag="ctag")),
            frames.method_frame(1, deliver),
            header,
            bodies[:first_body_end],
            frames.HEARTBEAT,  # interleaved with the content of channel 1
            frames.ack_frame(2, 9, True),
            bodies[first_body_end:],
            _content(
                3,
                frames.BasicReturn(reply_code=312, reply_text="NO_ROUTE", exchange="e"),
                frames.Properties(message_id="r"),
                b"returned",
            ),
            _content(1, deliver, frames.Properties(), b""),
            frames.nack_frame(2, 10, False, False),
            frames.method_frame(0, frames.ConnectionBlocked(reason="low on memory")),
        )
    )


def norm(events: list[frames.Event]) -> list[Any]:
    out = []
    for channel, event in events:
        if isinstance(event, frames.Delivery):
            fields = {
                name: getattr(event, name)
                for name in (
                    "channel",
                    "consumer_tag",
                    "delivery_tag",
                    "redelivered",
                    "exchange",
                    "routing_key",
                    "raw_properties",
                    "body",
                )
            }
            fields["properties"] = (repr(event.properties), typed(event.properties.headers))
            if isinstance(event, frames.Returned):
                fields["reply"] = (event.reply_code, event.reply_text)
            out.append((channel, type(event).__name__, fields))
        elif isinstance(event, frames.Heartbeat):
            out.append((channel, "heartbeat"))
        else:
            out.append((channel, type(event).__name__, method_values(event)))
    return out


def test_sample_stream_decodes_to_its_events() -> None:
    events = norm(frames.Decoder().feed(sample_stream()))
    kinds = [(e[0], e[1]) for e in events]
    assert kinds == [
        (1, "BasicConsumeOk"),
        (0, "heartbeat"),
        (2, "BasicAck"),
        (1, "Delivery"),
        (3, "Returned"),
        (1, "Delivery"),
        (2, "BasicNack"),
        (0, "ConnectionBlocked"),
    ]
    delivery = events[3][2]
    assert delivery["body"] == bytes(range(200))
    assert delivery["delivery_tag"] == 42 and delivery["redelivered"] is True
    assert events[4][2]["reply"] == (312, "NO_ROUTE")
    assert events[4][2]["body"] == b"returned"
    assert events[5][2]["body"] == b""


def test_every_split_point_gives_the_same_events() -> None:
    stream = sample_stream()
    whole = norm(frames.Decoder().feed(stream))
    for cut in range(len(stream) + 1):
        decoder = frames.Decoder()
        got = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert norm(got) == whole, cut
    decoder = frames.Decoder()
    got = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
    assert norm(got) == whole


@MEDIUM
@given(cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_any_segmentation_gives_the_same_events(cuts: list[int]) -> None:
    stream = sample_stream()
    whole = norm(frames.Decoder().feed(stream))
    points = sorted({c % (len(stream) + 1) for c in cuts})
    decoder = frames.Decoder()
    got = []
    for start, end in zip([0, *points], [*points, len(stream)], strict=True):
        got += decoder.feed(stream[start:end])
    assert norm(got) == whole


# -- damaged input: DecodeError and nothing else --------------------------------------------


def feed_checked(data: bytes, pieces: int = 1, frame_max: int = frames.FRAME_MAX_DEFAULT) -> None:
    """Feed ``data``; only a DecodeError of the codec's own may come out (not a bug of the
    decoder that its catch-all turned into one)."""
    decoder = frames.Decoder(frame_max=frame_max)
    step = max(1, len(data) // pieces)
    try:
        for start in range(0, len(data), step):
            decoder.feed(data[start : start + step])
    except frames.DecodeError as exc:
        _own(exc)


def _own(exc: frames.DecodeError) -> None:
    cause = exc.__cause__
    if cause is not None and not isinstance(cause, frames.DecodeError):
        assert not str(exc).startswith(f"{type(cause).__name__}: "), (
            f"a bug in the decoder surfaced as a DecodeError: {cause!r}"
        )


@MANY
@given(data=st.binary(max_size=400), pieces=st.integers(1, 4))
def test_random_bytes_raise_only_decode_error(data: bytes, pieces: int) -> None:
    feed_checked(data, pieces)


KNOWN_INDEXES = sorted(frames.METHODS)


@MANY
@given(
    index=st.sampled_from(KNOWN_INDEXES),
    payload=st.binary(max_size=200),
    header=st.binary(max_size=200),
    channel=st.integers(0, 3),
)
def test_random_payloads_in_well_formed_frames_raise_only_decode_error(
    index: tuple[int, int], payload: bytes, header: bytes, channel: int
) -> None:
    method = struct.pack(">HH", *index) + payload
    feed_checked(frames.frame(frames.FRAME_METHOD, channel, method))
    deliver = frames.method_frame(channel, frames.BasicDeliver(consumer_tag="c", delivery_tag=1))
    feed_checked(deliver + frames.frame(frames.FRAME_HEADER, channel, header))
    props = b"\x00\x3c\x00\x00" + _U64.pack(3) + header
    feed_checked(deliver + frames.frame(frames.FRAME_HEADER, channel, props))


@MANY
@given(cut=st.integers(0, 2000), shrink=st.integers(1, 40), frame_index=st.integers(0, 30))
def test_truncated_streams_raise_only_decode_error(cut: int, shrink: int, frame_index: int) -> None:
    stream = sample_stream()
    # a prefix: no error, just fewer events
    prefix = stream[: cut % (len(stream) + 1)]
    frames.Decoder().feed(prefix)
    # a frame whose payload was cut short (size and end byte made consistent again)
    spans = _frame_spans(stream)
    start, end = spans[frame_index % len(spans)]
    payload = stream[start + 7 : end - 1]
    short = payload[: max(0, len(payload) - shrink)]
    damaged = stream[:start] + stream[start : start + 3] + _U32.pack(len(short)) + short + b"\xce"
    feed_checked(damaged + stream[end:])


def _frame_spans(stream: bytes) -> list[tuple[int, int]]:
    spans = []
    pos = 0
    while pos < len(stream):
        size = _U32.unpack_from(stream, pos + 3)[0]
        spans.append((pos, pos + 8 + size))
        pos += 8 + size
    return spans


@MANY
@given(flips=st.lists(st.integers(0, 10**6), min_size=1, max_size=4), pieces=st.integers(1, 3))
def test_bit_flipped_streams_raise_only_decode_error(flips: list[int], pieces: int) -> None:
    stream = bytearray(sample_stream())
    for flip in flips:
        bit = flip % (len(stream) * 8)
        stream[bit // 8] ^= 1 << (bit % 8)
    feed_checked(bytes(stream), pieces, frame_max=0)


@MEDIUM
@given(table=raw_tables, flips=st.lists(st.integers(0, 10**6), max_size=3), cut=st.integers(0, 3))
def test_damaged_tables_and_properties_raise_only_decode_error(
    table: bytes, flips: list[int], cut: int
) -> None:
    data = bytearray(table)
    for flip in flips:
        bit = flip % (len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
    damaged = bytes(data)[: len(data) - cut]
    try:
        frames.decode_table(damaged)
    except frames.DecodeError:
        pass
    props = _U32.pack(0x2000 | 0x0080)[2:] + damaged + b"\x01m"
    try:
        decoded = frames.Properties.decode(props)
    except frames.DecodeError:
        pass
    else:
        assert decoded.headers is not None or decoded.error is not None


# -- nesting -------------------------------------------------------------------------------


def nested_table(levels: int, kind: bytes = b"F") -> bytes:
    """The encoding of ``_nested_dict(levels)`` (kind F) or ``_nested_list(levels)`` (kind A),
    built without quadratic copying."""
    if kind == b"F":
        parts = [_U32.pack(7 * j) + b"\x01kF" for j in range(levels, 0, -1)]
        return b"".join([*parts, _U32.pack(0)])
    parts = [_U32.pack(5 * j) + b"A" for j in range(levels, 0, -1)]
    return b"".join([_U32.pack(7 + 5 * levels), b"\x01kA", *parts, _U32.pack(0)])


def _nested_dict(levels: int) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for _ in range(levels):
        table = {"k": table}
    return table


def _nested_list(levels: int) -> dict[str, Any]:
    value: Any = []
    for _ in range(levels):
        value = [value]
    return {"k": value}


def test_nested_table_helper_is_what_encoders_write() -> None:
    assert nested_table(5) == pamqp_encode.field_table(_nested_dict(5))
    assert nested_table(5, b"A") == pamqp_encode.field_table(_nested_list(5))


@pytest.mark.parametrize("kind", [b"F", b"A"])
def test_deeply_nested_headers_do_not_break_the_stream(kind: bytes) -> None:
    table = nested_table(100_000, kind)
    assert len(table) > 400_000
    payload = (
        b"\x00\x3c\x00\x00" + _U64.pack(4) + struct.pack(">H", 0x2000 | 0x0080) + table + b"\x02id"
    )
    deliver = frames.BasicDeliver(consumer_tag="c", delivery_tag=5, exchange="x", routing_key="k")
    stream = b"".join(
        (
            frames.method_frame(1, deliver),
            frames.frame(frames.FRAME_HEADER, 1, payload),
            frames.frame(frames.FRAME_BODY, 1, b"body"),
            frames.ack_frame(1, 3, False),
        )
    )
    decoder = frames.Decoder(frame_max=1 << 21)
    tracemalloc.start()
    try:
        events = decoder.feed(stream)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # a decoder building 100,000 dicts would need tens of megabytes; this one copies the
    # frame a few times at most
    assert peak < 8 * len(stream) + (1 << 20), peak
    assert len(events) == 2
    delivery = events[0][1]
    assert delivery.properties.headers is None
    assert delivery.headers is None
    assert "nested" in (delivery.properties.error or "")
    assert delivery.properties_error == delivery.properties.error
    assert delivery.message_id == "id"  # the properties after the headers were still read
    assert delivery.body == b"body"
    assert events[1] == (1, frames.BasicAck(delivery_tag=3, multiple=False))
    with pytest.raises(frames.DecodeError, match="nested"):
        frames.decode_table(table)


def test_nesting_limit_is_the_same_both_ways() -> None:
    # MAX_DEPTH tables or arrays inside the outer table, and no more
    at_limit = _nested_dict(frames.MAX_DEPTH)
    assert frames.decode_table(frames.encode_table(at_limit)) == at_limit
    too_deep = _nested_dict(frames.MAX_DEPTH + 1)
    with pytest.raises(frames.EncodeError, match="nested"):
        frames.encode_table(too_deep)
    with pytest.raises(frames.DecodeError, match="nested"):
        frames.decode_table(pamqp_encode.field_table(too_deep))
    list_at_limit = _nested_list(frames.MAX_DEPTH - 1)  # {"k": [[...]]}: MAX_DEPTH arrays
    assert frames.decode_table(frames.encode_table(list_at_limit)) == list_at_limit
    list_too_deep = _nested_list(frames.MAX_DEPTH)
    with pytest.raises(frames.EncodeError, match="nested"):
        frames.encode_table(list_too_deep)
    with pytest.raises(frames.DecodeError, match="nested"):
        frames.decode_table(pamqp_encode.field_table(list_too_deep))


def test_encoding_a_very_deep_dict_raises_encode_error() -> None:
    for value in (_nested_dict(100_000), _nested_list(100_000)):
        with pytest.raises(frames.EncodeError):
            frames.encode_table(value)
        with pytest.raises(frames.EncodeError):
            frames.Properties(headers=value).encode()
        with pytest.raises(frames.EncodeError):
            frames.method_frame(1, frames.QueueDeclare(queue="q", arguments=value))


# -- not UTF-8 -----------------------------------------------------------------------------


def test_short_strings_and_keys_that_are_not_utf8_decode_with_replacement() -> None:
    bad = b"a\xffb"
    consume_ok = frames.frame(frames.FRAME_METHOD, 1, b"\x00\x3c\x00\x15" + b"\x03" + bad)
    assert frames.Decoder().feed(consume_ok) == [
        (1, frames.BasicConsumeOk(consumer_tag="a\ufffdb"))
    ]
    deliver = frames.frame(
        frames.FRAME_METHOD,
        1,
        b"\x00\x3c\x00\x3c" + b"\x03" + bad + _U64.pack(1) + b"\x00" + b"\x03" + bad + b"\x01\xc3",
    )
    table = _raw_table(
        [(b"k\xfe", b"S" + _U32.pack(2) + b"ok"), (b"ok", b"S\x00\x00\x00\x02\xc3(")]
    )
    header = (
        b"\x00\x3c\x00\x00"
        + _U64.pack(0)
        + struct.pack(">H", 0x2000 | 0x0080 | 0x8000)
        + b"\x03"
        + bad
        + table
        + b"\x03"
        + bad
    )
    events = frames.Decoder().feed(deliver + frames.frame(frames.FRAME_HEADER, 1, header))
    ((_, delivery),) = events
    assert delivery.consumer_tag == delivery.exchange == "a\ufffdb"
    assert delivery.routing_key == "\ufffd"
    assert delivery.content_type == delivery.message_id == "a\ufffdb"
    # keys with U+FFFD; a long string that is not UTF-8 stays bytes, as pamqp decodes it
    assert delivery.headers == {"k\ufffd": "ok", "ok": b"\xc3("}
    assert delivery.properties.error is None
    assert frames.decode_table(table) == delivery.headers
    assert pamqp_decode.long_str(b"\x00\x00\x00\x02\xc3(") == (6, b"\xc3(")


def test_long_string_fields_that_are_not_utf8_decode_to_bytes() -> None:
    start_ok = frames.ConnectionStartOk(response=b"\x00guest\x00\xff")
    encoded = frames.method_frame(0, start_ok)
    ((_, decoded),) = frames.Decoder().feed(encoded)
    assert decoded.response == b"\x00guest\x00\xff"


# -- timestamps ----------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [2**64 - 1, 2**63, 10**17])
def test_timestamp_out_of_range_sets_error(raw: int) -> None:
    props = struct.pack(">H", 0x0080 | 0x0040 | 0x0020) + b"\x02id" + _U64.pack(raw) + b"\x04kind"
    decoded = frames.Properties.decode(props)
    assert decoded.timestamp is None
    assert "timestamp" in (decoded.error or "")
    assert (decoded.message_id, decoded.type) == ("id", "kind")
    deliver = frames.method_frame(1, frames.BasicDeliver(consumer_tag="c", delivery_tag=1))
    header = frames.frame(frames.FRAME_HEADER, 1, b"\x00\x3c\x00\x00" + _U64.pack(0) + props)
    ((_, delivery),) = frames.Decoder().feed(deliver + header)
    assert delivery.properties.error == decoded.error
    # inside the headers table: the headers are dropped with an error, not the stream
    table = _raw_table([(b"t", b"T" + _U64.pack(raw))])
    with pytest.raises(frames.DecodeError):
        frames.decode_table(table)
    in_headers = frames.Properties.decode(struct.pack(">H", 0x2000) + table)
    assert in_headers.headers is None and "headers" in (in_headers.error or "")


def test_timestamps_in_milliseconds_beyond_2106_are_read_as_pamqp_reads_them() -> None:
    raw = 1_700_000_000_123
    table = _raw_table([(b"t", b"T" + _U64.pack(raw))])
    assert frames.decode_table(table) == pamqp_decode.field_table(table)[1]


# -- encode errors -------------------------------------------------------------------------


def test_encode_errors() -> None:
    assert issubclass(frames.EncodeError, ValueError)
    too_long = "é" * 128  # 256 bytes
    with pytest.raises(frames.EncodeError):
        frames.method_frame(1, frames.BasicPublish(exchange=too_long))
    with pytest.raises(frames.EncodeError):
        frames.publish_frame(1, "", "r" * 256, False)
    with pytest.raises(frames.EncodeError):
        frames.Properties(message_id="m" * 256).encode()
    frames.Properties(message_id="m" * 255).encode()  # the limit itself is fine
    for value in (2**63, -(2**63) - 1, 2**64):
        with pytest.raises(frames.EncodeError):
            frames.encode_table({"n": value})
    for value in (object(), {1, 2}, (1, 2), 1j):
        with pytest.raises(frames.EncodeError):
            frames.encode_table({"v": value})
        with pytest.raises(frames.EncodeError):
            frames.Properties(headers={"v": [value]}).encode()
    for table in ({1: "one"}, {"a": 1, 2: "b"}, {None: 1}, {b"k": 1}):
        with pytest.raises(frames.EncodeError):
            frames.encode_table(table)  # type: ignore[arg-type]
    for value in (decimal.Decimal("NaN"), decimal.Decimal(2**40), decimal.Decimal("1E-300")):
        with pytest.raises(frames.EncodeError):
            frames.encode_table({"d": value})
    # values the AMQP types cannot hold: a float beyond 32 bits, a time before 1970
    for value in (1e300, -1e300, datetime.datetime(1960, 1, 1, tzinfo=UTC)):
        with pytest.raises(frames.EncodeError):
            frames.encode_table({"v": value})
        with pytest.raises(frames.EncodeError):
            frames.Properties(headers={"v": value}).encode()
    with pytest.raises(frames.EncodeError):
        frames.Properties(timestamp=datetime.datetime(1960, 1, 1, tzinfo=UTC)).encode()
    with pytest.raises(frames.EncodeError):
        frames.Properties(priority=256).encode()
    with pytest.raises(frames.EncodeError):
        frames.method_frame(1, frames.BasicQos(prefetch_count=65536))
    with pytest.raises(frames.EncodeError):
        frames.method_frame(1, frames.BasicAck(delivery_tag=-1))


# -- unknown methods -----------------------------------------------------------------------


@pytest.mark.parametrize("index", [(60, 70), (90, 10), (999, 1), (10, 99)])
def test_unknown_method_decodes_to_unknown_method(index: tuple[int, int]) -> None:
    payload = struct.pack(">HH", *index) + b"\x00\x01whatever"
    stream = frames.frame(frames.FRAME_METHOD, 4, payload) + frames.ack_frame(4, 1, False)
    events = frames.Decoder().feed(stream)
    assert len(events) == 2
    channel, unknown = events[0]
    assert channel == 4
    assert type(unknown) is frames.UnknownMethod
    assert unknown.index == index
    assert unknown.payload == payload
    assert unknown.encode() == payload
    assert events[1] == (4, frames.BasicAck(delivery_tag=1, multiple=False))


@pytest.mark.parametrize(
    "encode",
    [
        lambda: frames.encode_table({"k": "\ud800"}),
        lambda: frames.encode_table({"\udfff": 1}),
        lambda: frames.Properties(message_id="\ud800").encode(),
        lambda: frames.publish_frame(1, "", "k\udfff", True),
    ],
    ids=["table-value", "table-key", "property", "routing-key"],
)
def test_a_lone_surrogate_is_an_encode_error(encode) -> None:
    """Not Unicode text: the codec's own error (the publisher fails that publish alone as
    ``unencodable``), never UnicodeEncodeError."""
    with pytest.raises(frames.EncodeError, match="UTF-8"):
        encode()
