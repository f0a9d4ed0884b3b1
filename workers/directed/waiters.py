"""Long polls parked per target until a message for it is accepted or their wait is over.

Kept small because every waiting node holds one for up to ``MAX_WAIT_MS`` (10,000 nodes wait
at once): a future and two container slots per poll. No task, no ``asyncio.wait_for`` (a
second future, a callback object, a timer) and no timer per poll (uvloop's timer handle is
650 bytes): polls whose wait ends in the same tenth of a second share one set, and one
sweeper releases the sets that are due, so a wait may end up to ``TICK_S`` late.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable

TICK_S = 0.1


def _release(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Waiters:
    def __init__(self) -> None:
        self._parked: dict[str, list[asyncio.Future[None]]] = {}  # target -> its polls
        self._due: dict[int, set[asyncio.Future[None]]] = {}  # tick -> polls ending then
        self._sweeper: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        """Polls waiting now."""
        return sum(len(futs) for futs in self._parked.values())

    async def wait(self, target: str, wait_ms: int) -> None:
        """Until :meth:`wake` names ``target`` (or :meth:`wake_all`), or ``wait_ms`` passed
        (rounded up to the next tick)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        parked = self._parked.get(target)
        if parked is None:
            self._parked[target] = [fut]
        else:
            parked.append(fut)
        tick = math.ceil((loop.time() + wait_ms / 1000) / TICK_S)
        due = self._due.get(tick)
        if due is None:
            self._due[tick] = {fut}
        else:
            due.add(fut)
        if self._sweeper is None:
            self._sweeper = loop.call_later(TICK_S, self._sweep)
        try:
            await fut
        finally:
            due = self._due.get(tick)
            if due is not None:
                due.discard(fut)
                if not due:
                    del self._due[tick]
            parked = self._parked.get(target)
            if parked is not None and fut in parked:
                parked.remove(fut)
                if not parked:
                    del self._parked[target]

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = math.floor(loop.time() / TICK_S)
        for tick in [t for t in self._due if t <= now]:
            for fut in self._due.pop(tick):
                _release(fut)
        self._sweeper = loop.call_later(TICK_S, self._sweep) if self._due else None

    def wake(self, targets: Iterable[str]) -> None:
        """The polls of ``targets`` return now."""
        if not self._parked:
            return
        for target in targets:
            for fut in self._parked.pop(target, ()):
                _release(fut)

    def wake_all(self) -> None:
        """Every poll returns now (the worker is stopping)."""
        parked, self._parked = self._parked, {}
        for futs in parked.values():
            for fut in futs:
                _release(fut)
