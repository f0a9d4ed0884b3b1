"""AMQP 0-9-1 frames, encoded and decoded without I/O.

The one codec of the project's data path: :mod:`bridge.amqp.link` writes what this module
encodes and feeds it what the socket reads. It knows the methods the workers use (the
connection and channel handshake and close, heartbeats, qos, queue declare/bind,
consume/cancel and the broker's cancel notification, publish, deliver and return with their
content, ack/nack/reject, confirm select, connection.blocked/unblocked); a method it does
not know decodes to :class:`UnknownMethod` instead of failing.

Promises, each tested in tests/unit/amqp/test_frames.py:

- encodings are byte for byte what pamqp writes, wherever pamqp can encode the value; it
  also encodes what RabbitMQ accepts and pamqp refuses (any exchange or routing key up to
  255 bytes of UTF-8, header values that are ``bytes``);
- decoding never raises anything but :class:`DecodeError`, whatever the bytes and however
  they are split across reads; tables nest at most :data:`MAX_DEPTH` levels;
- a content header whose headers table cannot be decoded (nested too deep, malformed) does
  not fail the frame stream: the delivery carries ``properties.error`` and the
  worker dead-letters it; keys and short strings that are not UTF-8 decode with U+FFFD.
"""

from __future__ import annotations

import calendar
import datetime
import decimal
import struct
import time
from typing import TYPE_CHECKING, Any, ClassVar

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_HEARTBEAT = 8
FRAME_END = 0xCE
PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"
FRAME_MAX_DEFAULT = 131072
MAX_DEPTH = 64  # nested tables and arrays; RabbitMQ's own clients never come close

_FRAME = struct.Struct(">BHI")  # type, channel, size
_U8 = struct.Struct(">B")
_I8 = struct.Struct(">b")
_U16 = struct.Struct(">H")
_I16 = struct.Struct(">h")
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")
_DEC = struct.Struct(">Bi")
_END = b"\xce"


class FrameError(Exception):
    """Base of the codec's errors."""


class DecodeError(FrameError):
    """Bytes that are not AMQP 0-9-1 as this codec understands it."""


class EncodeError(FrameError, ValueError):
    """A value AMQP cannot carry (a short string over 255 bytes, an integer out of range,
    a type with no AMQP field type)."""


# -- field values ------------------------------------------------------------------------


def _utf8(value: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: not Unicode text
        raise EncodeError(f"not encodable as UTF-8: {exc}") from exc


def _shortstr(value: str) -> bytes:
    data = _utf8(value)
    if len(data) > 255:
        raise EncodeError(f"short string of {len(data)} bytes (at most 255): {value[:40]!r}...")
    return bytes((len(data),)) + data


def _longstr(value: str | bytes) -> bytes:
    data = _utf8(value) if isinstance(value, str) else value
    return _U32.pack(len(data)) + data


def _table_int(value: int) -> bytes:
    # pamqp's choice: the smallest type that holds the value
    if -128 <= value <= 127:
        return b"b" + _I8.pack(value)
    if -32768 <= value <= 32767:
        return b"s" + _I16.pack(value)
    if 0 <= value <= 65535:
        return b"u" + _U16.pack(value)
    if -2147483648 <= value <= 2147483647:
        return b"I" + _I32.pack(value)
    if 0 <= value <= 4294967295:
        return b"i" + _U32.pack(value)
    if -9223372036854775808 <= value <= 9223372036854775807:
        return b"l" + _I64.pack(value)
    raise EncodeError(f"integer out of AMQP's range: {value}")


def _decimal(value: decimal.Decimal) -> bytes:
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int):
        raise EncodeError(f"decimal not encodable: {value}")
    if exponent > 0:
        mantissa = int(value)
        scale = 0
    else:
        scale = -exponent
        mantissa = int(value.scaleb(scale))
    if not (0 <= scale <= 255) or not (-2147483648 <= mantissa <= 2147483647):
        raise EncodeError(f"decimal out of AMQP's range: {value}")
    return _DEC.pack(scale, mantissa)


def _timestamp(value: datetime.datetime | time.struct_time) -> bytes:
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
            value = value.replace(tzinfo=datetime.UTC)
        seconds = int(value.timestamp())
    else:
        seconds = calendar.timegm(value)
    try:
        return _U64.pack(seconds)
    except struct.error as exc:
        raise EncodeError(f"timestamp out of AMQP's range: {value}") from exc


