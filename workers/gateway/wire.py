"""Gateway wire framing: frame encoders and an incremental decoder, with no I/O.

This module owns the byte format spoken on the gateway's TCP port (design.md, "Wire contract:
gateway") and nothing else: it never touches a socket, a clock or the broker. The adapter feeds
it whatever bytes a read returned and acts on the frames or the `ProtocolError` it gets back,
the way h11 keeps HTTP state apart from the transport.

Every frame, in both directions::

    uint32 big-endian LENGTH   bytes that follow (the type byte plus the payload)
    uint8  TYPE
    LENGTH-1 bytes of payload

The first frame from a client must be HELLO; that is how the gateway tells a long-connection
client from a stray HTTP request or TLS handshake, which are recognised from their first bytes
so that they get an explanation instead of "frame too large".
"""

from __future__ import annotations

import enum
import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

__all__ = [
    "BYE_FRAME",
    "HTTP_400_RESPONSE",
    "MAX_CLIENT_ID_CHARS",
    "MAX_TOKEN_CHARS",
    "PING_FRAME",
    "PONG_FRAME",
    "PROTOCOL_VERSION",
    "PROTOCOL_VERSIONS",
    "SEQ_BYTES",
    "ErrorCode",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "Hello",
    "ProtocolError",
    "Role",
    "encode",
    "encode_ack",
    "encode_data",
    "encode_error",
    "encode_hello",
    "encode_welcome",
    "parse_hello",
    "sniff_http",
    "sniff_tls",
    "split_seq",
]

PROTOCOL_VERSION: Final = 1
# 2: every client DATA starts with an 8-byte big-endian sequence number, which the gateway
# answers with ACK once the broker has confirmed that message
PROTOCOL_VERSIONS: Final = (1, 2)
SEQ_BYTES: Final = 8
MAX_SEQ: Final = (1 << 63) - 1  # x-seq is a signed 64-bit AMQP integer
MAX_CLIENT_ID_CHARS: Final = 256
MAX_TOKEN_CHARS: Final = 256

# LENGTH is a uint32 and counts the type byte, so a payload can be at most 2**32 - 2 bytes.
_MAX_LENGTH: Final = 0xFFFF_FFFF
_LENGTH = struct.Struct(">I")
_HEADER = struct.Struct(">IB")
_HEADER_SIZE: Final = _HEADER.size  # 5: LENGTH + TYPE

_Bytes: TypeAlias = bytes | bytearray | memoryview


class FrameType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    DATA = 3
    PING = 4
    PONG = 5
    ERROR = 6
    BYE = 7
    ACK = 8  # protocol version 2, gateway -> client: the DATA with this sequence number is safe


_KNOWN_TYPES: Final = frozenset(int(t) for t in FrameType)
# Control frames carry nothing; a payload on them means the peer has misread the contract.
_EMPTY_TYPES: Final = frozenset({FrameType.PING, FrameType.PONG, FrameType.BYE})
# What each side may receive. WELCOME and ERROR only ever travel gateway -> client.
_FROM_CLIENT: Final = frozenset(
    {FrameType.HELLO, FrameType.DATA, FrameType.PING, FrameType.PONG, FrameType.BYE}
)
_FROM_GATEWAY: Final = frozenset(
    {
        FrameType.WELCOME,
        FrameType.DATA,
        FrameType.PING,
        FrameType.PONG,
        FrameType.ERROR,
        FrameType.BYE,
        FrameType.ACK,
    }
)


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    payload: bytes


ErrorCode = Literal[
    "bad_frame",
    "frame_too_large",
    "bad_type",
    "not_hello",
    "http_not_supported",
    "bad_hello",
    "tls_not_supported",
    "bad_proxy_header",
]


