"""Pass-through: a connection to a ``frames`` listener that turns out not to be a gateway
client (its first bytes are not a HELLO, or it says nothing until ``hello_timeout_s``) is
relayed byte for byte to the listener's ``passthrough`` address, as the seed lets other
traffic go its original way, instead of being refused.

The client's transport is handed from its session to a :class:`Pipe` (``set_protocol``),
the upstream connection gets another, and each writes what it reads into the other; a
full write buffer on one side pauses reading on the other, so a slow end slows the other
down instead of filling memory. A half close is passed on; a close or reset of either end
closes the other.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from workers.gateway.metrics import GatewayMetrics

log = logging.getLogger("bridge.gateway")


class Pipe(asyncio.Protocol):
    """One end of the relay: what its transport reads is written to the other end."""

    def __init__(self, group: set[Pipe]) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: Pipe | None = None
        self.closed = False
        self.group = group  # the gateway's open relays, cut when it stops

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.group.add(self)

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is not None and other.transport is not None:
            other.transport.write(data)

    def eof_received(self) -> bool:
        other = self.other
        if other is not None and other.transport is not None and other.transport.can_write_eof():
            other.transport.write_eof()
            return True  # keep the other direction open
        return False

    def pause_writing(self) -> None:  # our transport's buffer is full: stop reading the other
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.group.discard(self)
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()


async def relay(
    client_transport: asyncio.Transport,
    head: bytes,
    upstream: tuple[str, int],
    metrics: GatewayMetrics,
    connect_timeout: float,
    group: set[Pipe],
) -> None:
    """Take over ``client_transport`` (``head``: what it sent so far) and relay it to
    ``upstream``; a refused or slow upstream closes the client. Both ends join ``group``
    while they are open."""
    client = Pipe(group)
    client_transport.pause_reading()
    client_transport.set_protocol(client)
    client.connection_made(client_transport)
    loop = asyncio.get_running_loop()
    try:
        up_transport, up = await asyncio.wait_for(
            loop.create_connection(lambda: Pipe(group), *upstream), connect_timeout
        )
    except (OSError, TimeoutError) as exc:
        group.discard(client)
        metrics.passthrough.labels("upstream_failed").inc()
        log.warning(
            "pass-through upstream unreachable; client closed",
            extra={"upstream": f"{upstream[0]}:{upstream[1]}", "error": str(exc) or "timeout"},
        )
        client_transport.close()
        return
    if client.closed:  # the client went while the upstream connection was being made
        up_transport.close()
        return
    metrics.passthrough.labels("relayed").inc()
    client.other, up.other = up, client
    if head:
        up_transport.write(head)
    client_transport.resume_reading()
