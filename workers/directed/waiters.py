"""Long polls parked per target until a message for it is accepted or their wait is over.

Kept small because every waiting node holds one for up to ``MAX_WAIT_MS`` (10,000 nodes wait
at once): a future, a timer and one list slot per poll (most targets have one poll, so a list
rather than a set), no task and no ``asyncio.wait_for`` (which adds a second future, a
callback object and a frame). This was about 1 KB of the worker's memory per waiting node.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


def _release(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Waiters:
    def __init__(self) -> None:
        self._parked: dict[str, list[asyncio.Future[None]]] = {}

    def __len__(self) -> int:
        """Polls waiting now."""
        return sum(len(futs) for futs in self._parked.values())

    async def wait(self, target: str, timeout_s: float) -> None:
        """Until :meth:`wake` names ``target`` (or :meth:`release_all`), or ``timeout_s``."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        parked = self._parked.get(target)
        if parked is None:
            self._parked[target] = [fut]
        else:
            parked.append(fut)
        timer = loop.call_later(timeout_s, _release, fut)
        try:
            await fut
        finally:
            timer.cancel()
            parked = self._parked.get(target)
            if parked is not None and fut in parked:
                parked.remove(fut)
                if not parked:
                    del self._parked[target]

    def wake(self, targets: Iterable[str]) -> None:
        """The polls of ``targets`` return now."""
        if not self._parked:
            return
        for target in targets:
            for fut in self._parked.pop(target, ()):
                _release(fut)

    def release_all(self) -> None:
        """Every poll returns now (the worker is stopping)."""
        parked, self._parked = self._parked, {}
        for futs in parked.values():
            for fut in futs:
                _release(fut)