class ProtocolError(Exception):
    """The peer broke the framing contract; the connection cannot continue.

    `code` is stable and goes into the ERROR frame (or, for ``http_not_supported``, tells the
    adapter to answer with `HTTP_400_RESPONSE` instead); `message` is for humans.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code: ErrorCode = code
        self.message = message


# --------------------------------------------------------------------------- encoders


def encode(type: FrameType, payload: _Bytes = b"") -> bytes:
    """One frame as bytes ready to write. Raises ValueError for frames the contract forbids."""
    frame_type = FrameType(type)  # ValueError for an int that is not a known type
    size = memoryview(payload).nbytes
    if size and frame_type in _EMPTY_TYPES:
        raise ValueError(f"{frame_type.name} frames carry no payload")
    if size + 1 > _MAX_LENGTH:
        raise ValueError(f"payload of {size} bytes does not fit a uint32 LENGTH")
    return b"".join((_HEADER.pack(size + 1, frame_type), payload))


def encode_data(payload: _Bytes) -> bytes:
    return encode(FrameType.DATA, payload)


def _json(obj: dict[str, Any]) -> bytes:
    # Compact and strict: the other side may be a small embedded client.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def encode_hello(
    client_id: str | None = None, token: str | None = None, *, version: int = PROTOCOL_VERSION
) -> bytes:
    """HELLO as a client sends it (for tests, benchmarks and client libraries)."""
    body: dict[str, Any] = {"v": version}
    if client_id is not None:
        body["client_id"] = client_id
    if token is not None:
        body["token"] = token
    return encode(FrameType.HELLO, _json(body))


def encode_welcome(
    session: str, server: str, heartbeat_s: float, version: int = PROTOCOL_VERSION
) -> bytes:
    if isinstance(heartbeat_s, bool) or not (
        isinstance(heartbeat_s, int | float) and math.isfinite(heartbeat_s) and heartbeat_s > 0
    ):
        raise ValueError(f"heartbeat_s must be a positive number, got {heartbeat_s!r}")
    body = {"v": version, "session": session, "server": server, "heartbeat_s": heartbeat_s}
    return encode(FrameType.WELCOME, _json(body))


def encode_error(code: str, message: str) -> bytes:
    """ERROR frame; `code` is usually a `ProtocolError.code` but adapters add their own."""
    return encode(FrameType.ERROR, _json({"code": code, "message": message}))


def encode_ack(seq: _Bytes) -> bytes:
    """ACK of a version 2 DATA: its 8-byte sequence number, as the client sent it."""
    return encode(FrameType.ACK, seq)


def split_seq(payload: bytes) -> tuple[int, bytes]:
    """A version 2 DATA payload as (sequence number, message). ProtocolError ``bad_frame``
    for one shorter than the sequence number or with a number over 2**63 - 1."""
    if len(payload) < SEQ_BYTES:
        raise ProtocolError(
            "bad_frame",
            f"a version 2 DATA starts with an {SEQ_BYTES}-byte sequence number; "
            f"got {len(payload)} bytes",
        )
    seq = int.from_bytes(payload[:SEQ_BYTES], "big")
    if seq > MAX_SEQ:
        raise ProtocolError("bad_frame", f"sequence number {seq} is over 2**63 - 1")
    return seq, payload[SEQ_BYTES:]


PING_FRAME: Final = encode(FrameType.PING)
PONG_FRAME: Final = encode(FrameType.PONG)
BYE_FRAME: Final = encode(FrameType.BYE)


# --------------------------------------------------------------------------- sniffing

# HTTP methods a misdirected browser, health checker or proxy sends. PRI is the HTTP/2 preface
# and TRACE completes RFC 9110's list; neither can start a valid frame either.
_HTTP_METHODS: Final = tuple(
    m.encode() + b" "
    for m in ("GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE", "PRI")
)
_SNIFF_BYTES: Final = max(len(m) for m in _HTTP_METHODS)
# TLS record header: content type 22 (handshake), then the 0x03 major version byte.
_TLS_PREFIX: Final = b"\x16\x03"

_HTTP_400_BODY: Final = (
    b"This port speaks the RabbitMQ bridge gateway framing, not HTTP.\n"
    b"Connect with a raw TCP client: frames are a uint32 big-endian length, a type byte and a\n"
    b"payload, and the first frame must be HELLO.\n"
)
HTTP_400_RESPONSE: Final = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: " + str(len(_HTTP_400_BODY)).encode() + b"\r\n"
    b"Connection: close\r\n"
    b"\r\n" + _HTTP_400_BODY
)


def sniff_http(data: _Bytes) -> bool:
    """True if `data` starts like an HTTP/1.x request line (or the HTTP/2 preface)."""
    head = bytes(memoryview(data)[:_SNIFF_BYTES])
    return head.startswith(_HTTP_METHODS)


def sniff_tls(data: _Bytes) -> bool:
    """True if `data` starts like a TLS record carrying a handshake (a ClientHello)."""
    return bytes(memoryview(data)[: len(_TLS_PREFIX)]) == _TLS_PREFIX


def _may_become_http(head: bytes) -> bool:
    # "POS" could still turn into "POST "; wait rather than misreport it as a huge frame.
    return any(m.startswith(head) for m in _HTTP_METHODS)


# --------------------------------------------------------------------------- decoder

Role = Literal["gateway", "client"]


class FrameDecoder:
    """Incremental decoder for one connection's inbound byte stream.

    ``role="gateway"`` (the default) decodes what a client sends: the first frame must be
    HELLO and is held to ``max_hello_frame`` payload bytes, later frames to ``max_frame``;
    HTTP and TLS openers are recognised. ``role="client"`` decodes what the gateway sends,
    with ``max_frame`` throughout, for tests and client libraries.

    Limits are checked from the 4-byte LENGTH alone, so an oversized frame is refused before
    any of its payload is buffered. After a `ProtocolError` the decoder is dead: every later
    `feed` raises the same error, and frames decoded earlier in the failing call are dropped
    (the peer broke the contract; the adapter closes the connection). `feed_until_error`
    returns those frames with the error instead, which is what the gateway uses.
    """

    __slots__ = ("_accepts", "_buf", "_error", "_greeted", "_max_frame", "_max_hello", "_role")

    def __init__(self, max_frame: int, max_hello_frame: int, *, role: Role = "gateway") -> None:
        if max_frame < 0 or max_hello_frame < 0:
            raise ValueError("frame limits must be >= 0")
        self._max_frame = max_frame
        self._max_hello = max_hello_frame
        self._role: Role = role
        self._accepts = _FROM_CLIENT if role == "gateway" else _FROM_GATEWAY
        # Only the gateway side waits for HELLO; a client decoder starts in the open state.
        self._greeted = role == "client"
        # Invariant between calls: _buf starts at a frame boundary. Consumed bytes are cut off
        # once per feed, which only costs the size of the partial frame that *started* in
        # that same feed, so total work stays linear however the stream is chunked.
        self._buf = bytearray()
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (for per-connection memory accounting)."""
        return len(self._buf)

    @property
    def greeted(self) -> bool:
        """Whether HELLO has been decoded (always True for ``role="client"``)."""
        return self._greeted

    @property
    def max_payload(self) -> int:
        """Largest payload the next frame may carry."""
        return self._max_frame if self._greeted else self._max_hello

    def feed(self, data: _Bytes) -> list[Frame]:
        """Take the next bytes read from the connection; return the frames they completed."""
        frames, error = self.feed_until_error(data)
        if error is not None:
            raise error
        return frames

    def feed_until_error(self, data: _Bytes) -> tuple[list[Frame], ProtocolError | None]:
        """Like `feed`, but a broken frame does not cost the good ones before it in the same
        read: they are returned together with the error (then the decoder is dead).

        What a peer is answered then depends only on the byte stream, never on how TCP
        happened to split it into reads: the frames before the first violation, then it.
        """
        if self._error is not None:
            return [], self._error
        if data:
            self._buf += data
        frames: list[Frame] = []
        try:
            consumed = self._parse(frames)
        except ProtocolError as exc:
            self._error = exc
            self._buf = bytearray()  # nothing more will be parsed; give the memory back
            return frames, exc
        if consumed == len(self._buf):
            self._buf.clear()
        elif consumed:
            del self._buf[:consumed]
        return frames, None

    def _parse(self, out: list[Frame]) -> int:
        buf = self._buf
        end = len(buf)
        pos = 0
        with memoryview(buf) as view:
            while pos < end:
                avail = end - pos
                if not self._greeted and self._sniff_wait(bytes(view[pos : pos + _SNIFF_BYTES])):
                    break
                if avail < _LENGTH.size:
                    break
                (length,) = _LENGTH.unpack_from(buf, pos)
                if length == 0:
                    raise ProtocolError("bad_frame", "frame LENGTH is 0: no type byte")
                limit = self.max_payload
                if length - 1 > limit:
                    which = "HELLO" if not self._greeted else "frame"
                    raise ProtocolError(
                        "frame_too_large",
                        f"{which} payload of {length - 1} bytes exceeds the limit of {limit}",
                    )
                if avail < _HEADER_SIZE:
                    break
                frame_type = self._check_type(buf[pos + _LENGTH.size], length)
                if avail < _LENGTH.size + length:
                    break
                payload = bytes(view[pos + _HEADER_SIZE : pos + _LENGTH.size + length])
                pos += _LENGTH.size + length
                if frame_type is FrameType.HELLO:
                    self._greeted = True
                out.append(Frame(frame_type, payload))
        return pos

    def _sniff_wait(self, head: bytes) -> bool:
        """Before HELLO: raise for HTTP/TLS openers; True if more bytes are needed to tell."""
        if self._role != "gateway":
            return False
        if head.startswith(_HTTP_METHODS):
            raise ProtocolError(
                "http_not_supported", "this port speaks the gateway framing, not HTTP"
            )
        if head.startswith(_TLS_PREFIX):
            raise ProtocolError(
                "tls_not_supported", "TLS is not terminated here; connect with plain TCP"
            )
        # A real HELLO starts with a small LENGTH (0x00 first byte), so this never delays it.
        return len(head) < _SNIFF_BYTES and _may_become_http(head)

    def _check_type(self, raw: int, length: int) -> FrameType:
        if raw not in _KNOWN_TYPES:
            raise ProtocolError("bad_type", f"unknown frame type {raw}")
        frame_type = FrameType(raw)
        if not self._greeted and frame_type is not FrameType.HELLO:
            raise ProtocolError("not_hello", f"first frame must be HELLO, got {frame_type.name}")
        # A second HELLO would let a client re-pick its server or dodge max_hello_frame.
        if frame_type not in self._accepts or (frame_type is FrameType.HELLO and self._greeted):
            raise ProtocolError(
                "bad_type", f"{frame_type.name} is not valid from this peer at this point"
            )
        if frame_type in _EMPTY_TYPES and length != 1:
            raise ProtocolError("bad_frame", f"{frame_type.name} frames carry no payload")
        return frame_type


