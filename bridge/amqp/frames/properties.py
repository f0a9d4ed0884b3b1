"""AMQP 0-9-1 basic properties (the content header), decoded and encoded (sans-I/O)."""

from __future__ import annotations

import datetime
import struct
from typing import Any

from bridge.amqp.frames.tables import (
    _U8,
    _U16,
    _U64,
    DecodeError,
    EncodeError,
    _shortstr,
    _table_bytes,
    _timestamp,
    _to_datetime,
    _unpack_u32,
    encode_table,
)

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

# the flag bits of the short strings before the headers table, and the table's own
_BEFORE_HEADERS = tuple(bit for name, _, bit in _PROPERTIES[: PROPERTY_NAMES.index("headers")])
_HEADERS_BIT = _PROPERTIES[PROPERTY_NAMES.index("headers")][2]

# property flags -> the (name, type) of each property they announce, in wire order: a
# decode walks only the fields that are there (at most 2**14 combinations of the 14 bits)
_FIELDS: dict[int, tuple[tuple[str, str], ...]] = {}


def _fields(flags: int) -> tuple[tuple[str, str], ...]:
    fields = _FIELDS.get(flags)
    if fields is None:
        fields = _FIELDS[flags] = tuple(
            (name, kind) for name, kind, bit in _PROPERTIES if flags & bit
        )
    return fields


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
        props.content_type = props.content_encoding = props.headers = None
        props.delivery_mode = props.priority = props.correlation_id = props.reply_to = None
        props.expiration = props.message_id = props.timestamp = props.type = None
        props.user_id = props.app_id = props.cluster_id = props.error = None
        for name, kind in _FIELDS.get(flags & 0xFFFC) or _fields(flags & 0xFFFC):
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


def replace_headers(raw: bytes, headers: dict[str, Any] | None) -> bytes | None:
    """Encoded properties ``raw`` (a content header's, property flags first, as
    :meth:`Properties.decode` read them) with the headers table replaced by ``headers``
    (None or empty: no headers) and every other field kept byte for byte: what a worker
    that only changes headers sends on, without encoding every property again. None when
    ``raw`` has property flag continuation words (AMQP 0-9-1 defines none): encode those.
    Raises :class:`EncodeError` for a header value that cannot be written."""
    flags = _U16.unpack_from(raw, 0)[0]
    if flags & 1:
        return None
    pos = 2
    for bit in _BEFORE_HEADERS:  # content_type, content_encoding: short strings
        if flags & bit:
            pos += 1 + raw[pos]
    start = pos
    if flags & _HEADERS_BIT:
        pos += 4 + _unpack_u32(raw, pos)[0]
    if headers:
        try:
            table = encode_table(headers)
        except (EncodeError, struct.error, TypeError, AttributeError) as exc:
            raise EncodeError(f"property headers: {exc}") from exc
        return _U16.pack(flags | _HEADERS_BIT) + raw[2:start] + table + raw[pos:]
    return _U16.pack(flags & ~_HEADERS_BIT) + raw[2:start] + raw[pos:]
