"""The framings of listeners for clients that already exist (docs/gateway.md, Listeners):
``length``, ``lines`` and ``raw``. Pure, no I/O, like :mod:`workers.gateway.wire`, whose
:class:`~workers.gateway.wire.ProtocolError` they raise for a frame over the limit.

No HELLO, no frame types: every frame (or line, or chunk) is one message. A codec cuts the
inbound stream into payloads and frames the server's replies; like the ``frames`` decoder it
is dead after an error.
"""

from __future__ import annotations

from typing import Final, Literal, TypeAlias

from workers.gateway.wire import ProtocolError

__all__ = ["Framing", "LengthCodec", "LineCodec", "RawCodec", "StreamCodec", "stream_codec"]

_Bytes: TypeAlias = bytes | bytearray | memoryview


class LengthCodec:
    """A length prefix of ``length_bytes`` (1, 2 or 4) in ``byte_order``, counting the
    payload only, then the payload. A LENGTH of 0 is an empty message."""

    __slots__ = ("_buf", "_error", "_max", "_order", "_size")

    def __init__(self, max_frame: int, length_bytes: int, byte_order: Literal["big", "little"]):
        if length_bytes not in (1, 2, 4):
            raise ValueError("length_bytes must be 1, 2 or 4")
        if byte_order not in ("big", "little"):
            raise ValueError("byte_order must be big or little")
        self._size = length_bytes
        self._order: Literal["big", "little"] = byte_order
        self._max = max_frame
        self._buf = bytearray()
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed_until_error(self, data: _Bytes) -> tuple[list[bytes], ProtocolError | None]:
        if self._error is not None:
            return [], self._error
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos, end, size = 0, len(buf), self._size
        while end - pos >= size:
            length = int.from_bytes(buf[pos : pos + size], self._order)
            if length > self._max:
                self._error = ProtocolError(
                    "frame_too_large",
                    f"payload of {length} bytes exceeds the limit of {self._max}",
                )
                self._buf = bytearray()
                return out, self._error
            if end - pos - size < length:
                break
            out.append(bytes(buf[pos + size : pos + size + length]))
            pos += size + length
        if pos:
            del buf[:pos]
        return out, None

    def encode(self, payload: _Bytes) -> bytes:
        size = memoryview(payload).nbytes
        if size >= 1 << (8 * self._size):
            raise ValueError(f"{size} bytes do not fit a {self._size}-byte length prefix")
        return size.to_bytes(self._size, self._order) + bytes(payload)


class LineCodec:
    """``\n``-terminated lines (``\r\n`` accepted); the terminator is not part of the
    message. A line longer than ``max_frame`` is refused as soon as that is certain, before
    its end arrives. Replies are written as the body followed by ``\n``."""

    __slots__ = ("_buf", "_error", "_max")

    def __init__(self, max_frame: int) -> None:
        self._max = max_frame
        self._buf = bytearray()
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed_until_error(self, data: _Bytes) -> tuple[list[bytes], ProtocolError | None]:
        if self._error is not None:
            return [], self._error
        buf = self._buf
        start = len(buf)
        buf += data
        out: list[bytes] = []
        pos = 0
        # only the new bytes can hold a terminator the last feed has not seen
        nl = buf.find(b"\n", start)
        while nl >= 0:
            line = buf[pos:nl]
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self._max:
                return out, self._fail()
            out.append(bytes(line))
            pos = nl + 1
            nl = buf.find(b"\n", pos)
        if pos:
            del buf[:pos]
        # the partial line: over the limit for sure, unless its last byte is a \r to drop
        rest = len(buf)
        if rest > self._max + 1 or (rest == self._max + 1 and not buf.endswith(b"\r")):
            return out, self._fail()
        return out, None

    def _fail(self) -> ProtocolError:
        self._error = ProtocolError(
            "frame_too_large", f"a line exceeds the limit of {self._max} bytes"
        )
        self._buf = bytearray()
        return self._error

    def encode(self, payload: _Bytes) -> bytes:
        return bytes(payload) + b"\n"


class RawCodec:
    """No framing: each chunk read becomes one message (cut into pieces of at most
    ``max_frame`` bytes), in order; replies are written as they are."""

    __slots__ = ("_max",)

    buffered: Final = 0

    def __init__(self, max_frame: int) -> None:
        self._max = max_frame

    def feed_until_error(self, data: _Bytes) -> tuple[list[bytes], ProtocolError | None]:
        chunk = bytes(data)
        if len(chunk) <= self._max:
            return ([chunk] if chunk else []), None
        step = self._max
        return [chunk[i : i + step] for i in range(0, len(chunk), step)], None

    def encode(self, payload: _Bytes) -> bytes:
        return bytes(payload)


StreamCodec: TypeAlias = LengthCodec | LineCodec | RawCodec
Framing = Literal["frames", "length", "lines", "raw"]


def stream_codec(
    framing: Framing,
    max_frame: int,
    length_bytes: int = 4,
    byte_order: Literal["big", "little"] = "big",
) -> StreamCodec:
    """The codec of a listener that is not ``frames``."""
    if framing == "length":
        return LengthCodec(max_frame, length_bytes, byte_order)
    if framing == "lines":
        return LineCodec(max_frame)
    if framing == "raw":
        return RawCodec(max_frame)
    raise ValueError(f"no stream codec for framing {framing!r}")