def _value(value: Any, depth: int) -> bytes:
    kind = type(value)
    if kind is str:  # the common case first
        try:
            data = value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise EncodeError(f"not encodable as UTF-8: {exc}") from exc
        return b"S" + _U32.pack(len(data)) + data
    if kind is bool:
        return b"t\x01" if value else b"t\x00"
    if kind is int and -128 <= value <= 127:
        return b"b" + _I8.pack(value)
    if isinstance(value, bool):
        return b"t" + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return _table_int(value)
    if isinstance(value, str):
        data = _utf8(value)
        return b"S" + _U32.pack(len(data)) + data
    if isinstance(value, bytes):  # a long string that is not UTF-8, kept as it came
        return b"S" + _U32.pack(len(value)) + value
    if isinstance(value, dict):
        return b"F" + encode_table(value, depth + 1)
    if isinstance(value, list):
        return b"A" + _array(value, depth + 1)
    if isinstance(value, float):
        try:
            return b"f" + _F32.pack(value)
        except OverflowError as exc:
            raise EncodeError(f"float out of 32-bit range: {value}") from exc
    if isinstance(value, decimal.Decimal):
        return b"D" + _decimal(value)
    if isinstance(value, (datetime.datetime, time.struct_time)):
        return b"T" + _timestamp(value)
    if isinstance(value, bytearray):
        return b"x" + _U32.pack(len(value)) + bytes(value)
    if value is None:
        return b"V"
    raise EncodeError(f"no AMQP field type for {type(value).__name__}")


def _array(values: list[Any], depth: int) -> bytes:
    if depth > MAX_DEPTH:
        raise EncodeError(f"tables and arrays nested deeper than {MAX_DEPTH} levels")
    data = b"".join([_value(v, depth) for v in values])
    return _U32.pack(len(data)) + data


def encode_table(table: dict[str, Any] | None, depth: int = 0) -> bytes:
    """A field table, keys sorted (as pamqp writes them); keys over 128 bytes are cut."""
    if depth > MAX_DEPTH:  # an empty table too: the decoder refuses it at that depth
        raise EncodeError(f"tables and arrays nested deeper than {MAX_DEPTH} levels")
    if not table:
        return b"\x00\x00\x00\x00"
    if not isinstance(table, dict):
        raise EncodeError(f"a table must be a dict, not {type(table).__name__}")
    parts = []
    try:
        items = sorted(table.items())
    except TypeError as exc:
        raise EncodeError(f"table keys must be strings: {exc}") from exc
    keys = _KEYS
    for key, value in items:
        encoded = keys.get(key)
        if encoded is None:
            encoded = _key(key)
        parts.append(encoded)
        parts.append(_value(value, depth))
    data = b"".join(parts)
    return _U32.pack(len(data)) + data


_KEYS: dict[str, bytes] = {}  # encoded table keys: headers repeat the same few names


def _key(key: Any) -> bytes:
    if not isinstance(key, str):
        raise EncodeError(f"table keys must be strings, not {type(key).__name__}")
    raw = _utf8(key)
    if len(raw) > 128:
        raw = raw[:128].decode("utf-8", "ignore").encode("utf-8")
    encoded = bytes((len(raw),)) + raw
    if len(_KEYS) < 4096 and type(key) is str:
        _KEYS[key] = encoded
    return encoded


