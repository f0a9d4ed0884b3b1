"""AMQP 0-9-1 field tables and values, and the codec's errors (sans-I/O)."""

from __future__ import annotations

import calendar
import datetime
import decimal
import struct
import time
from typing import Any

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


class Double(float):
    """A float that travels as AMQP's 64-bit ``d``. A table value decoded from ``d`` is one, so
    it is written back as ``d``, unchanged; a plain ``float`` is written as the 32-bit ``f``,
    as pamqp (and so aio-pika) write it."""

    __slots__ = ()


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
        if kind is Double:
            return b"d" + _F64.pack(value)
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
}


def _any(buf: bytes, pos: int, end: int, kind: int, depth: int) -> tuple[Any, int]:
    """A field value of type ``kind`` at ``pos``; returns it and the position after."""
    st = _SCALARS.get(kind)
    if st is not None:
        vend = pos + st.size
        if vend > end:
            raise DecodeError("value overruns the table")
        return st.unpack_from(buf, pos)[0], vend
    if kind == 0x64:  # d: kept a Double, so that it is written back as d
        if pos + 8 > end:
            raise DecodeError("value overruns the table")
        return Double(_F64.unpack_from(buf, pos)[0]), pos + 8
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
