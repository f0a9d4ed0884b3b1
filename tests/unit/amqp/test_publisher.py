"""bridge.amqp.publisher.settled: every outcome of a batch of publishes, in order."""

from __future__ import annotations

import asyncio

import pytest

from bridge.amqp.publisher import settled
from bridge.errors import PublishFailed


async def test_settled_waits_for_every_outcome_in_any_order() -> None:
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[None]] = [loop.create_future() for _ in range(4)]
    failed = PublishFailed("nacked", "the broker nacked the publish")
    # the last settles first, an early one last: settled() must not return before it
    loop.call_later(0.01, futures[3].set_result, None)
    loop.call_later(0.02, futures[1].set_exception, failed)
    loop.call_later(0.03, futures[2].set_result, None)
    loop.call_later(0.05, futures[0].set_result, None)
    task = asyncio.ensure_future(settled(futures))
    await asyncio.sleep(0.035)
    assert not task.done(), "returned before the first publish had its outcome"
    assert await task == [None, failed, None, None]


async def test_settled_of_done_futures_and_of_none() -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    done.set_result(None)
    assert await settled([done]) == [None]
    assert await settled([]) == []


async def test_settled_is_cancelled_with_its_caller() -> None:
    loop = asyncio.get_running_loop()
    never: asyncio.Future[None] = loop.create_future()
    task = asyncio.ensure_future(settled([never]))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
