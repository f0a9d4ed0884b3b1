"""The socket side of a :class:`~bridge.amqp.link.Link`: the ``asyncio.Protocol`` that feeds
the frame decoder, the connection handshake (``connection.start`` and ``tune``, with the
client's capabilities) that the link runs on each new connection, and the broker's
connection-level methods after it (close, blocked, unblocked)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Protocol

from bridge.amqp import frames as F
from bridge.amqp.endpoint import Endpoint
from bridge.errors import LinkError

log = logging.getLogger("bridge.amqp.link")

CHANNEL_MAX = 64
FRAME_MAX = 131072


class Link(Protocol):
    """What this module uses of a :class:`bridge.amqp.link.Link` (which imports this
    module, so it is named here by its shape)."""

    name: str
    endpoint: Endpoint
    heartbeat_s: int
    loop: asyncio.AbstractEventLoop
    last_read: float
    write_paused: bool
    blocked: str | None
    server_properties: dict[str, Any]

    def write(self, data: bytes) -> None: ...
    def expect(self, channel: int, kind: type) -> asyncio.Future[Any]: ...
    def resolve(self, number: int, method: F.Method) -> bool: ...
    def fail_waiters(self, error: LinkError) -> None: ...
    def writable(self) -> None: ...
    def dispatch(self, proto: LinkProtocol, events: list[F.Event]) -> None: ...
    def connection_lost(self, proto: LinkProtocol, exc: Exception | None) -> None: ...


class LinkProtocol(asyncio.Protocol):
    """The socket side of a :class:`~bridge.amqp.link.Link`: bytes in are decoded once
    and handed to the link; a full or drained socket buffer holds its writers back or lets
    them go on."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.decoder = F.Decoder(FRAME_MAX)
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        link = self.link
        link.last_read = link.loop.time()
        try:
            events = self.decoder.feed(data)
        except F.DecodeError as exc:
            log.error(
                "broker sent bytes that are not AMQP; reconnecting",
                extra={"link": link.name, "error": str(exc)},
            )
            if self.transport is not None:
                self.transport.abort()
            return
        link.dispatch(self, events)

    def pause_writing(self) -> None:
        self.link.write_paused = True

    def resume_writing(self) -> None:
        self.link.write_paused = False
        self.link.writable()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self.link.connection_lost(self, exc)


async def handshake(link: Link, proto: LinkProtocol) -> tuple[int, int]:
    """``connection.start`` to ``tune-ok`` on a new connection (the link sends the
    ``open``): the broker's properties go to :attr:`Link.server_properties`; returns the
    ``frame_max`` and heartbeat agreed on."""
    e = link.endpoint
    start = link.expect(0, F.ConnectionStart)
    link.write(F.PROTOCOL_HEADER)
    link.server_properties = dict((await start).server_properties or {})
    tune = link.expect(0, F.ConnectionTune)
    link.write(
        F.method_frame(
            0,
            F.ConnectionStartOk(
                client_properties={
                    "product": "rabbitmq-bridge-workers",
                    "connection_name": e.name or link.name,
                    "capabilities": {
                        "publisher_confirms": True,
                        "basic.nack": True,
                        "consumer_cancel_notify": True,
                        "connection.blocked": True,
                        "authentication_failure_close": True,
                        "exchange_exchange_bindings": True,
                    },
                },
                mechanism="PLAIN",
                response=f"\0{e.user}\0{e.password}",
            ),
        )
    )
    t = await tune
    frame_max = min(t.frame_max or FRAME_MAX, FRAME_MAX)
    ours, theirs = link.heartbeat_s, t.heartbeat
    heartbeat = min(ours, theirs) if ours and theirs else (ours or theirs)
    proto.decoder.frame_max = frame_max
    channel_max = min(t.channel_max or CHANNEL_MAX, CHANNEL_MAX)
    link.write(
        F.method_frame(
            0,
            F.ConnectionTuneOk(channel_max=channel_max, frame_max=frame_max, heartbeat=heartbeat),
        )
    )
    proto.decoder.frame_max = frame_max
    return frame_max, heartbeat


def connection_method(link: Link, proto: LinkProtocol, method: Any) -> None:
    """A method on channel 0 once the connection is open: the broker closing it, blocking
    or unblocking publishers (a resource alarm), or the reply to a call."""
    if isinstance(method, F.ConnectionClose):
        log.warning(
            "broker closed the connection",
            extra={"link": link.name, "code": method.reply_code, "text": method.reply_text},
        )
        with contextlib.suppress(LinkError):
            link.write(F.method_frame(0, F.ConnectionCloseOk()))
        link.fail_waiters(LinkError(method.reply_code, method.reply_text))
        if proto.transport is not None:
            proto.transport.close()
        return
    if isinstance(method, F.ConnectionBlocked):
        link.blocked = method.reason or "blocked"
        log.warning(
            "broker blocks publishing (resource alarm); publishes wait",
            extra={"link": link.name, "reason": method.reason},
        )
        return
    if isinstance(method, F.ConnectionUnblocked):
        link.blocked = None
        log.info("broker unblocks publishing", extra={"link": link.name})
        link.writable()
        return
    if not link.resolve(0, method):
        log.debug("unexpected method ignored", extra={"link": link.name, "method": repr(method)})