class _Reader:
    """Bounds-checked reads from one frame payload; every failure is a DecodeError."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def take(self, n: int) -> bytes:
        pos = self.pos
        if pos + n > self.end:
            raise DecodeError("frame shorter than its fields")
        self.pos = pos + n
        return self.data[pos : pos + n]

    def unpack(self, st: struct.Struct) -> Any:
        pos = self.pos
        if pos + st.size > self.end:
            raise DecodeError("frame shorter than its fields")
        self.pos = pos + st.size
        return st.unpack_from(self.data, pos)[0]

    def octet(self) -> int:
        pos = self.pos
        if pos >= self.end:
            raise DecodeError("frame shorter than its fields")
        self.pos = pos + 1
        return self.data[pos]

    def shortstr(self) -> str:
        raw = self.take(self.octet())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", "replace")

    def longstr_raw(self) -> bytes:
        return self.take(self.unpack(_U32))

    def table(self) -> dict[str, Any]:
        size = self.unpack(_U32)
        start = self.pos
        self.take(size)
        return _table_bytes(self.data, start, start + size)


_unpack_u32 = _U32.unpack_from
_TOO_DEEP = f"tables and arrays nested deeper than {MAX_DEPTH} levels"


def _table_body(buf: bytes, pos: int, end: int, depth: int) -> dict[str, Any]:
    """The fields of a table whose content (after its length) is ``buf[pos:end]``. Raises
    DecodeError (or IndexError/struct.error, which :func:`_table_bytes` turns into it).
    Positions, not slices: a deep table is never copied level by level."""
    if depth > MAX_DEPTH:
        raise DecodeError(_TOO_DEEP)
    out: dict[str, Any] = {}
    while pos < end:
        kend = pos + 1 + buf[pos]
        if kend >= end:
            raise DecodeError("table key overruns the table")
        raw = buf[pos + 1 : kend]
        try:
            key = raw.decode("utf-8")
        except UnicodeDecodeError:
            key = raw.decode("utf-8", "replace")
        kind = buf[kend]
        pos = kend + 1
        if kind == 0x53:  # S
            if pos + 4 > end:
                raise DecodeError("long string overruns the table")
            vend = pos + 4 + _unpack_u32(buf, pos)[0]
            if vend > end:
                raise DecodeError("long string overruns the table")
            raw = buf[pos + 4 : vend]
            try:
                out[key] = raw.decode("utf-8")
            except UnicodeDecodeError:
                out[key] = raw  # as pamqp: bytes when not UTF-8
            pos = vend
        elif kind == 0x74:  # t
            if pos >= end:
                raise DecodeError("boolean overruns the table")
            out[key] = bool(buf[pos])
            pos += 1
        else:
            out[key], pos = _any(buf, pos, end, kind, depth)
    if pos != end:
        raise DecodeError("table overruns its length")
    return out


def _array_body(buf: bytes, pos: int, end: int, depth: int) -> list[Any]:
    if depth > MAX_DEPTH:
        raise DecodeError(_TOO_DEEP)
    out: list[Any] = []
    while pos < end:
        kind = buf[pos]
        value, pos = _any(buf, pos + 1, end, kind, depth)
        out.append(value)
    if pos != end:
        raise DecodeError("array overruns its length")
    return out


_SCALARS: dict[int, struct.Struct] = {
    0x62: _I8,  # b
    0x73: _I16,  # s
    0x75: _U16,  # u
    0x49: _I32,  # I
    0x69: _U32,  # i
    0x6C: _I64,  # l
    0x4C: _I64,  # L (pamqp reads it signed)
    0x66: _F32,  # f
    0x64: _F64,  # d
}


def _any(buf: bytes, pos: int, end: int, kind: int, depth: int) -> tuple[Any, int]:
    """A field value of type ``kind`` at ``pos``; returns it and the position after."""
    st = _SCALARS.get(kind)
    if st is not None:
        vend = pos + st.size
        if vend > end:
            raise DecodeError("value overruns the table")
        return st.unpack_from(buf, pos)[0], vend
    if kind == 0x46 or kind == 0x41 or kind == 0x53 or kind == 0x78:  # F, A, S, x
        if pos + 4 > end:
            raise DecodeError("value overruns the table")
        start = pos + 4
        vend = start + _unpack_u32(buf, pos)[0]
        if vend > end:
            raise DecodeError("value overruns the table")
        if kind == 0x46:
            return _table_body(buf, start, vend, depth + 1), vend
        if kind == 0x41:
            return _array_body(buf, start, vend, depth + 1), vend
        raw = buf[start:vend]
        if kind == 0x78:
            return bytearray(raw), vend
        try:
            return raw.decode("utf-8"), vend
        except UnicodeDecodeError:
            return raw, vend  # as pamqp: bytes when not UTF-8
    if kind == 0x74 or kind == 0x42:  # t, B
        if pos >= end:
            raise DecodeError("value overruns the table")
        return (bool(buf[pos]) if kind == 0x74 else buf[pos]), pos + 1
    if kind == 0x44:  # D
        if pos + 5 > end:
            raise DecodeError("decimal overruns the table")
        scale, raw_int = _DEC.unpack_from(buf, pos)
        return decimal.Decimal(raw_int) * (decimal.Decimal(10) ** -scale), pos + 5
    if kind == 0x54:  # T
        if pos + 8 > end:
            raise DecodeError("timestamp overruns the table")
        return _to_datetime(_U64.unpack_from(buf, pos)[0]), pos + 8
    if kind == 0x56 or kind == 0:  # V (and 0, seen in the wild, as pamqp)
        return None, pos
    raise DecodeError(f"unknown field type {kind:#x}")


def _table_bytes(buf: bytes, pos: int = 0, end: int | None = None) -> dict[str, Any]:
    try:
        return _table_body(buf, pos, len(buf) if end is None else end, 0)
    except (IndexError, struct.error) as exc:
        raise DecodeError(f"table shorter than its fields: {exc}") from None


def _to_datetime(seconds: int) -> datetime.datetime:
    value: float = seconds
    if seconds > 0xFFFFFFFF:  # beyond 2106: milliseconds (as pamqp reads it)
        value = seconds / 1000.0
    try:
        return datetime.datetime.fromtimestamp(value, tz=datetime.UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise DecodeError(f"timestamp out of range: {seconds}") from exc


def decode_table(data: bytes) -> dict[str, Any]:
    """A complete encoded field table (with its length) as a dict."""
    if len(data) < 4 or _unpack_u32(data, 0)[0] != len(data) - 4:
        raise DecodeError("not one table: its length and the bytes given differ")
    return _table_bytes(data, 4)


# -- methods -----------------------------------------------------------------------------


class Method:
    """An AMQP method. Each method is a subclass with its fields as slots (see ``_SPEC``)."""

    __slots__ = ()
    INDEX: ClassVar[tuple[int, int]] = (0, 0)
    NAME: ClassVar[str] = ""
    FIELDS: ClassVar[tuple[tuple[str, str, Any], ...]] = ()  # name, type, default

    def __init__(self, **fields: Any) -> None:
        for name, kind, default in self.FIELDS:
            if name[0] != "_":
                value = fields.pop(name, default)
                if kind == "table" and value is None:
                    value = {}
                object.__setattr__(self, name, value)
        if fields:
            raise TypeError(f"{self.NAME} has no field {', '.join(fields)}")

    if TYPE_CHECKING:

        def __getattr__(self, name: str) -> Any: ...

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and all(
            getattr(self, n) == getattr(other, n) for n, _, _ in self.FIELDS if n[0] != "_"
        )

    def __repr__(self) -> str:
        args = ", ".join(f"{n}={getattr(self, n)!r}" for n, _, _ in self.FIELDS if n[0] != "_")
        return f"{self.NAME}({args})"

    def encode(self) -> bytes:
        """The method frame's payload: class id, method id, arguments."""
        out = [_U16.pack(self.INDEX[0]), _U16.pack(self.INDEX[1])]
        bits = 0
        nbits = 0
        for name, kind, default in self.FIELDS:
            value = default if name[0] == "_" else getattr(self, name)
            if kind == "bit":
                if value:
                    bits |= 1 << nbits
                nbits += 1
                continue
            if nbits:
                out.append(bytes((bits,)))
                bits = nbits = 0
            out.append(_encode_field(kind, value, name))
        if nbits:
            out.append(bytes((bits,)))
        return b"".join(out)