# --------------------------------------------------------------------------- HELLO


@dataclass(frozen=True, slots=True)
class Hello:
    v: int
    client_id: str | None
    token: str | None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_hello(payload: _Bytes) -> Hello:
    """Validate a HELLO payload. Unknown keys are ignored so clients can add fields later."""
    try:
        text = bytes(payload).decode("utf-8")
        obj = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ProtocolError("bad_hello", "HELLO payload is not UTF-8") from None
    except RecursionError:
        # The C scanner recurses per nesting level; "[" * 100000 must not kill the worker.
        raise ProtocolError("bad_hello", "HELLO payload is nested too deeply") from None
    except ValueError:  # JSONDecodeError and NaN/Infinity
        raise ProtocolError("bad_hello", "HELLO payload is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_hello", "HELLO payload must be a JSON object")
    version = obj.get("v")
    # type() rather than isinstance: True == 1 in Python, and 1.0 is not a version number.
    if type(version) is not int or version not in PROTOCOL_VERSIONS:
        raise ProtocolError("bad_hello", f"unsupported HELLO version {version!r}; expected 1 or 2")
    return Hello(
        v=version,
        client_id=_optional_str(obj, "client_id", MAX_CLIENT_ID_CHARS),
        token=_optional_str(obj, "token", MAX_TOKEN_CHARS),
    )


def _optional_str(obj: dict[str, Any], key: str, max_chars: int) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ProtocolError("bad_hello", f"HELLO {key} must be a non-empty string")
    if len(value) > max_chars:
        raise ProtocolError("bad_hello", f"HELLO {key} is longer than {max_chars} characters")
    try:
        # JSON escapes can spell lone surrogates ("\ud800"), which no UTF-8 encoder takes:
        # the client id goes into AMQP headers and SQLite, the token is compared as bytes.
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("bad_hello", f"HELLO {key} is not valid Unicode") from None
    return value
