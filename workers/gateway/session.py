"""One client connection of the gateway: an ``asyncio.Protocol`` driving the framing core.

A session owns its socket, its decoder (:class:`~workers.gateway.wire.FrameDecoder` on
a ``frames`` listener; a :class:`StreamSession` has the codec of its listener's ``length``,
``lines`` or ``raw`` framing and no HELLO), the PROXY protocol header's decoder when its
listener wants one, and the queue of events waiting to be published to its server; on a
``passthrough`` listener, a connection that is no gateway client is handed to the relay of
:mod:`workers.gateway.passthrough`. The :class:`Hub` (the worker) owns the broker, the
balancer and the publish window. Protocol callbacks instead of a reader task per connection
keep an idle connection at a few kilobytes.

States and their moves are the pure machine of :mod:`workers.gateway.states`: HANDSHAKE
(accepted, waiting for HELLO) -> JOINING (HELLO accepted, waiting for a server) -> OPEN
(WELCOME sent) -> CLOSING (BYE or ERROR written) -> CLOSED (socket gone).
Publishing outlives the socket: DATA already read and the disconnect event are still
published after CLOSED.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid
from collections import deque
from typing import Any, Protocol, cast

from workers.gateway.auth import Authenticator
from workers.gateway.codecs import StreamCodec, stream_codec
from workers.gateway.config import (
    E_SLOW_CONSUMER,
    EVENT_CONNECT,
    EVENT_DATA,
    H_CLIENT_AUTH,
    H_MOVED_FROM,
    GatewaySettings,
    Listener,
)
from workers.gateway.identity import Proof
from workers.gateway.metrics import GatewayMetrics
from workers.gateway.proxy_header import ProxyHeaderDecoder, format_addr
from workers.gateway.states import Event, State, next_state
from workers.gateway.wire import (
    BYE_FRAME,
    HTTP_400_RESPONSE,
    PING_FRAME,
    PONG_FRAME,
    FrameDecoder,
    FrameType,
    ProtocolError,
    encode_data,
    encode_error,
    encode_welcome,
    parse_hello,
    split_seq,
)

# module names for the hot path (a global is cheaper than State.OPEN)
HANDSHAKE, JOINING, OPEN, CLOSING, CLOSED = State

_DATA = FrameType.DATA
_HELLO = FrameType.HELLO
_PING = FrameType.PING
_BYE = FrameType.BYE


class Hub(Protocol):
    """What a session needs from the worker."""

    settings: GatewaySettings
    metrics: GatewayMetrics
    sessions: dict[str, Session]
    tokens: tuple[bytes, ...]  # SHA-256 digests of the accepted HELLO tokens
    auth: Authenticator  # signed tokens, client certificates, failures, one connection per id

    def join(self, session: Session) -> None: ...

    def pump(self, session: Session) -> None: ...

    def lost(self, session: Session, previous_state: State) -> None: ...

    def pass_through(
        self, transport: asyncio.Transport, head: bytes, upstream: tuple[str, int]
    ) -> None: ...


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return format_addr(str(peer[0]), peer[1])
    return str(peer or "?")


class Session(asyncio.Protocol):
    __slots__ = (
        "accepted_at",
        "client_id",
        "close_reason",
        "decoder",
        "head",
        "held",
        "hint",
        "hub",
        "in_flight",
        "last_ping",
        "last_rx",
        "listener",
        "moved_from",
        "paused",
        "peer",
        "pending",
        "prepared",
        "proof",
        "proxy",
        "server",
        "sid",
        "state",
        "transport",
        "unsettled",
        "version",
        "waiting",
    )

    def __init__(self, hub: Hub, listener: Listener) -> None:
        self.hub = hub
        self.listener = listener
        # the PROXY protocol header still to read, on a listener that wants one
        self.proxy: ProxyHeaderDecoder | None = None
        # on a passthrough listener, the bytes read before HELLO (to relay if it is none)
        self.head: bytearray | None = None
        self.transport: asyncio.Transport | None = None
        self.state = HANDSHAKE
        self.sid = ""
        self.peer = ""
        # the proven client_id (signed token, certificate), else None; an unproven HELLO
        # client_id accepted as a sticky hint only (unproven_client_id = hint) is ``hint``
        self.client_id: str | None = None
        self.hint: str | None = None
        self.proof: Proof = "none"  # x-client-auth
        self.server: str | None = None
        self.moved_from: str | None = None  # the server it had before a move
        self.decoder: FrameDecoder | None = None
        self.accepted_at = self.last_rx = self.last_ping = 0.0
        # (event, payload) waiting to be published, in order; created on first use.
        self.pending: deque[tuple[str, bytes]] | None = None
        self.in_flight = 0
        # futures of DATA publishes not yet settled, oldest first; created on first use
        self.unsettled: deque[asyncio.Future[None]] | None = None
        self.paused = False
        self.waiting = False  # queued in the hub for a free slot in the publish window
        self.close_reason: str | None = None
        # The DATA publish properties, encoded once (frames.Properties.encode); first DATA.
        self.prepared: bytes | None = None
        # welcomed, but its events wait (the offline replies of its client_id are written
        # first: workers/gateway/offline.py)
        self.held = False
        self.version = 1  # the HELLO's protocol version (2: sequence numbers and ACKs)

    # -- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike
        transport = cast(asyncio.Transport, transport)
        hub = self.hub
        s = hub.settings
        self.transport = transport
        hub.metrics.wire.accepted += 1
        if len(hub.sessions) >= s.max_connections:
            # never registered: connection_lost has nothing to undo
            self.state = next_state(self.state, Event.LOST)
            hub.metrics.refused.labels("busy").inc()
            transport.write(encode_error("busy", "the gateway is at its connection limit"))
            transport.close()
            return
        self.peer = _peer(transport)
        self.sid = uuid.uuid4().hex
        self.accepted_at = self.last_rx = self.last_ping = time.monotonic()
        hub.sessions[self.sid] = self
        if self.listener.proxy_protocol:
            self.proxy = ProxyHeaderDecoder()
        self.setup()

    def setup(self) -> None:
        """The connection is taken: make the decoder of the listener's framing."""
        s = self.hub.settings
        self.decoder = FrameDecoder(s.max_frame, s.max_hello_frame)
        if self.listener.passthrough is not None:
            self.head = bytearray()

    def received(self, data: bytes) -> bytes:
        """What every framing does with bytes read: count them, and read the PROXY header
        first if there is one. Returns the bytes for the framing (maybe none)."""
        if self.state >= CLOSING:
            return b""
        self.hub.metrics.wire.bytes_in += len(data)
        self.last_rx = time.monotonic()
        if self.proxy is None:
            return data
        try:
            header = self.proxy.feed(data)
        except ProtocolError as exc:
            self.fail(exc.code, exc.message)  # bad_proxy_header
            return b""
        if header is None:
            return b""
        address, rest = header
        self.proxy = None
        if address.source is not None:
            self.peer = address.source
        self.proxied()
        return rest

    def proxied(self) -> None:
        """The PROXY header is read (frames listeners go on waiting for HELLO)."""

    def data_received(self, data: bytes) -> None:
        data = self.received(data)
        if not data:
            return
        wire = self.hub.metrics.wire
        decoder = self.decoder
        assert decoder is not None
        head = self.head
        if head is not None:
            head += data
        # The frames before a broken one count (DATA published, PING answered, HELLO
        # checked), then the error: the answer does not depend on how TCP split the bytes.
        frames, error = decoder.feed_until_error(data)
        if head is not None:
            if error is not None and not decoder.greeted:
                self.hand_over()  # not a gateway client: it goes its original way
                return
            if decoder.greeted:
                self.head = None
        wire.frames_in += len(frames)
        queued = False
        for frame in frames:
            kind = frame.type
            if kind is _DATA:
                if self.version != 1:
                    try:
                        split_seq(frame.payload)  # checked here, split when published
                    except ProtocolError as exc:
                        error = exc  # answered after what came before it, as any violation
                        break
                if self.pending is None:
                    self.pending = deque()
                self.pending.append((EVENT_DATA, frame.payload))
                queued = True
            elif kind is _PING:
                self.write(PONG_FRAME)
            elif kind is _HELLO:
                self._hello(frame.payload)
            elif kind is _BYE:
                self.close_gracefully("client_bye")
            # PONG only proves the client is alive, which last_rx already recorded.
            if self.state >= CLOSING:
                break
        if error is not None and self.state < CLOSING:
            self.protocol_error(error)  # what was queued is published before the disconnect
        if queued and self.state == OPEN:
            self.hub.pump(self)

    def hand_over(self) -> None:
        """Relay this connection to the listener's passthrough address: it is no session."""
        transport, upstream = self.transport, self.listener.upstream
        assert transport is not None and upstream is not None and self.head is not None
        previous = self.state
        self.state = next_state(previous, Event.LOST)  # gone, as far as the gateway goes
        self.close_reason = "passthrough"
        self.hub.lost(self, previous)
        self.hub.pass_through(transport, bytes(self.head), upstream)
        self.head = None

    def eof_received(self) -> bool:
        return False  # half-closed is closed: the client cannot read replies it will not ask for

    def connection_lost(self, exc: Exception | None) -> None:
        previous = self.state
        if previous == CLOSED:
            return
        self.state = next_state(previous, Event.LOST)
        if self.close_reason is None:
            self.close_reason = "peer_closed" if exc is None else "peer_reset"
        self.hub.lost(self, previous)

    # -- inbound handling ---------------------------------------------------------------

    def _hello(self, payload: bytes) -> None:
        try:
            hello = parse_hello(payload)
        except ProtocolError as exc:
            self.protocol_error(exc)
            return
        tokens = self.hub.tokens
        shared: bool | None = None  # no shared tokens configured
        if tokens:
            # Digests of equal length: compare_digest's time then depends on neither the
            # given token nor the accepted ones, not even on their lengths.
            given = hashlib.sha256((hello.token or "").encode()).digest()
            ok = False
            for token in tokens:  # no early exit: the time taken says nothing about which
                ok |= hmac.compare_digest(given, token)
            shared = ok
        # ERROR unauthorized or rate_limited, or who the client is (workers/gateway/auth.py)
        if not self.hub.auth.admit(self, hello.client_id, hello.token, shared):
            return
        self.version = hello.v
        self.state = next_state(self.state, Event.HELLO)
        self.update_reading()
        self.hub.join(self)

    def welcome(self, server: str) -> None:
        """The balancer picked ``server``: answer WELCOME and announce the client to it."""
        self.server = server
        self.state = next_state(self.state, Event.WELCOME)
        self.greet(server)
        if self.pending is None:
            self.pending = deque()
        self.pending.appendleft((EVENT_CONNECT, b""))
        self.hub.pump(self)

    def headers(self, event: str, gateway: str) -> dict[str, Any]:
        headers = {
            "x-event": event,
            "x-session": self.sid,
            "x-client-id": self.sticky_id or "",
            H_CLIENT_AUTH: self.proof,
            "x-client-addr": self.peer,
            "x-gateway": gateway,
        }
        if event == EVENT_CONNECT and self.moved_from is not None:
            headers[H_MOVED_FROM] = self.moved_from
        return headers

    @property
    def sticky_id(self) -> str | None:
        """What stickiness (and ``x-client-id``) goes by: the proven client_id or the hint."""
        return self.client_id if self.client_id is not None else self.hint

    def greet(self, server: str) -> None:
        self.write(encode_welcome(self.sid, server, self.hub.settings.heartbeat_s, self.version))

    # -- outbound -----------------------------------------------------------------------

    def write(self, frame: bytes) -> None:
        transport = self.transport
        if self.state == CLOSED or transport is None:
            return
        transport.write(frame)
        wire = self.hub.metrics.wire
        wire.frames_out += 1
        wire.bytes_out += len(frame)
        if (
            self.state == OPEN
            and transport.get_write_buffer_size() > self.hub.settings.outbound_buffer_bytes
        ):
            self.fail(
                E_SLOW_CONSUMER,
                f"more than {self.hub.settings.outbound_buffer_bytes} bytes unread; "
                "the client does not keep up with its replies",
            )

    def send_data(self, payload: bytes) -> None:
        """A reply to the client. ValueError if the framing cannot carry it."""
        self.write(encode_data(payload))

    def keepalive(self) -> None:
        """The connection has been silent for ``heartbeat_s``: ask for a sign of life."""
        self.write(PING_FRAME)

    def update_reading(self) -> None:
        """Read only while this session may publish: the backpressure from the broker."""
        transport = self.transport
        if transport is None or self.state >= CLOSING:
            return
        blocked = (
            self.state == JOINING
            or bool(self.pending)
            or self.in_flight >= self.hub.settings.session_in_flight
        )
        if blocked and not self.paused:
            self.paused = True
            transport.pause_reading()
        elif not blocked and self.paused:
            self.paused = False
            transport.resume_reading()

    # -- closing ------------------------------------------------------------------------

    def protocol_error(self, exc: ProtocolError) -> None:
        if exc.code == "http_not_supported":
            self._close(exc.code, HTTP_400_RESPONSE)
        else:
            self.fail(exc.code, exc.message)

    def fail(self, code: str, message: str) -> None:
        """ERROR, then close."""
        self._close(code, encode_error(code, message))

    def close_gracefully(self, reason: str) -> None:
        """BYE, then close."""
        self._close(reason, BYE_FRAME)

    def _close(self, reason: str, last: bytes) -> None:
        if self.state >= CLOSING:
            return
        if self.state < OPEN:
            self.hub.metrics.refused.labels(reason).inc()
        self.close_reason = reason
        # before the write: a full buffer must not recurse into fail()
        self.state = next_state(self.state, Event.CLOSE)
        transport = self.transport
        if transport is None:
            return
        if last:
            self.write(last)
        transport.close()  # flushes what is buffered first
        if transport.get_write_buffer_size():
            # A peer that does not read would keep the buffer (and this object) forever.
            asyncio.get_running_loop().call_later(
                self.hub.settings.close_flush_s, self._abort_if_open
            )

    def _abort_if_open(self) -> None:
        if self.state != CLOSED and self.transport is not None:
            self.transport.abort()


