"""Probes the worker suites share: a metric of a worker process, the depth of a queue, waiting for
a readiness state, a stall of the broker link through the proxy."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from typing import Any

import aio_pika

from bench.chaos.harness import ChaosProcess, Harness, http_get


async def metric(proc: ChaosProcess, name: str, labels: str = "") -> float:
    text = (await http_get(proc.port, "/metrics", 5))[1].decode(errors="replace")
    pattern = rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} (\S+)$"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0


class QueueDepth:
    """Ready messages in a queue, from a passive declare on a plain (not robust) connection,
    because a robust channel answers a passive declare from its cache. Reconnects when the
    broker restarts (other suites share it)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None

    async def __call__(self, queue: str) -> int:
        for _ in range(120):
            try:
                if self._channel is None or self._channel.is_closed:
                    await self.close()
                    self._conn = await aio_pika.connect(self.url)
                    self._channel = await self._conn.channel()
                q = await self._channel.declare_queue(queue, passive=True)
                return q.declaration_result.message_count or 0
            except Exception:
                self._channel = None
                await asyncio.sleep(0.5)
        raise RuntimeError(f"cannot read the depth of {queue}")

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
        self._conn = None


async def wait_ready_state(proc: ChaosProcess, want: bool, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await proc.ready() == want:
            return True
        await asyncio.sleep(0.1)
    return False


async def stall(
    h: Harness, proc: ChaosProcess, watch: Any, proxy: Any, limit: float, kind: str
) -> dict[str, Any]:
    mark = len(watch.transitions)
    t = time.monotonic()
    proxy.stall()
    if kind == "long":  # until the worker notices (heartbeat 1 s: about 6 s), at most limit
        went_down = await wait_ready_state(proc, False, limit)
    else:
        await asyncio.sleep(limit)
        went_down = not await proc.ready()
    stalled = time.monotonic() - t
    proxy.resume()
    t = time.monotonic()
    came_back = await wait_ready_state(proc, True, 60)
    return {
        "kind": f"stall-{kind}",
        "stalled_s": round(stalled, 2),
        "went_down": went_down,
        "came_back": came_back,
        "ready_again_s": round(time.monotonic() - t, 2),
        "transitions": watch.since(mark),
    }


def median_or_none(xs: list[float]) -> float | None:
    return round(sorted(xs)[len(xs) // 2], 2) if xs else None
