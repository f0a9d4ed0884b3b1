"""The client helpers publish ``mandatory``: a request the broker routes to no queue (a ring
repair unbinding a shard queue for a moment, a worker not yet started) is retried until it is
routed, then fails with one clear error, never dropped in silence."""

from __future__ import annotations

import asyncio
import json

import aio_pika
import pytest

from bench.harness.broker import delete_names
from bridge.errors import NoAnswer, PublishFailed
from bridge.rpc import RpcClient, WorkerClient

pytestmark = pytest.mark.integration


async def _bind_later(
    amqp, exchange: str, queue: str, delay_s: float
) -> aio_pika.abc.AbstractQueue:
    await asyncio.sleep(delay_s)
    channel = await amqp.channel()
    q = await channel.declare_queue(queue, auto_delete=True)
    await q.bind(exchange, routing_key="k")
    return q


async def test_a_publish_with_no_binding_yet_arrives_once_a_queue_is_bound(
    broker_url, amqp, unique
):
    channel = await amqp.channel()
    await channel.declare_exchange(unique, aio_pika.ExchangeType.DIRECT, auto_delete=False)
    client = await WorkerClient(amqp).open()
    try:
        binder = asyncio.create_task(_bind_later(amqp, unique, f"{unique}.q", 0.3))
        await client.publish(unique, aio_pika.Message(b"kept", message_id="m1"), "k")
        queue = await binder
        got = await queue.get(timeout=5, fail=False)
        assert got is not None and got.body == b"kept"  # without mandatory: dropped
        await got.ack()
        assert await queue.get(fail=False) is None  # once: the returned attempts were not routed
    finally:
        await client.close()
        await delete_names(broker_url, [unique], [f"{unique}.q"])


async def test_a_publish_never_routed_fails_with_one_clear_error(broker_url, amqp, unique):
    channel = await amqp.channel()
    await channel.declare_exchange(unique, aio_pika.ExchangeType.DIRECT, auto_delete=False)
    client = await WorkerClient(amqp, return_retry_s=0.3).open()
    try:
        with pytest.raises(PublishFailed) as caught:
            await client.publish(unique, aio_pika.Message(b"x"), "k")
        assert caught.value.reason == "unroutable"
        assert f"exchange '{unique}' routed the message (routing key 'k') to no queue" in str(
            caught.value
        )
    finally:
        await client.close()
        await delete_names(broker_url, [unique], [])


async def test_a_call_with_no_binding_yet_is_answered_once_the_worker_binds(
    broker_url, amqp, unique
):
    channel = await amqp.channel()
    await channel.declare_exchange(unique, aio_pika.ExchangeType.DIRECT, auto_delete=False)
    rpc = await RpcClient(amqp, "test").open()

    async def worker() -> None:
        queue = await _bind_later(amqp, unique, f"{unique}.q", 0.3)
        message = await queue.get(timeout=5, fail=False)
        while message is None:
            await asyncio.sleep(0.02)
            message = await queue.get(fail=False)
        await message.ack()
        reply = json.dumps({"echo": json.loads(message.body)}).encode()
        await channel.default_exchange.publish(
            aio_pika.Message(reply, correlation_id=message.correlation_id),
            routing_key=message.reply_to or "",
        )

    try:
        task = asyncio.create_task(worker())
        assert await rpc.call(unique, "k", {"op": "ping"}, timeout=5) == {"echo": {"op": "ping"}}
        await task
        with pytest.raises(NoAnswer) as caught:  # never bound: returned until the timeout
            await rpc.call(unique, "other", {"op": "ping"}, timeout=0.3)
        assert "came back unroutable" in str(caught.value)
    finally:
        await rpc.close()
        await delete_names(broker_url, [unique], [f"{unique}.q"])
