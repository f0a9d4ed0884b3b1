"""AMQP 0-9-1 frames of the gateway's per-message traffic, encoded and decoded by hand.

Pure functions and a decoder with no I/O, for :mod:`workers.gateway.amqp_link`. pamqp builds
an object per frame and decodes every property of every delivery; per client message that
was the largest part of the gateway's CPU. Here only the frames that come once per message
have a fast path: ``basic.publish`` + content header + body out, ``basic.ack`` /
``basic.nack`` and ``basic.deliver`` + content header + body in (of a delivery only the
headers table is decoded, and only its ``S`` and ``t`` fields without pamqp; the other
properties stay raw until someone asks, e.g. for ``gateway.undeliverable``). Every other
method (handshake, channel and consumer setup, ``basic.return``, closes) is handed to pamqp,
so its bytes are decoded exactly as pamqp would. tests/unit/test_gateway_amqp_codec.py
checks both directions against pamqp.
"""

from __future__ import annotations

import struct
from typing import Any

from pamqp import decode as pamqp_decode
from pamqp import frame as pamqp_frame
from pamqp.commands import Basic
from pamqp.header import ContentHeader

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_HEARTBEAT = 8
FRAME_END = 0xCE
PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
HEARTBEAT_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"

_FRAME = struct.Struct(">BHI")  # type, channel, size
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_END = b"\xce"
_BASIC_CLASS = b"\x00\x3c\x00\x00"  # class 60 (basic), weight 0

_ACK = b"\x00\x3c\x00\x50"  # basic.ack (60, 80)
_NACK = b"\x00\x3c\x00\x78"  # basic.nack (60, 120)
_DELIVER = b"\x00\x3c\x00\x3c"  # basic.deliver (60, 60)
_RETURN = b"\x00\x3c\x00\x32"  # basic.return (60, 50)

# Decoder events: (kind, channel, value)
EV_ACK = 0  # value: (delivery_tag, multiple)
EV_NACK = 1  # value: (delivery_tag, multiple)
EV_DELIVER = 2  # value: Delivery
EV_RETURN = 3  # value: Delivery (method = the pamqp Basic.Return)
EV_METHOD = 4  # value: a pamqp method object
EV_HEARTBEAT = 5  # value: None

Event = tuple[int, int, Any]


class FrameError(Exception):
    """The broker sent bytes that are not AMQP 0-9-1 as we understand it."""


class Delivery:
    """A ``basic.deliver`` (or ``basic.return``) with its content.

    ``headers`` is decoded at once (the gateway routes by it); the other properties only
    on :meth:`properties`.
    """

    __slots__ = (
        "body",
        "consumer_tag",
        "delivery_tag",
        "exchange",
        "flags",
        "headers",
        "method",
        "raw_header",
        "redelivered",
        "routing_key",
    )

    def __init__(self) -> None:
        self.consumer_tag = ""
        self.delivery_tag = 0
        self.redelivered = False
        self.exchange = ""
        self.routing_key = ""
        self.method: Any = None
        self.raw_header = b""
        self.flags = 0
        self.headers: dict[str, Any] | None = None
        self.body = b""

    def properties(self) -> Basic.Properties:
        """All properties, decoded by pamqp."""
        header = ContentHeader()
        header.unmarshal(self.raw_header)
        return header.properties


# -- encoding ------------------------------------------------------------------------------


def method_frame(method: Any, channel: int) -> bytes:
    """Any method frame, by pamqp (rare frames: handshake, setup, close)."""
    return pamqp_frame.marshal(method, channel)


def publish_method(channel: int, routing_key: str, *, mandatory: bool = True) -> bytes:
    """The ``basic.publish`` frame to the default exchange (cache it per routing key)."""
    return pamqp_frame.marshal(
        Basic.Publish(exchange="", routing_key=routing_key, mandatory=mandatory), channel
    )


