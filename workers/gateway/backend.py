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

Messages are handled as they arrive, several at a time (an awaitable handler runs as a task
of its own), on the project's own data path (:mod:`bridge.amqp`): each one is acknowledged
once the broker confirmed its answers, and goes back to the queue if the handler raises or
an answer cannot be published. The declarations go through aio-pika, once, at start.

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

from bridge.amqp import QUORUM, declare_exchange, declare_quorum_queue, header_str
from bridge.amqp.consumer import Consumer, QueueSpec
from bridge.amqp.frames import Delivery, Properties
from bridge.amqp.link import Link
from bridge.amqp.publisher import Publisher
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
        self._link: Link | None = None
        self._publisher: Publisher | None = None
        self._consumer: Consumer | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    @property
    def queue_name(self) -> str:
        return self.settings.server_queue(self.server_id)

    async def start(self) -> BackendServer:
        conn = await aio_pika.connect(self.url)
        try:
            channel = await conn.channel()
            await declare_exchange(channel, self.settings.servers_exchange, "fanout")
            await declare_quorum_queue(channel, self.queue_name)
        finally:
            await conn.close()
        link = Link(self.url, name=f"backend {self.server_id}")
        self._publisher = Publisher(link, name="answers")
        self._consumer = Consumer(
            link,
            QueueSpec(self.queue_name, arguments=dict(QUORUM)),
            self._on_delivery,
            prefetch=self.prefetch,
        )
        self._link = link
        await link.start()
        await self.announce(OP_REGISTER)
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
        return self

    async def announce(self, op: str) -> None:
        assert self._publisher is not None, "start() first"
        body = json.dumps({"op": op, "server_id": self.server_id}).encode()
        props = Properties(content_type="application/json")
        await self._publisher.publish(
            self.settings.servers_exchange, "", body, props, mandatory=False
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
        if deregister and self._publisher is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.announce(OP_DEREGISTER), 5)
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.cancel()
        if self._link is not None:
            with contextlib.suppress(Exception):
                await self._link.close()
            self._link = None

    def _on_delivery(self, delivery: Delivery) -> Awaitable[None] | None:
        props = delivery.properties
        headers = dict(props.headers or {})
        event = ServerEvent(
            event=header_str(headers.get(H_EVENT)) or EVENT_DATA,
            session=header_str(headers.get(H_SESSION)),
            client_id=header_str(headers.get(H_CLIENT_ID)),
            client_addr=header_str(headers.get(H_CLIENT_ADDR)),
            gateway=header_str(headers.get(H_GATEWAY)),
            body=delivery.body,
            reply_to=props.reply_to,
            headers=headers,
            redelivered=delivery.redelivered,
        )
        if self.keep_events:
            self.events.append(event)
        # a raising handler: the consumer logs it and the message goes back to the queue
        result = self.handler(event)
        if inspect.isawaitable(result):
            return self._answer_later(delivery, event, result)
        self._answer(delivery, event, result)
        return None

    async def _answer_later(
        self, delivery: Delivery, event: ServerEvent, result: Awaitable[Iterable[Reply]]
    ) -> None:
        self._answer(delivery, event, await result)

    def _answer(self, delivery: Delivery, event: ServerEvent, replies: Iterable[Reply]) -> None:
        """Publish the answers; acknowledge the message once all are confirmed (or send it
        back to the queue if one could not be published)."""
        consumer = self._consumer
        assert consumer is not None
        corr = delivery.properties.correlation_id
        sent: list[asyncio.Future[None]] = []
        for r in replies:
            fut = self.reply(event, r.body, close=r.close, correlation_id=corr)
            if fut is not None:
                sent.append(fut)
        if not sent:
            self.handled += 1
            consumer.ack(delivery)
            return
        waiting = len(sent)
        failed = False

        def settled(fut: asyncio.Future[None]) -> None:
            nonlocal waiting, failed
            waiting -= 1
            if fut.cancelled() or fut.exception() is not None:
                failed = True
            if waiting:
                return
            if failed:
                log.warning("an answer was not published; the message goes back to the queue")
                consumer.nack(delivery, requeue=True)
            else:
                self.handled += 1
                consumer.ack(delivery)

        for fut in sent:
            fut.add_done_callback(settled)

    def reply(
        self,
        event: ServerEvent,
        body: bytes,
        *,
        close: bool = False,
        correlation_id: str | None = None,
    ) -> asyncio.Future[None] | None:
        """Send ``body`` back to the client that sent ``event``: a future resolved once the
        broker confirmed it (None, with a warning, for an event without ``reply_to``)."""
        if not event.reply_to:
            log.warning("message without reply_to; not answered")
            return None
        assert self._publisher is not None, "start() first"
        headers: dict[str, Any] = {}
        if event.session is not None:
            headers[H_SESSION] = event.session
        if close:
            headers[H_CLOSE] = True
        props = Properties(headers=headers, correlation_id=correlation_id)
        return self._publisher.publish("", event.reply_to, body, props, mandatory=False)

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
