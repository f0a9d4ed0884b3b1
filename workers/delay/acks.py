"""Acknowledging consumed deliveries in order, with as few frames as possible.

A group commit settles many ingress deliveries at once; one ``basic.ack`` with ``multiple``
for the newest of a settled prefix replaces one frame per message (which the broker has to
process too). Deliveries settled out of order wait for the ones before them.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Any


class Slot:
    """One delivery: its channel (aiormq), delivery tag, and outcome once settled."""

    __slots__ = ("channel", "outcome", "tag")

    def __init__(self, channel: Any, tag: int) -> None:
        self.channel = channel
        self.tag = tag
        self.outcome: str | None = None  # "ack" | "nacked"


class _Line:
    __slots__ = ("newest", "sending", "slots")

    def __init__(self) -> None:
        self.slots: deque[Slot] = deque()
        self.newest: Slot | None = None
        self.sending = False


class AckLine:
    """Deliveries of each channel in delivery order.

    The frames of one channel go out one at a time, newest last: a ``multiple`` ack overtaken
    by a newer one would name a tag the broker already forgot, and the broker closes the
    channel for that. A channel replaced by a reconnect starts a new line; its old delivery
    tags are void (the broker redelivers those messages).
    """

    def __init__(self) -> None:
        self._lines: dict[int, _Line] = {}

    def track(self, channel: Any, tag: int) -> Slot:
        """Call in delivery order (first thing in the consumer callback)."""
        line = self._lines.get(id(channel))
        if line is None:
            line = self._lines[id(channel)] = _Line()
        slot = Slot(channel, tag)
        line.slots.append(slot)
        return slot

    async def ack(self, slot: Slot) -> None:
        await self._settle(slot, "ack")

    async def nack(self, slot: Slot) -> None:
        """Requeue now (the broker redelivers it), then let the line move past it."""
        if slot.outcome is not None:
            return
        with contextlib.suppress(Exception):
            await slot.channel.basic_nack(slot.tag, requeue=True)
        await self._settle(slot, "nacked")

    async def _settle(self, slot: Slot, outcome: str) -> None:
        slot.outcome = outcome
        key = id(slot.channel)
        line = self._lines.get(key)
        if line is None:
            return
        slots = line.slots
        while slots and slots[0].outcome is not None:
            done = slots.popleft()
            if done.outcome == "ack":
                line.newest = done
        if line.sending:
            return  # the task sending now picks up the newest when it is done
        line.sending = True
        try:
            while line.newest is not None:
                newest, line.newest = line.newest, None
                # After a reconnect the tag is stale and this fails: the broker redelivers,
                # and the message is stored twice (delivered twice, same message_id).
                with contextlib.suppress(Exception):
                    await newest.channel.basic_ack(newest.tag, multiple=True)
        finally:
            line.sending = False
            if not slots and self._lines.get(key) is line:
                del self._lines[key]

    @property
    def waiting(self) -> int:
        return sum(len(line.slots) for line in self._lines.values())
