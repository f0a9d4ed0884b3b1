"""Client side of the workers' JSON request/reply calls over RabbitMQ's direct reply-to.

Replies come back on ``amq.rabbitmq.reply-to``, so a caller needs no queue of its own; calls
are matched to replies by ``correlation_id``. A request expires in its queue when its caller
stops waiting (``expiration`` = the timeout): a worker that starts later does not answer a
caller that is gone.

Every publish is ``mandatory`` on a confirm channel: a request the broker cannot route to any
queue comes back (``basic.return``) instead of vanishing. That happens for a moment while a
sharded worker re-orders its consistent-hash ring (``bridge.ring.RingKeeper`` unbinds and
binds each shard queue) or before a worker has declared its queue; the publish is retried
with backoff for :data:`RETURN_RETRY_S` (a call: its timeout), then fails with one clear
error (:class:`~bridge.errors.PublishFailed` ``unroutable``, or :class:`~bridge.errors.NoAnswer`
saying the request was returned).
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

from bridge.errors import NoAnswer, NotDeclared, PublishFailed

REPLY_TO = "amq.rabbitmq.reply-to"
RETURN_RETRY_S = 5.0  # how long a returned (unroutable) publish is retried
_FIRST_PAUSE_S = 0.02  # first pause after a return, doubled up to _MAX_PAUSE_S
_MAX_PAUSE_S = 0.5


async def publish_routed(
    channel: AbstractChannel,
    exchange: str,
    message: aio_pika.Message,
    routing_key: str,
    retry_s: float,
) -> int:
    """Publish ``message`` mandatory on the confirm channel ``channel`` (opened with
    ``on_return_raises``) until the broker routes it to a queue; returns how many times it
    came back. Raises :class:`PublishFailed` ``unroutable`` when it still comes back after
    ``retry_s`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_s
    pause = _FIRST_PAUSE_S
    returned = 0
    target = (
        channel.default_exchange
        if exchange == ""
        else await channel.get_exchange(exchange, ensure=False)
    )
    while True:
        try:
            await target.publish(message, routing_key=routing_key, mandatory=True)
            return returned
        except aio_pika.exceptions.PublishError:
            returned += 1
        if deadline - loop.time() <= pause:  # the next attempt would come too late
            raise PublishFailed(
                "unroutable",
                f"exchange {exchange or '(default)'!r} routed the message (routing key "
                f"{routing_key!r}) to no queue, {returned} times in {retry_s:g} s: no queue "
                "is bound for it (is the worker running, with the same names?)",
            )
        await asyncio.sleep(pause)
        pause = min(pause * 2, _MAX_PAUSE_S)


class RpcClient:
    """Calls to the control plane of ``worker`` (named in the error when nobody answers)."""

    def __init__(self, connection: AbstractRobustConnection, worker: str) -> None:
        self.connection = connection
        self.worker = worker
        self.channel: AbstractChannel | None = None
        self._futures: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def open(self) -> RpcClient:
        self.channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
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
        :class:`NoAnswer` after ``timeout`` seconds (also when the request came back
        unroutable until then: retried meanwhile, see the module)."""
        assert self.channel is not None, "open() first"
        corr = uuid.uuid4().hex
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._futures[corr] = fut
        body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        message = aio_pika.Message(
            body,
            reply_to=REPLY_TO,
            correlation_id=corr,
            content_type="application/json",
            expiration=timeout,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            try:
                await asyncio.wait_for(
                    publish_routed(self.channel, exchange, message, routing_key, timeout),
                    timeout,
                )
            except PublishFailed:
                raise NoAnswer(
                    self.worker, exchange or routing_key, timeout, returned=True
                ) from None
            except aio_pika.exceptions.ChannelNotFoundEntity as exc:
                raise NotDeclared(self.worker, exchange) from exc
            return await asyncio.wait_for(fut, max(deadline - loop.time(), 0.001))
        except NoAnswer:
            raise
        except TimeoutError:
            raise NoAnswer(self.worker, exchange or routing_key, timeout) from None
        finally:
            self._futures.pop(corr, None)


class WorkerClient:
    """Base of the workers' client helpers: a confirm channel for publishing requests and an
    :class:`RpcClient` for queries. Subclasses name their worker and add its calls."""

    worker = "bridge"

    def __init__(
        self, connection: AbstractRobustConnection, *, return_retry_s: float = RETURN_RETRY_S
    ) -> None:
        self.connection = connection
        self.return_retry_s = return_retry_s
        self.rpc = RpcClient(connection, self.worker)
        self._channel: AbstractChannel | None = None

    async def open(self) -> Self:
        self._channel = await self.connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        await self.rpc.open()
        return self

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
        await self.rpc.close()

    async def publish(self, exchange: str, message: aio_pika.Message, routing_key: str) -> None:
        """Publish to one of the worker's exchanges, confirmed and routed to a queue (a
        return is retried for ``return_retry_s``, then :class:`PublishFailed`
        ``unroutable``); :class:`NotDeclared` if the exchange does not exist (the worker
        never ran here, or under other names)."""
        assert self._channel is not None, "open() first"
        try:
            await publish_routed(self._channel, exchange, message, routing_key, self.return_retry_s)
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
