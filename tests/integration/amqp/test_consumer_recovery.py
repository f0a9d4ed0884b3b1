"""A queue a worker consumes is deleted under it (an operator, a policy, a cluster event):
the broker cancels the consumer without closing the channel, so neither aio-pika's robust
channel nor the connection notices. The workers must see it, say so on /readyz, declare the
queue again and consume it, instead of staying "ready" while consuming nothing (both tests
failed before: the workers stayed ready and consumed nothing)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from tests.integration.delay.helpers import delay_settings, delay_worker, make_sink
from tests.integration.directed.helpers import directed, directed_settings, wait_applied

pytestmark = pytest.mark.integration


async def wait_for(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.05)


class Readiness:
    """Samples an in-process worker's readiness on every event-loop turn: a consumer the
    broker cancelled is declared and consumed again within a few round trips, too fast for
    a poll every 50 ms to see, but never within one loop turn."""

    def __init__(self, worker) -> None:
        self.worker = worker
        self.reasons: list[str] = []
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            ok, reason = self.worker.ready()
            if not ok and (not self.reasons or self.reasons[-1] != reason):
                self.reasons.append(reason)
            await asyncio.sleep(0)

    async def stop(self) -> list[str]:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return self.reasons


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
        readiness = Readiness(worker)
        await channel.queue_delete(s.in_queue)
        await wait_for(
            lambda: worker.metrics.consumer_restored._value.get() == 1, "declared and consumed"
        )
        await wait_for(lambda: worker.ready()[0], "ready again, consuming a new queue")
        reasons = await readiness.stop()
        assert any("consumer cancelled by the broker" in r for r in reasons), reasons
        await client.send(b"after", sink.exchange, delay_ms=0, message_id="after")
        got = await sink.wait_for(2)
        assert [r.message.message_id for r in got] == ["before", "after"]


@pytest.mark.parametrize("queue", ["requests", "pull"])
async def test_directed_queue_deleted_is_declared_and_consumed_again(
    broker_url, amqp, tmp_path, unique, queue
):
    s = directed_settings(unique)
    async with directed(broker_url, tmp_path, s, amqp) as (worker, client):
        await client.send(b"before", ["a"], message_id="before")
        await wait_applied(client, "before")
        channel = await amqp.channel()
        readiness = Readiness(worker)
        await channel.queue_delete(s.requests_queue if queue == "requests" else s.pull_queue)
        await wait_for(
            lambda: worker.metrics.consumers_restored._value.get() == 1, "declared and consumed"
        )
        await wait_for(lambda: worker.ready()[0], "ready again, consuming a new queue")
        reasons = await readiness.stop()
        assert any("consumer cancelled by the broker" in r for r in reasons), reasons
        # both paths work again: a request is applied, a pull is answered
        await client.send(b"after", ["a"], message_id="after")
        await wait_applied(client, "after")
        reply = await client.pull("a", None, max=10)
        assert [m["id"] for m in reply["messages"]] == ["before", "after"]
        assert worker.metrics.consumers_restored._value.get() == 1


async def test_delay_control_queue_deleted_is_declared_and_consumed_again(
    broker_url, amqp, tmp_path, unique
):
    s = delay_settings(unique)
    async with delay_worker(broker_url, tmp_path, s, amqp) as (worker, client):
        assert (await client.counts())["total"] == 0
        channel = await amqp.channel()
        readiness = Readiness(worker)
        await channel.queue_delete(s.control_queue)
        await wait_for(
            lambda: any(c.restored == 1 for c in worker.consumers), "declared and consumed"
        )
        await wait_for(lambda: worker.ready()[0], "ready again, consuming a new queue")
        reasons = await readiness.stop()
        assert any("consumer cancelled by the broker" in r for r in reasons), reasons
        assert (await client.counts())["total"] == 0  # control answers again