class StreamSession(Session):
    """A connection of a ``length``, ``lines`` or ``raw`` listener: a client that already
    exists and knows nothing of this gateway. No HELLO: it joins a server on accept (after
    the PROXY header, if its listener wants one); each frame, line or chunk is one DATA;
    replies go back in the listener's framing; no PING (the idle timeout still applies);
    a close, for whatever reason, is just a close (counted), there being no ERROR or BYE
    to send."""

    __slots__ = ("codec",)

    def setup(self) -> None:
        x = self.listener
        self.codec: StreamCodec = stream_codec(
            x.framing, self.hub.settings.max_frame, x.length_bytes, x.byte_order
        )
        if self.proxy is None:
            self.proxied()

    def proxied(self) -> None:
        # no HELLO: the client certificate alone names the client (closed if it cannot)
        if self.listener.client_auth == "required" and not self.hub.auth.admit(self):
            return
        self.state = next_state(self.state, Event.ACCEPT)
        self.update_reading()
        self.hub.join(self)

    def data_received(self, data: bytes) -> None:
        data = self.received(data)
        if not data or self.state >= CLOSING:
            return
        messages, error = self.codec.feed_until_error(data)
        if messages:
            self.hub.metrics.wire.frames_in += len(messages)
            if self.pending is None:
                self.pending = deque()
            self.pending.extend((EVENT_DATA, m) for m in messages)
        if error is not None:
            self.protocol_error(error)  # what was queued is published before the disconnect
        if messages and self.state == OPEN:
            self.hub.pump(self)

    def greet(self, server: str) -> None:
        pass  # the client expects nothing: it is talking to its server already

    def send_data(self, payload: bytes) -> None:
        self.write(self.codec.encode(payload))

    def keepalive(self) -> None:
        pass  # the framing has no PING; idle_timeout_s alone ends a silent connection

    def fail(self, code: str, message: str) -> None:
        self._close(code, b"")

    def close_gracefully(self, reason: str) -> None:
        self._close(reason, b"")