def encode_content(
    channel: int, properties_prefix: bytes, message_id: bytes, body: bytes, frame_max: int
) -> bytes:
    """Content header and body frames of one publish.

    ``properties_prefix`` is the encoded property flags and fields up to (not including)
    the message id, which must be the last property set (see ``amqp_io.Prepared``).
    """
    header = b"".join(
        (
            _BASIC_CLASS,
            _U64.pack(len(body)),
            properties_prefix,
            bytes((len(message_id),)),
            message_id,
        )
    )
    out = [_FRAME.pack(FRAME_HEADER, channel, len(header)), header, _END]
    size = frame_max - 8
    if len(body) <= size:
        if body:
            out += (_FRAME.pack(FRAME_BODY, channel, len(body)), body, _END)
    else:
        for start in range(0, len(body), size):
            chunk = body[start : start + size]
            out += (_FRAME.pack(FRAME_BODY, channel, len(chunk)), chunk, _END)
    return b"".join(out)


def encode_content_pamqp(
    channel: int, properties: Basic.Properties, body: bytes, frame_max: int
) -> bytes:
    """Content header and body frames with any properties, by pamqp (the rare publishes)."""
    from pamqp.body import ContentBody

    out = [pamqp_frame.marshal(ContentHeader(0, len(body), properties), channel)]
    size = frame_max - 8
    for start in range(0, len(body), size):
        out.append(pamqp_frame.marshal(ContentBody(body[start : start + size]), channel))
    return b"".join(out)


# -- decoding ------------------------------------------------------------------------------


def decode_headers(data: bytes, pos: int) -> tuple[dict[str, Any], int]:
    """The field table at ``pos``: (table, position after it). Long strings and booleans
    without pamqp (what the gateway's replies carry), anything else by pamqp."""
    (size,) = _U32.unpack_from(data, pos)
    end = pos + 4 + size
    if end > len(data):
        raise FrameError("headers table longer than its frame")
    out: dict[str, Any] = {}
    p = pos + 4
    try:
        while p < end:
            klen = data[p]
            key = data[p + 1 : p + 1 + klen].decode("utf-8")
            p += 1 + klen
            kind = data[p]
            if kind == 0x53:  # 'S' long string: str if UTF-8, else bytes (as pamqp)
                (length,) = _U32.unpack_from(data, p + 1)
                raw = data[p + 5 : p + 5 + length]
                p += 5 + length
                try:
                    out[key] = raw.decode("utf-8")
                except UnicodeDecodeError:
                    out[key] = raw
            elif kind == 0x74:  # 't' boolean
                out[key] = bool(data[p + 1])
                p += 2
            else:
                raise LookupError
    except (LookupError, UnicodeDecodeError, struct.error):
        try:
            _, table = pamqp_decode.field_table(data[pos:end])
        except Exception as exc:
            raise FrameError(f"headers table not decodable: {exc}") from exc
        return dict(table), end
    if p != end:
        raise FrameError("headers table overruns its length")
    return out, end


def _skip_short(data: bytes, pos: int) -> int:
    return pos + 1 + data[pos]