def _encode_field(kind: str, value: Any, name: str) -> bytes:
    try:
        if kind == "shortstr":
            return _shortstr(value or "")
        if kind == "longstr":
            return _longstr(value or b"")
        if kind == "octet":
            return _U8.pack(value)
        if kind == "short":
            return _U16.pack(value)
        if kind == "long":
            return _U32.pack(value)
        if kind == "longlong":
            return _U64.pack(value)
        if kind == "table":
            return encode_table(value)
    except EncodeError:
        raise
    except (struct.error, TypeError, AttributeError) as exc:
        raise EncodeError(f"{name}: {exc}") from exc
    raise AssertionError(kind)


def _decode_method(payload: bytes) -> Method:
    if len(payload) < 4:
        raise DecodeError("method frame shorter than its ids")
    index = (_U16.unpack_from(payload, 0)[0], _U16.unpack_from(payload, 2)[0])
    cls = METHODS.get(index)
    if cls is None:
        return UnknownMethod(index, payload)
    reader = _Reader(payload, 4)
    method = cls.__new__(cls)
    bits = -1
    nbit = 8
    for name, kind, _ in cls.FIELDS:
        if kind == "bit":
            if nbit == 8:
                bits = reader.octet()
                nbit = 0
            value: Any = bool(bits & (1 << nbit))
            nbit += 1
        else:
            nbit = 8
            if kind == "shortstr":
                value = reader.shortstr()
            elif kind == "longstr":
                raw = reader.longstr_raw()
                try:
                    value = raw.decode("utf-8")
                except UnicodeDecodeError:
                    value = raw
            elif kind == "octet":
                value = reader.octet()
            elif kind == "short":
                value = reader.unpack(_U16)
            elif kind == "long":
                value = reader.unpack(_U32)
            elif kind == "longlong":
                value = reader.unpack(_U64)
            else:  # table
                value = reader.table()
        if name[0] != "_":
            object.__setattr__(method, name, value)
    if reader.pos != len(payload):
        raise DecodeError(f"{cls.NAME}: bytes after its arguments")
    return method


class UnknownMethod(Method):
    """A method this codec has no definition for (logged and ignored by the link)."""

    __slots__ = ("index", "payload")

    def __init__(self, index: tuple[int, int], payload: bytes) -> None:  # type: ignore[override]
        self.index = index
        self.payload = payload

    def __repr__(self) -> str:
        return f"UnknownMethod{self.index}"

    def encode(self) -> bytes:
        return self.payload


METHODS: dict[tuple[int, int], type[Method]] = {}


def _define(name: str, cls_id: int, meth_id: int, fields: str = "") -> Any:
    """Define the method ``name``; ``fields`` is "name:type[=default] ...", a name starting
    with ``_`` is a reserved field written with its default."""
    parsed = []
    for spec in fields.split():
        fname, _, rest = spec.partition(":")
        kind, _, raw_default = rest.partition("=")
        default: Any
        if kind == "bit":
            default = raw_default == "1"
        elif kind in ("octet", "short", "long", "longlong"):
            default = int(raw_default or 0)
        elif kind == "table":
            default = None
        elif kind == "longstr":
            default = raw_default
        else:
            default = raw_default
        parsed.append((fname, kind, default))
    cls_name = "".join(p.capitalize() for p in name.replace(".", "_").split("_"))
    cls = type(
        cls_name,
        (Method,),
        {
            "__slots__": tuple(n for n, _, _ in parsed if n[0] != "_"),
            "INDEX": (cls_id, meth_id),
            "NAME": name,
            "FIELDS": tuple(parsed),
        },
    )
    METHODS[(cls_id, meth_id)] = cls
    return cls


