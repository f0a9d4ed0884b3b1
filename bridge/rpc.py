"""Client side of the workers' JSON request/reply calls over RabbitMQ's direct reply-to.

Replies come back on ``amq.rabbitmq.reply-to``, so a caller needs no queue of its own; calls
are matched to replies by ``correlation_id``. A request expires in its queue when its caller
stops waiting (``expiration`` = the timeout): a worker that starts later does not answer a
caller that is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from typing import Any, Self

import aio_pika
import aio_pika.exceptions
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from bridge.errors import NoAnswer, NotDeclared

REPLY_TO = "amq.rabbitmq.reply-to"


class RpcClient:
    """Calls to the control plane of ``worker`` (named in the error when nobody answers)."""

    def __init__(self, connection: AbstractRobustConnection, worker: str) -> None:
        self.connection = connection
        self.worker = worker
        self.channel: AbstractChannel | None = None
        self._futures: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def open(self) -> RpcClient:
        self.channel = await self.connection.channel(publisher_confirms=False)
        # declared (passively), not just looked up: a robust channel re-consumes only the
        # queues it declared, and the replies must keep flowing after a reconnect
        queue = await self.channel.declare_queue(REPLY_TO, passive=True)
        await queue.consume(self._on_reply, no_ack=True)
        return self

    async def close(self) -> None:
        if self.channel is not None and not self.channel.is_closed:
            await self.channel.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        fut = self._futures.pop(message.correlation_id or "", None)
        if fut is not None and not fut.done():
            try:
                fut.set_result(json.loads(message.body))
            except ValueError as exc:
                fut.set_exception(exc)

    async def call(
        self, exchange: str, routing_key: str, doc: Any, timeout: float = 10.0
    ) -> dict[str, Any]:
        """Publish ``doc`` (JSON, or raw bytes) and wait for the reply document;
        :class:`NoAnswer` after ``timeout`` seconds."""
        assert self.channel is not None, "open() first"
        corr = uuid.uuid4().hex
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._futures[corr] = fut
        body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        target = (
            self.channel.default_exchange
            if exchange == ""
            else await self.channel.get_exchange(exchange, ensure=False)
        )
        try:
            await target.publish(
                aio_pika.Message(
                    body,
                    reply_to=REPLY_TO,
                    correlation_id=corr,
                    content_type="application/json",
                    expiration=timeout,
                ),
                routing_key=routing_key,
                mandatory=False,
            )
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise NoAnswer(self.worker, exchange or routing_key, timeout) from None
        finally:
            self._futures.pop(corr, None)


class WorkerClient:
    """Base of the workers' client helpers: a confirm channel for publishing requests and an
    :class:`RpcClient` for queries. Subclasses name their worker and add its calls."""

    worker = "bridge"

    def __init__(self, connection: AbstractRobustConnection) -> None:
        self.connection = connection
        self.rpc = RpcClient(connection, self.worker)
        self._channel: AbstractChannel | None = None

    async def open(self) -> Self:
        self._channel = await self.connection.channel(publisher_confirms=True)
        await self.rpc.open()
        return self

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
        await self.rpc.close()

    async def publish(self, exchange: str, message: aio_pika.Message, routing_key: str) -> None:
        """Publish to one of the worker's exchanges, confirmed; :class:`NotDeclared` if the
        exchange does not exist (the worker never ran here, or under other names)."""
        assert self._channel is not None, "open() first"
        target = await self._channel.get_exchange(exchange, ensure=False)
        try:
            await target.publish(message, routing_key=routing_key)
        except aio_pika.exceptions.ChannelNotFoundEntity as exc:
            raise NotDeclared(self.worker, exchange) from exc


def add_timeout_option(parser: argparse.ArgumentParser) -> None:
    """``--timeout`` of the client commands that wait for a worker's answer."""
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds to wait for the worker's answer (the request expires then)",
    )
