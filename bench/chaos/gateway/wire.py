"""What the gateway must answer to any byte sequence, and a blocking client that checks it.

:func:`expected` is written from the rejection table of docs/gateway.md, not from
``workers/gateway/wire.py``: it says, for the bytes a client sends on one connection,
which ERROR code (or HTTP 400, or WELCOME and then which echoes, PONGs and BYE) the
contract promises when the backend echoes every DATA. :func:`exchange` sends the bytes to a
running gateway over a real socket and returns what came back; :func:`check` compares the
two. The corpus in ``tests/corpus/gateway/`` and the hypothesis-generated sequences of
``tests/integration/gateway/test_faults.py`` (and ``python -m bench.chaos.gateway``) all go
through these three.

Blocking sockets on purpose: the callers run them in a thread while the gateway under test
serves on the event loop, so a sequence can be replayed byte for byte, with no event loop
between the client and its socket.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).resolve().parents[3] / "tests" / "corpus" / "gateway"

HELLO, WELCOME, DATA, PING, PONG, ERROR, BYE, ACK = range(1, 9)
FROM_CLIENT_OK = {HELLO, DATA, PING, PONG, BYE}
SEQ_BYTES = 8  # protocol v2: each client DATA starts with its sequence number
MAX_SEQ = (1 << 63) - 1
EMPTY = {PING, PONG, BYE}
HTTP_METHODS = tuple(
    m.encode() + b" "
    for m in ("GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE", "PRI")
)
BYE_FRAME = b"\x00\x00\x00\x01\x07"


@dataclass(frozen=True)
class Limits:
    max_hello_frame: int = 4096
    max_frame: int = 65536
    tokens: tuple[str, ...] = ()


@dataclass
class Expect:
    """What the gateway answers. ``terminal``: ``error:<code>``, ``http_400``, ``bye`` (the
    client's BYE answered), or ``open`` (all bytes taken, the connection stays up: the
    caller says BYE itself once the echoes are in)."""

    terminal: str
    welcome: bool = False
    echoes: list[bytes] = field(default_factory=list)
    pongs: int = 0
    acks: list[bytes] = field(default_factory=list)  # protocol v2: ACK payloads, in order

    def as_json(self) -> dict[str, Any]:
        return {
            "terminal": self.terminal,
            "welcome": self.welcome,
            "echoes": len(self.echoes),
            "acks": len(self.acks),
        }


def frame(kind: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IB", len(payload) + 1, kind) + payload


def _hello_ok(payload: bytes, tokens: tuple[str, ...]) -> int | str:
    """The protocol version if the HELLO is accepted, else the ERROR code (docs/gateway.md,
    Rejections)."""
    try:
        doc = json.loads(payload.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "bad_hello"
    if not isinstance(doc, dict):
        return "bad_hello"
    v = doc.get("v")
    if type(v) is not int or v not in (1, 2):
        return "bad_hello"
    for key in ("client_id", "token"):
        value = doc.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value or len(value) > 256:
            return "bad_hello"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "bad_hello"
    if tokens and doc.get("token") not in tokens:
        return "unauthorized"
    return v


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def expected(data: bytes, limits: Limits) -> Expect:
    """The contract's answer to ``data`` sent on a fresh connection."""
    if data.startswith(HTTP_METHODS):
        return Expect("http_400")
    if data.startswith(b"\x16\x03"):
        return Expect("error:tls_not_supported")
    if len(data) < 5 and any(m.startswith(data) for m in HTTP_METHODS):
        return Expect("error:hello_timeout")  # might still become "GET ": the gateway waits
    out = Expect("open")
    pos, greeted, version = 0, False, 1
    while True:
        rest = len(data) - pos
        if rest < 4:
            break
        (length,) = struct.unpack_from(">I", data, pos)
        if length == 0:
            return _fail(out, "bad_frame")
        limit = limits.max_frame if greeted else limits.max_hello_frame
        if length - 1 > limit:
            return _fail(out, "frame_too_large")
        if rest < 5:
            break
        kind = data[pos + 4]
        if kind not in range(1, 9):
            return _fail(out, "bad_type")
        if not greeted and kind != HELLO:
            return _fail(out, "not_hello")
        if kind not in FROM_CLIENT_OK or (kind == HELLO and greeted):
            return _fail(out, "bad_type")
        if kind in EMPTY and length != 1:
            return _fail(out, "bad_frame")
        if rest < 4 + length:
            break
        payload = data[pos + 5 : pos + 4 + length]
        pos += 4 + length
        if kind == HELLO:
            code = _hello_ok(payload, limits.tokens)
            if isinstance(code, str):
                return _fail(out, code)
            version = code
            greeted = out.welcome = True
        elif kind == DATA and version == 2:
            # a sequence number first: ACKed as sent, the server echoes what follows it
            seq = payload[:SEQ_BYTES]
            if len(seq) < SEQ_BYTES or int.from_bytes(seq, "big") > MAX_SEQ:
                return _fail(out, "bad_frame")
            out.acks.append(seq)
            out.echoes.append(payload[SEQ_BYTES:])
        elif kind == DATA:
            out.echoes.append(payload)
        elif kind == PING:
            out.pongs += 1
        elif kind == BYE:
            out.terminal = "bye"
            return out
    if not greeted:
        out.terminal = "error:hello_timeout"
    elif pos < len(data):
        out.terminal = "partial"  # a frame left half sent: callers do not generate these
    return out