ConnectionStart = _define(
    "connection.start",
    10,
    10,
    "version_major:octet=0 version_minor:octet=9 server_properties:table "
    "mechanisms:longstr=PLAIN locales:longstr=en_US",
)
ConnectionStartOk = _define(
    "connection.start_ok",
    10,
    11,
    "client_properties:table mechanism:shortstr=PLAIN response:longstr locale:shortstr=en_US",
)
ConnectionTune = _define(
    "connection.tune", 10, 30, "channel_max:short frame_max:long heartbeat:short"
)
ConnectionTuneOk = _define(
    "connection.tune_ok", 10, 31, "channel_max:short frame_max:long heartbeat:short"
)
ConnectionOpen = _define(
    "connection.open", 10, 40, "virtual_host:shortstr=/ _capabilities:shortstr _insist:bit"
)
ConnectionOpenOk = _define("connection.open_ok", 10, 41, "_known_hosts:shortstr")
ConnectionClose = _define(
    "connection.close",
    10,
    50,
    "reply_code:short reply_text:shortstr class_id:short method_id:short",
)
ConnectionCloseOk = _define("connection.close_ok", 10, 51)
ConnectionBlocked = _define("connection.blocked", 10, 60, "reason:shortstr")
ConnectionUnblocked = _define("connection.unblocked", 10, 61)
ChannelOpen = _define("channel.open", 20, 10, "_out_of_band:shortstr=0")
ChannelOpenOk = _define("channel.open_ok", 20, 11, "_channel_id:longstr=0")
ChannelFlow = _define("channel.flow", 20, 20, "active:bit")
ChannelFlowOk = _define("channel.flow_ok", 20, 21, "active:bit")
ChannelClose = _define(
    "channel.close", 20, 40, "reply_code:short reply_text:shortstr class_id:short method_id:short"
)
ChannelCloseOk = _define("channel.close_ok", 20, 41)
QueueDeclare = _define(
    "queue.declare",
    50,
    10,
    "_ticket:short queue:shortstr passive:bit durable:bit exclusive:bit auto_delete:bit "
    "nowait:bit arguments:table",
)
QueueDeclareOk = _define(
    "queue.declare_ok", 50, 11, "queue:shortstr message_count:long consumer_count:long"
)
QueueBind = _define(
    "queue.bind",
    50,
    20,
    "_ticket:short queue:shortstr exchange:shortstr routing_key:shortstr nowait:bit "
    "arguments:table",
)
QueueBindOk = _define("queue.bind_ok", 50, 21)
BasicQos = _define("basic.qos", 60, 10, "prefetch_size:long prefetch_count:short global_:bit")
BasicQosOk = _define("basic.qos_ok", 60, 11)
BasicConsume = _define(
    "basic.consume",
    60,
    20,
    "_ticket:short queue:shortstr consumer_tag:shortstr no_local:bit no_ack:bit "
    "exclusive:bit nowait:bit arguments:table",
)
BasicConsumeOk = _define("basic.consume_ok", 60, 21, "consumer_tag:shortstr")
BasicCancel = _define("basic.cancel", 60, 30, "consumer_tag:shortstr nowait:bit")
BasicCancelOk = _define("basic.cancel_ok", 60, 31, "consumer_tag:shortstr")
BasicPublish = _define(
    "basic.publish",
    60,
    40,
    "_ticket:short exchange:shortstr routing_key:shortstr mandatory:bit immediate:bit",
)
BasicReturn = _define(
    "basic.return",
    60,
    50,
    "reply_code:short reply_text:shortstr exchange:shortstr routing_key:shortstr",
)
BasicDeliver = _define(
    "basic.deliver",
    60,
    60,
    "consumer_tag:shortstr delivery_tag:longlong redelivered:bit exchange:shortstr "
    "routing_key:shortstr",
)
BasicAck = _define("basic.ack", 60, 80, "delivery_tag:longlong multiple:bit")
BasicReject = _define("basic.reject", 60, 90, "delivery_tag:longlong requeue:bit=1")
BasicNack = _define("basic.nack", 60, 120, "delivery_tag:longlong multiple:bit requeue:bit=1")
ConfirmSelect = _define("confirm.select", 85, 10, "nowait:bit")
ConfirmSelectOk = _define("confirm.select_ok", 85, 11)


# -- properties --------------------------------------------------------------------------

