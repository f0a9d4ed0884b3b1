"""BatchAcker (bridge/amqp.py): acknowledgements of one channel go out in tag order."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from bridge.amqp import BatchAcker


class SlowChannel:
    """basic_ack that blocks on its first call, like a put() into a full write queue."""

    def __init__(self) -> None:
        self.acks: list[int] = []
        self.gate = asyncio.Event()
        self.calls = 0

    async def basic_ack(self, tag: int, multiple: bool = False) -> None:
        assert multiple
        self.calls += 1
        if self.calls == 1:
            await self.gate.wait()
        self.acks.append(tag)


@dataclass
class Delivery:
    channel: Any
    delivery_tag: int


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_later_ack_never_overtakes_an_earlier_one():
    """Acknowledging tag 1 after tag 3 (multiple=True) is 'unknown delivery tag' for the
    broker, which closes the channel: the second batch must wait for the first."""
    acker, channel = BatchAcker(), SlowChannel()
    acker.ack(Delivery(channel, 1))  # type: ignore[arg-type]
    await settle()
    acker.ack(Delivery(channel, 2))  # type: ignore[arg-type]
    acker.ack(Delivery(channel, 3))  # type: ignore[arg-type]
    await settle()
    assert channel.acks == []
    channel.gate.set()
    await settle()
    assert channel.acks == [1, 3]
    acker.ack(Delivery(channel, 4))  # type: ignore[arg-type]
    await settle()
    assert channel.acks == [1, 3, 4]


async def test_channels_are_independent():
    acker, slow, fast = BatchAcker(), SlowChannel(), SlowChannel()
    fast.calls = 1  # never blocks
    acker.ack(Delivery(slow, 5))  # type: ignore[arg-type]
    acker.ack(Delivery(fast, 7))  # type: ignore[arg-type]
    await settle()
    assert fast.acks == [7] and slow.acks == []
    slow.gate.set()
    await settle()
    assert slow.acks == [5]