def _fail(out: Expect, code: str) -> Expect:
    out.terminal = f"error:{code}"
    return out


# ----------------------------------------------------------------------------- a real socket


@dataclass
class Observed:
    terminal: str  # error:<code> | http_400 | bye | eof | timeout
    welcome: bool = False
    echoes: list[bytes] = field(default_factory=list)
    pongs: int = 0
    acks: list[bytes] = field(default_factory=list)
    raw: bytes = b""


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.raw = b""
        self.eof = False

    def fill(self, deadline: float) -> bool:
        """Read once; False at EOF or past the deadline."""
        if self.eof:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return False
        except OSError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        self.raw += chunk
        return True

    def frame(self, deadline: float) -> tuple[int, bytes] | None:
        while True:
            if len(self.buf) >= 5:
                (length,) = struct.unpack_from(">I", self.buf)
                if len(self.buf) >= 4 + length:
                    kind, payload = self.buf[4], self.buf[5 : 4 + length]
                    self.buf = self.buf[4 + length :]
                    return kind, payload
            if not self.fill(deadline):
                return None


def exchange(port: int, data: bytes, expect: Expect, *, timeout: float = 10.0) -> Observed:
    """Send ``data`` on a fresh connection and read the answer.

    When the contract says the connection stays open, wait for the expected echoes, PONGs
    and ACKs, then say BYE (an echo still on its way when the gateway closes would go to the
    undeliverable queue, an ACK would not be sent, so BYE must come after them)."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if data:
                sock.sendall(data)
        except OSError:
            pass  # the gateway may close before it read everything; what it said counts
        reader = _Reader(sock)
        seen = Observed("eof")
        if data.startswith(HTTP_METHODS):
            while reader.fill(deadline):
                pass
            seen.raw = reader.raw
            seen.terminal = "http_400" if reader.raw.startswith(b"HTTP/1.1 400 ") else "eof"
            return seen
        bye_sent = False
        while True:
            if (
                expect.terminal == "open"
                and not bye_sent
                and seen.welcome
                and len(seen.echoes) >= len(expect.echoes)
                and seen.pongs >= expect.pongs
                and len(seen.acks) >= len(expect.acks)
            ):
                try:
                    sock.sendall(BYE_FRAME)
                except OSError:
                    pass
                bye_sent = True
            got = reader.frame(deadline)
            if got is None:
                seen.terminal = "eof" if reader.eof else "timeout"
                break
            kind, payload = got
            if kind == WELCOME:
                seen.welcome = True
            elif kind == DATA:
                seen.echoes.append(payload)
            elif kind == PONG:
                seen.pongs += 1
            elif kind == ACK:
                seen.acks.append(payload)
            elif kind == PING:
                pass  # heartbeats; the sequences are short enough not to see any
            elif kind == ERROR:
                seen.terminal = "error:" + str(json.loads(payload).get("code"))
                while reader.fill(deadline):
                    pass  # the gateway closes after ERROR
                break
            elif kind == BYE:
                seen.terminal = "bye"
                while reader.fill(deadline):
                    pass
                break
        seen.raw = reader.raw
        return seen


def check(expect: Expect, seen: Observed) -> list[str]:
    """Differences between the contract and what the gateway did ([] when it kept it)."""
    problems: list[str] = []
    want = "bye" if expect.terminal == "open" else expect.terminal
    if seen.terminal != want:
        problems.append(f"ended with {seen.terminal}, expected {want}")
    if seen.welcome and not expect.welcome:
        problems.append("WELCOME sent")
    if expect.terminal == "open":
        if not seen.welcome:
            problems.append("WELCOME missing")
        if seen.echoes != expect.echoes:
            problems.append(f"echoes {seen.echoes[:5]!r} != {expect.echoes[:5]!r}")
        if seen.pongs != expect.pongs:
            problems.append(f"{seen.pongs} PONGs, expected {expect.pongs}")
        if seen.acks != expect.acks:
            problems.append(f"ACKs {seen.acks[:5]!r} != {expect.acks[:5]!r}")
    else:
        # Frames decoded in the same read as a bad one are dropped (a HELLO too, so even
        # WELCOME may not come), echoes arriving after the ERROR or the client's BYE go to
        # the undeliverable queue: a prefix of what was promised, never something else.
        if seen.echoes != expect.echoes[: len(seen.echoes)]:
            problems.append(f"echoes {seen.echoes[:5]!r} not a prefix of {expect.echoes[:5]!r}")
        if seen.pongs > expect.pongs:
            problems.append(f"{seen.pongs} PONGs for {expect.pongs} PINGs")
        if seen.acks != expect.acks[: len(seen.acks)]:
            problems.append(f"ACKs {seen.acks[:5]!r} not a prefix of {expect.acks[:5]!r}")
    return problems


# ----------------------------------------------------------------------------- the corpus


@dataclass
class CorpusCase:
    name: str
    data: bytes
    expect: str
    note: str


def corpus() -> list[CorpusCase]:
    index = json.loads((CORPUS / "index.json").read_text())
    return [
        CorpusCase(c["file"], (CORPUS / c["file"]).read_bytes(), c["expect"], c["note"])
        for c in index["cases"]
    ]


CORPUS_LIMITS = Limits(max_hello_frame=4096, max_frame=65536, tokens=("corpus-token",))


# ----------------------------------------------------------------------------- slowloris


async def trickle(port: int, data: bytes, interval: float) -> tuple[int, bytes]:
    """Send ``data`` one byte every ``interval`` seconds while reading whatever comes back;
    stop when the gateway closes. Returns the bytes sent and everything read.

    Reading all the time matters: a byte written after the gateway closed draws a reset,
    which would discard an ERROR still unread in the socket buffer.
    """
    import asyncio
    import contextlib

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()
    sent = 0

    async def read() -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                received.extend(chunk)

    reading = asyncio.get_running_loop().create_task(read())
    try:
        for byte in data:
            if reading.done():
                break
            writer.write(bytes([byte]))
            await writer.drain()
            sent += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reading), interval)
        await asyncio.wait_for(reading, 30)
    except ConnectionError:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reading, 5)
    finally:
        reading.cancel()
        writer.close()
    return sent, bytes(received)