# (name, type, flag bit) in wire order
_PROPERTIES = (
    ("content_type", "shortstr", 0x8000),
    ("content_encoding", "shortstr", 0x4000),
    ("headers", "table", 0x2000),
    ("delivery_mode", "octet", 0x1000),
    ("priority", "octet", 0x0800),
    ("correlation_id", "shortstr", 0x0400),
    ("reply_to", "shortstr", 0x0200),
    ("expiration", "shortstr", 0x0100),
    ("message_id", "shortstr", 0x0080),
    ("timestamp", "timestamp", 0x0040),
    ("type", "shortstr", 0x0020),
    ("user_id", "shortstr", 0x0010),
    ("app_id", "shortstr", 0x0008),
    ("cluster_id", "shortstr", 0x0004),
)
PROPERTY_NAMES = tuple(name for name, _, _ in _PROPERTIES)


class Properties:
    """Basic content properties. An attribute that is None (or ``""``, as pamqp) is not sent.

    ``error`` says what could not be decoded of a received message (a headers table nested
    too deep or malformed, a timestamp out of range; that property is None): such a message
    is the worker's to dead-letter, the stream goes on.
    """

    __slots__ = (*PROPERTY_NAMES, "error")

    def __init__(
        self,
        content_type: str | None = None,
        content_encoding: str | None = None,
        headers: dict[str, Any] | None = None,
        delivery_mode: int | None = None,
        priority: int | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        expiration: str | None = None,
        message_id: str | None = None,
        timestamp: datetime.datetime | None = None,
        type: str | None = None,
        user_id: str | None = None,
        app_id: str | None = None,
        cluster_id: str | None = None,
    ) -> None:
        self.content_type = content_type
        self.content_encoding = content_encoding
        self.headers = headers
        self.delivery_mode = delivery_mode
        self.priority = priority
        self.correlation_id = correlation_id
        self.reply_to = reply_to
        self.expiration = expiration
        self.message_id = message_id
        self.timestamp = timestamp
        self.type = type
        self.user_id = user_id
        self.app_id = app_id
        self.cluster_id = cluster_id
        self.error: str | None = None

    def copy(self, **changes: Any) -> Properties:
        out = Properties.__new__(Properties)
        for name in PROPERTY_NAMES:
            setattr(out, name, getattr(self, name))
        out.error = None
        for name, value in changes.items():
            setattr(out, name, value)
        return out

    def as_dict(self) -> dict[str, Any]:
        """The properties that are set (headers included), by name."""
        return {n: v for n in PROPERTY_NAMES if (v := getattr(self, n)) is not None}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Properties) and all(
            getattr(self, n) == getattr(other, n) for n in PROPERTY_NAMES
        )

    def __repr__(self) -> str:
        return f"Properties({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"

    def encode(self) -> bytes:
        """Property flags and the fields that are set (the content header after its size)."""
        flags = 0
        out: list[bytes] = []
        name = ""
        try:
            for name, kind, bit in _PROPERTIES:
                value = getattr(self, name)
                if value is None or value == "":  # as pamqp: an empty string is not sent
                    continue
                flags |= bit
                if kind == "shortstr":
                    out.append(_shortstr(value))
                elif kind == "table":
                    out.append(encode_table(value))
                elif kind == "octet":
                    out.append(_U8.pack(value))
                else:
                    out.append(_timestamp(value))
        except EncodeError as exc:
            raise EncodeError(f"property {name}: {exc}") from exc
        except (struct.error, TypeError, AttributeError) as exc:
            raise EncodeError(f"property {name}: {exc}") from exc
        return _U16.pack(flags) + b"".join(out)

    @classmethod
    def decode(cls, data: bytes, pos: int = 0) -> Properties:
        try:
            return cls._decode(data, pos)
        except (IndexError, struct.error) as exc:
            raise DecodeError(f"content header shorter than its properties: {exc}") from None

    @classmethod
    def _decode(cls, data: bytes, pos: int) -> Properties:
        n = len(data)
        flags = _U16.unpack_from(data, pos)[0]
        pos += 2
        last = flags
        while last & 1:  # continuation words: no properties are defined in them
            last = _U16.unpack_from(data, pos)[0]
            pos += 2
        props = cls.__new__(cls)
        props.error = None
        for name, kind, bit in _PROPERTIES:
            if not flags & bit:
                setattr(props, name, None)
                continue
            if kind == "shortstr":
                end = pos + 1 + data[pos]
                if end > n:
                    raise DecodeError(f"property {name} overruns the content header")
                raw = data[pos + 1 : end]
                try:
                    value: Any = raw.decode("utf-8")
                except UnicodeDecodeError:
                    value = raw.decode("utf-8", "replace")
                pos = end
            elif kind == "octet":
                value = data[pos]
                pos += 1
            elif kind == "timestamp":
                stamp = _U64.unpack_from(data, pos)[0]
                pos += 8
                try:
                    value = _to_datetime(stamp)
                except DecodeError as exc:
                    props.error = f"timestamp: {exc}"
                    value = None
            else:  # the headers table: its extent is known whatever its content
                end = pos + 4 + _unpack_u32(data, pos)[0]
                if end > n:
                    raise DecodeError("headers overrun the content header")
                try:
                    value = _table_bytes(data, pos + 4, end)
                except DecodeError as exc:
                    props.error = f"headers: {exc}"
                    value = None
                pos = end
            setattr(props, name, value)
        if pos != n:
            raise DecodeError("content header: bytes after its properties")
        return props


