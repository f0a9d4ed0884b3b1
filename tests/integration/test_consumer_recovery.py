"""A queue a worker consumes is deleted under it (an operator, a policy, a cluster event):
the broker cancels the consumer without closing the channel, so neither aio-pika's robust
channel nor the connection notices. The workers must see it, say so on /readyz, declare the
queue again and consume it, instead of staying "ready" while consuming nothing."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.integration.delay_helpers import delay_settings, delay_worker, make_sink

pytestmark = pytest.mark.integration


async def wait_for(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.05)


async def test_delay_ingress_queue_deleted_is_declared_and_consumed_again(
    broker_url, amqp, tmp_path, unique
):
    s = delay_settings(unique)
    sink = await make_sink(amqp, unique, "recover")
    async with delay_worker(
        broker_url, tmp_path, s, amqp, exchanges=[sink.exchange], queues=[sink.queue]
    ) as (worker, client):
        await client.send(b"before", sink.exchange, delay_ms=0, message_id="before")
        await sink.wait_for(1)
        channel = await amqp.channel()
        await channel.queue_delete(s.in_queue)
        await wait_for(lambda: not worker.ready()[0], "not ready once the consumer is gone")
        await wait_for(lambda: worker.ready()[0], "ready again, consuming a new queue")
        await client.send(b"after", sink.exchange, delay_ms=0, message_id="after")
        got = await sink.wait_for(2)
        assert [r.message.message_id for r in got] == ["before", "after"]
