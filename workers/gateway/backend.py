"""A reference backend server for the gateway: registers, heartbeats, echoes.

It shows the whole server side of the contract in one place, and the tests and benchmarks
use it as their backend:

- publish ``{"op": "register", "server_id": ...}`` to ``gateway.servers`` (fanout), then a
  heartbeat every few seconds (well inside the gateway's ``server_ttl_s``), and
  ``deregister`` when leaving, after the heartbeat timer has stopped;
- consume the quorum queue ``gateway.server.<server_id>`` (declared here too, so the server
  may start before any gateway); every message carries ``x-event`` (connect, data,
  disconnect), ``x-session``, ``x-client-id``, ``x-client-addr`` and ``x-gateway``;
- answer by publishing to the default exchange with routing key = the message's
  ``reply_to`` and header ``x-session``; ``x-close: true`` makes the gateway say BYE.

A message without ``x-event`` is treated as data and answered to its ``reply_to`` as is, so
the same backend also serves plain AMQP or STOMP request/reply clients.

Run it with ``rabbitmq-bridge gateway echo-server --id s1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from bridge.amqp import header_str
from workers.gateway.config import (
    EVENT_DATA,
    H_CLIENT_ADDR,
    H_CLIENT_ID,
    H_CLOSE,
    H_EVENT,
    H_GATEWAY,
    H_SESSION,
    OP_DEREGISTER,
    OP_HEARTBEAT,
    OP_REGISTER,
    GatewaySettings,
)

log = logging.getLogger("bridge.gateway.backend")


@dataclass(slots=True)
class ServerEvent:
    """One message from the gateway (or any request/reply client)."""

    event: str
    session: str | None
    client_id: str | None
    client_addr: str | None
    gateway: str | None
    body: bytes
    reply_to: str | None
    headers: dict[str, Any] = field(default_factory=dict)
    # The broker delivered it before and got no ack (the server or the broker restarted):
    # the server may have answered it already.
    redelivered: bool = False


@dataclass(slots=True)
class Reply:
    body: bytes
    close: bool = False


Handler = Callable[[ServerEvent], Iterable[Reply] | Awaitable[Iterable[Reply]]]


def echo(event: ServerEvent) -> list[Reply]:
    """Answer every DATA with the same bytes; connect and disconnect need no answer."""
    return [Reply(event.body)] if event.event == EVENT_DATA else []


class BackendServer:
    def __init__(
        self,
        url: str,
        server_id: str,
        *,
        settings: GatewaySettings | None = None,
        heartbeat_s: float = 5.0,
        handler: Handler = echo,
        prefetch: int = 256,
        keep_events: bool = False,
        connection: AbstractRobustConnection | None = None,
    ) -> None:
        self.url = url
        self.server_id = server_id
        self.settings = settings or GatewaySettings()
        self.heartbeat_s = heartbeat_s
        self.handler = handler
        self.prefetch = prefetch
        self.keep_events = keep_events
        self.events: list[ServerEvent] = []
        self.handled = 0
        self._own_connection = connection is None
        self._connection = connection
        self._channel: AbstractChannel | None = None
        self._servers: AbstractExchange | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    @property
    def queue_name(self) -> str:
        return self.settings.server_queue(self.server_id)

    async def start(self) -> BackendServer:
        if self._connection is None:
            self._connection = await aio_pika.connect_robust(self.url)
        self._channel = await self._connection.channel(publisher_confirms=True)
        await self._channel.set_qos(prefetch_count=self.prefetch)
        self._servers = await self._channel.declare_exchange(
            self.settings.servers_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        self._queue = await self._channel.declare_queue(
            self.queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        self._tag = await self._queue.consume(self._on_message)
        await self.announce(OP_REGISTER)
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
        return self

    async def announce(self, op: str) -> None:
        assert self._servers is not None
        body = json.dumps({"op": op, "server_id": self.server_id}).encode()
        await self._servers.publish(
            aio_pika.Message(body, content_type="application/json"), routing_key=""
        )

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.announce(OP_HEARTBEAT)
            except Exception as exc:  # reconnecting: the next beat will do
                log.warning("heartbeat not sent", extra={"error": str(exc)})

    async def stop_heartbeats(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None

    async def stop(self, *, deregister: bool = True) -> None:
        """Leave; ``deregister=False`` just goes silent, like a crashed server."""
        await self.stop_heartbeats()
        if deregister:
            with contextlib.suppress(Exception):
                await self.announce(OP_DEREGISTER)
        if self._queue is not None and self._tag is not None:
            with contextlib.suppress(Exception):
                await self._queue.cancel(self._tag)
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await self._channel.close()
        if self._own_connection and self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        headers = dict(message.headers or {})
        event = ServerEvent(
            event=header_str(headers.get(H_EVENT)) or EVENT_DATA,
            session=header_str(headers.get(H_SESSION)),
            client_id=header_str(headers.get(H_CLIENT_ID)),
            client_addr=header_str(headers.get(H_CLIENT_ADDR)),
            gateway=header_str(headers.get(H_GATEWAY)),
            body=message.body,
            reply_to=message.reply_to,
            headers=headers,
            redelivered=bool(message.redelivered),
        )
        if self.keep_events:
            self.events.append(event)
        try:
            result = self.handler(event)
            replies = await result if inspect.isawaitable(result) else result
            for reply in replies:
                await self.reply(event, reply.body, close=reply.close, message=message)
        except Exception:
            log.exception("handler failed; message goes back to the queue")
            await message.nack(requeue=True)
            return
        self.handled += 1
        await message.ack()

    async def reply(
        self,
        event: ServerEvent,
        body: bytes,
        *,
        close: bool = False,
        message: AbstractIncomingMessage | None = None,
    ) -> None:
        """Send ``body`` back to the client that sent ``event``."""
        if not event.reply_to:
            log.warning("message without reply_to; not answered")
            return
        assert self._channel is not None
        headers: dict[str, Any] = {}
        if event.session is not None:
            headers[H_SESSION] = event.session
        if close:
            headers[H_CLOSE] = True
        await self._channel.default_exchange.publish(
            aio_pika.Message(
                body,
                headers=headers,
                correlation_id=message.correlation_id if message is not None else None,
            ),
            routing_key=event.reply_to,
        )

    async def wait_events(
        self, predicate: Callable[[list[ServerEvent]], bool], timeout: float = 10.0
    ) -> list[ServerEvent]:
        """For tests: wait until the kept events satisfy ``predicate``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate(self.events):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{self.server_id}: events not as expected: {self.events!r}")
            await asyncio.sleep(0.02)
        return self.events


async def run_echo_server(url: str, server_id: str, heartbeat_s: float) -> None:
    """Run until SIGINT/SIGTERM (the ``rabbitmq-bridge gateway echo-server`` command)."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    server = await BackendServer(url, server_id, heartbeat_s=heartbeat_s).start()
    log.info("echo server registered", extra={"server": server_id, "queue": server.queue_name})
    print(f"echo server {server_id} consuming {server.queue_name}; Ctrl-C to leave", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()
        print(f"echo server {server_id} deregistered after {server.handled} messages", flush=True)