# -- frames out --------------------------------------------------------------------------


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    return _FRAME.pack(kind, channel, len(payload)) + payload + _END


def method_frame(channel: int, method: Method) -> bytes:
    return frame(FRAME_METHOD, channel, method.encode())


def publish_frame(channel: int, exchange: str, routing_key: str, mandatory: bool) -> bytes:
    """The ``basic.publish`` method frame (a publisher caches it per target)."""
    payload = b"".join(
        (
            b"\x00\x3c\x00\x28\x00\x00",
            _shortstr(exchange),
            _shortstr(routing_key),
            b"\x01" if mandatory else b"\x00",
        )
    )
    return _FRAME.pack(FRAME_METHOD, channel, len(payload)) + payload + _END


def content_frames(channel: int, properties: bytes, body: bytes, frame_max: int) -> bytes:
    """Content header and body frames; ``properties`` from :meth:`Properties.encode`."""
    header_size = 12 + len(properties)
    out = [
        _FRAME.pack(FRAME_HEADER, channel, header_size),
        b"\x00\x3c\x00\x00",
        _U64.pack(len(body)),
        properties,
        _END,
    ]
    size = frame_max - 8
    if len(body) <= size:
        if body:
            out += (_FRAME.pack(FRAME_BODY, channel, len(body)), body, _END)
    else:
        for start in range(0, len(body), size):
            chunk = body[start : start + size]
            out += (_FRAME.pack(FRAME_BODY, channel, len(chunk)), chunk, _END)
    return b"".join(out)


def ack_frame(channel: int, delivery_tag: int, multiple: bool) -> bytes:
    return b"".join(
        (
            _FRAME.pack(FRAME_METHOD, channel, 13),
            b"\x00\x3c\x00\x50",
            _U64.pack(delivery_tag),
            b"\x01" if multiple else b"\x00",
            _END,
        )
    )


def nack_frame(channel: int, delivery_tag: int, multiple: bool, requeue: bool) -> bytes:
    return b"".join(
        (
            _FRAME.pack(FRAME_METHOD, channel, 13),
            b"\x00\x3c\x00\x78",
            _U64.pack(delivery_tag),
            bytes(((1 if multiple else 0) | (2 if requeue else 0),)),
            _END,
        )
    )


# -- frames in ---------------------------------------------------------------------------


class Delivery:
    """A ``basic.deliver`` with its content, as a consumer's handler receives it.

    The property attributes (``headers``, ``reply_to``, ...) read :attr:`properties`; the
    names are aio-pika's, so a handler reads a delivery as it read an incoming message.
    """

    __slots__ = (
        "body",
        "channel",
        "consumer_tag",
        "delivery_tag",
        "epoch",
        "exchange",
        "properties",
        "raw_properties",
        "redelivered",
        "routing_key",
    )

    def __init__(self) -> None:
        self.channel = 0
        self.consumer_tag = ""
        self.delivery_tag = 0
        self.epoch = 0  # which opening of its channel it came on (set by the consumer)
        self.redelivered = False
        self.exchange = ""
        self.routing_key = ""
        self.properties: Properties = _EMPTY
        self.raw_properties = b"\x00\x00"
        self.body = b""

    @property
    def headers(self) -> dict[str, Any] | None:
        return self.properties.headers

    @property
    def properties_error(self) -> str | None:
        return self.properties.error

    @property
    def content_type(self) -> str | None:
        return self.properties.content_type

    @property
    def content_encoding(self) -> str | None:
        return self.properties.content_encoding

    @property
    def message_id(self) -> str | None:
        return self.properties.message_id

    @property
    def correlation_id(self) -> str | None:
        return self.properties.correlation_id

    @property
    def reply_to(self) -> str | None:
        return self.properties.reply_to

    @property
    def expiration(self) -> str | None:
        return self.properties.expiration

    def __repr__(self) -> str:
        return (
            f"Delivery(tag={self.delivery_tag}, exchange={self.exchange!r}, "
            f"routing_key={self.routing_key!r}, {len(self.body)} bytes)"
        )


class Returned(Delivery):
    """A ``basic.return`` with its content (a mandatory publish nobody could take)."""

    __slots__ = ("reply_code", "reply_text")

    def __init__(self) -> None:
        super().__init__()
        self.reply_code = 0
        self.reply_text = ""


_EMPTY = Properties()


class Heartbeat:
    __slots__ = ()


HEARTBEAT_EVENT = Heartbeat()

# What :meth:`Decoder.feed` returns: (channel, Method | Delivery | Returned | Heartbeat)
Event = tuple[int, Any]


