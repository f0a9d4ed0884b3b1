"""AMQP 0-9-1 methods: one class per method the workers use, encoded and decoded (sans-I/O)."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, ClassVar

from bridge.amqp.frames.tables import (
    _U8,
    _U16,
    _U32,
    _U64,
    DecodeError,
    EncodeError,
    _longstr,
    _Reader,
    _shortstr,
    encode_table,
)

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
