"""AMQP 0-9-1 frames: encoding the frames the workers write, and the incremental
:class:`Decoder` of what the broker sends (sans-I/O)."""

from __future__ import annotations

import struct
from typing import Any

from bridge.amqp.frames.methods import BasicAck, BasicNack, BasicReturn, Method, _decode_method
from bridge.amqp.frames.properties import Properties
from bridge.amqp.frames.tables import (
    _END,
    _FRAME,
    _U64,
    FRAME_BODY,
    FRAME_END,
    FRAME_HEADER,
    FRAME_HEARTBEAT,
    FRAME_MAX_DEFAULT,
    FRAME_METHOD,
    DecodeError,
    _shortstr,
)

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


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace")


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
        if head == b"\x00\x3c\x00\x3c":  # deliver: the hot path, without a _Reader
            d = Delivery()
            d.channel = channel
            try:
                end = 5 + payload[4]
                d.consumer_tag = _text(payload[5:end])
                d.delivery_tag = _U64.unpack_from(payload, end)[0]
                d.redelivered = bool(payload[end + 8] & 1)
                pos = end + 10 + payload[end + 9]
                d.exchange = _text(payload[end + 10 : pos])
                end = pos + 1 + payload[pos]
                d.routing_key = _text(payload[pos + 1 : end])
            except (IndexError, struct.error):
                raise DecodeError("basic.deliver shorter than its fields") from None
            if end != len(payload):  # also a short string that ran past the end
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