class Decoder:
    """Bytes from the broker -> events, whatever the segmentation.

    A delivery or return is one event once its content header and every body frame
    arrived. After a :class:`DecodeError` the stream is unusable (close the connection).
    """

    __slots__ = ("_buf", "_content", "frame_max")

    def __init__(self, frame_max: int = FRAME_MAX_DEFAULT) -> None:
        self.frame_max = frame_max
        self._buf = b""
        # channel -> [Delivery, body size or -1 before the header, chunks]
        self._content: dict[int, list[Any]] = {}

    def feed(self, data: bytes) -> list[Event]:
        buf = self._buf + data if self._buf else data
        events: list[Event] = []
        pos = 0
        n = len(buf)
        frame_max = self.frame_max
        unpack = _FRAME.unpack_from
        try:
            while n - pos >= 8:
                kind, channel, size = unpack(buf, pos)
                if size + 8 > frame_max and frame_max:
                    raise DecodeError(f"frame of {size} bytes, more than frame_max {frame_max}")
                end = pos + 7 + size
                if end >= n:
                    break
                if buf[end] != FRAME_END:
                    raise DecodeError(f"frame end byte is {buf[end]:#x}, not 0xce")
                payload = buf[pos + 7 : end]
                pos = end + 1
                if kind == FRAME_METHOD:
                    self._method(channel, payload, events)
                elif kind == FRAME_HEADER:
                    self._header(channel, payload, events)
                elif kind == FRAME_BODY:
                    self._body(channel, payload, events)
                elif kind == FRAME_HEARTBEAT:
                    events.append((channel, HEARTBEAT_EVENT))
                else:
                    raise DecodeError(f"unknown frame type {kind}")
        except DecodeError:
            raise
        except Exception as exc:  # a bug here must not look like a different failure
            raise DecodeError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self._buf = buf[pos:] if pos < n else b""
        return events

    def _method(self, channel: int, payload: bytes, events: list[Event]) -> None:
        if channel in self._content:
            raise DecodeError(f"method frame on channel {channel} inside a content")
        head = payload[:4]
        if head == b"\x00\x3c\x00\x50" or head == b"\x00\x3c\x00\x78":  # ack, nack
            if len(payload) != 13:
                raise DecodeError("basic.ack/nack of the wrong size")
            method = (BasicAck if head[3] == 0x50 else BasicNack).__new__(
                BasicAck if head[3] == 0x50 else BasicNack
            )
            method.delivery_tag = _U64.unpack_from(payload, 4)[0]
            flags = payload[12]
            method.multiple = bool(flags & 1)
            if head[3] == 0x78:
                method.requeue = bool(flags & 2)
            events.append((channel, method))
            return
        if head == b"\x00\x3c\x00\x3c":  # deliver
            reader = _Reader(payload, 4)
            d = Delivery()
            d.channel = channel
            d.consumer_tag = reader.shortstr()
            d.delivery_tag = reader.unpack(_U64)
            d.redelivered = bool(reader.octet() & 1)
            d.exchange = reader.shortstr()
            d.routing_key = reader.shortstr()
            if reader.pos != len(payload):
                raise DecodeError("basic.deliver of the wrong size")
            self._content[channel] = [d, -1, []]
            return
        method = _decode_method(payload)
        if isinstance(method, BasicReturn):
            r = Returned()
            r.channel = channel
            r.reply_code = method.reply_code
            r.reply_text = method.reply_text
            r.exchange = method.exchange
            r.routing_key = method.routing_key
            self._content[channel] = [r, -1, []]
            return
        events.append((channel, method))

    def _header(self, channel: int, payload: bytes, events: list[Event]) -> None:
        content = self._content.get(channel)
        if content is None or content[1] != -1:
            raise DecodeError(f"content header without its method on channel {channel}")
        if len(payload) < 14:
            raise DecodeError("content header too short")
        size = _U64.unpack_from(payload, 4)[0]
        d: Delivery = content[0]
        d.raw_properties = payload[12:]
        d.properties = Properties.decode(payload, 12)
        if size == 0:
            del self._content[channel]
            events.append((channel, d))
        else:
            content[1] = size

    def _body(self, channel: int, payload: bytes, events: list[Event]) -> None:
        content = self._content.get(channel)
        if content is None or content[1] < 0:
            raise DecodeError(f"body frame without its header on channel {channel}")
        chunks: list[bytes] = content[2]
        chunks.append(payload)
        size = content[1]
        have = len(payload) if len(chunks) == 1 else sum(map(len, chunks))
        if have < size:
            return
        if have > size:
            raise DecodeError("more body than the content header announced")
        del self._content[channel]
        d: Delivery = content[0]
        d.body = payload if len(chunks) == 1 else b"".join(chunks)
        events.append((channel, d))

    def reset_channel(self, channel: int) -> None:
        """Forget a content being assembled on a channel that closed."""
        self._content.pop(channel, None)