class Decoder:
    """Bytes from the broker -> events, whatever the TCP segmentation.

    ``feed`` returns the events of all frames completed by the bytes given; a frame split
    across reads waits for its end. A delivery is one event once its header and all body
    frames arrived.
    """

    __slots__ = ("_buf", "_content", "frame_max")

    def __init__(self, frame_max: int = 131072) -> None:
        self.frame_max = frame_max
        self._buf = b""
        # channel -> (kind, Delivery, body size, body chunks) of a content being assembled
        self._content: dict[int, list[Any]] = {}

    def feed(self, data: bytes) -> list[Event]:
        buf = self._buf + data if self._buf else data
        events: list[Event] = []
        pos = 0
        n = len(buf)
        frame_max = self.frame_max
        unpack = _FRAME.unpack_from
        try:
            while n - pos >= 7:
                kind, channel, size = unpack(buf, pos)
                if size > frame_max:
                    raise FrameError(f"frame of {size} bytes, more than frame_max {frame_max}")
                end = pos + 7 + size
                if end >= n:
                    break
                if buf[end] != FRAME_END:
                    raise FrameError(f"frame end byte is {buf[end]:#x}, not 0xce")
                payload = buf[pos + 7 : end]
                pos = end + 1
                if kind == FRAME_METHOD:
                    self._method(channel, payload, events)
                elif kind == FRAME_HEADER:
                    self._header(channel, payload, events)
                elif kind == FRAME_BODY:
                    self._body(channel, payload, events)
                elif kind == FRAME_HEARTBEAT:
                    events.append((EV_HEARTBEAT, channel, None))
                else:
                    raise FrameError(f"unknown frame type {kind}")
        finally:
            self._buf = buf[pos:] if pos < n else b""
        return events

    def _method(self, channel: int, payload: bytes, events: list[Event]) -> None:
        if channel in self._content:
            raise FrameError(f"method frame on channel {channel} inside a content")
        head = payload[:4]
        if head == _ACK or head == _NACK:
            if len(payload) != 13:
                raise FrameError("basic.ack/nack of the wrong size")
            (tag,) = _U64.unpack_from(payload, 4)
            events.append((EV_ACK if head == _ACK else EV_NACK, channel, (tag, payload[12] & 1)))
            return
        if head == _DELIVER:
            d = Delivery()
            p = 4
            try:
                end = _skip_short(payload, p)
                d.consumer_tag = payload[p + 1 : end].decode("utf-8")
                (d.delivery_tag,) = _U64.unpack_from(payload, end)
                d.redelivered = bool(payload[end + 8] & 1)
                p = end + 9
                end = _skip_short(payload, p)
                d.exchange = payload[p + 1 : end].decode("utf-8")
                p = end
                end = _skip_short(payload, p)
                d.routing_key = payload[p + 1 : end].decode("utf-8")
            except (IndexError, struct.error, UnicodeDecodeError) as exc:
                raise FrameError(f"basic.deliver not decodable: {exc}") from exc
            if end != len(payload):
                raise FrameError("basic.deliver of the wrong size")
            self._content[channel] = [EV_DELIVER, d, -1, []]
            return
        try:
            _, _, method_any = pamqp_frame.unmarshal(
                _FRAME.pack(FRAME_METHOD, channel, len(payload)) + payload + _END
            )
        except Exception as exc:
            raise FrameError(f"method frame not decodable: {exc}") from exc
        method: Any = method_any
        if head == _RETURN:
            d = Delivery()
            d.method = method
            d.exchange = method.exchange
            d.routing_key = method.routing_key
            self._content[channel] = [EV_RETURN, d, -1, []]
            return
        events.append((EV_METHOD, channel, method))

    def _header(self, channel: int, payload: bytes, events: list[Event]) -> None:
        content = self._content.get(channel)
        if content is None or content[2] != -1:
            raise FrameError(f"content header without its method on channel {channel}")
        if len(payload) < 14:
            raise FrameError("content header too short")
        (size,) = _U64.unpack_from(payload, 4)
        (flags,) = _U16.unpack_from(payload, 12)
        d: Delivery = content[1]
        d.raw_header = payload
        d.flags = flags
        if flags & 0x2000:  # headers
            p = 14
            last = flags
            while last & 1:  # continuation flag words
                (last,) = _U16.unpack_from(payload, p)
                p += 2
            if flags & 0x8000:
                p = _skip_short(payload, p)
            if flags & 0x4000:
                p = _skip_short(payload, p)
            try:
                d.headers, _ = decode_headers(payload, p)
            except (IndexError, struct.error) as exc:
                raise FrameError(f"content header not decodable: {exc}") from exc
        if size == 0:
            del self._content[channel]
            events.append((content[0], channel, d))
        else:
            content[2] = size

    def _body(self, channel: int, payload: bytes, events: list[Event]) -> None:
        content = self._content.get(channel)
        if content is None or content[2] < 0:
            raise FrameError(f"body frame without its header on channel {channel}")
        chunks: list[bytes] = content[3]
        chunks.append(payload)
        size = content[2]
        have = len(payload) if len(chunks) == 1 else sum(map(len, chunks))
        if have < size:
            return
        if have > size:
            raise FrameError("more body than the content header announced")
        del self._content[channel]
        d: Delivery = content[1]
        d.body = payload if len(chunks) == 1 else b"".join(chunks)
        events.append((content[0], channel, d))
