"""Parked long polls of the directed worker: woken per target, by their timer, or all."""

from __future__ import annotations

import asyncio

from workers.directed.waiters import Waiters


async def test_wake_timeout_and_wake_all():
    waiters = Waiters()
    a1 = asyncio.ensure_future(waiters.wait("a", 30_000))
    a2 = asyncio.ensure_future(waiters.wait("a", 30_000))  # a second poll of the same target
    b = asyncio.ensure_future(waiters.wait("b", 30_000))
    short = asyncio.ensure_future(waiters.wait("c", 10))
    await asyncio.sleep(0)
    assert len(waiters) == 4
    waiters.wake(["a", "x"])
    await asyncio.wait_for(asyncio.gather(a1, a2), 5)
    assert not b.done()
    await asyncio.wait_for(short, 5)  # its wait is over: it returns without a wake
    assert len(waiters) == 1
    waiters.wake_all()
    await asyncio.wait_for(b, 5)
    assert len(waiters) == 0


async def test_a_cancelled_poll_leaves_nothing_behind():
    waiters = Waiters()
    poll = asyncio.ensure_future(waiters.wait("a", 30_000))
    await asyncio.sleep(0)
    poll.cancel()
    await asyncio.gather(poll, return_exceptions=True)
    assert len(waiters) == 0
    waiters.wake(["a"])  # nothing to wake, no error
