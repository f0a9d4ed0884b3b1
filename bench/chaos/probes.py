"""Probes and faults the worker suites share: a metric of a worker process, the depth of a
queue, waiting for a readiness state; the broker link through the proxy cut, stalled or slow,
and the figures and checks of kill -9 loops, link faults and broker restarts."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
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


async def cut(h: Harness, proc: ChaosProcess, watch: Any, proxy: Any) -> dict[str, Any]:
    """Drop every connection and refuse new ones for a drawn while (the worker's host
    connection and every lane's)."""
    mark = len(watch.transitions)
    refuse = h.rng.uniform(0.5, 2.0)
    proxy.accepting = False
    proxy.cut()
    went_down = await wait_ready_state(proc, False, 10)
    await asyncio.sleep(refuse)
    proxy.accepting = True
    t = time.monotonic()
    came_back = await wait_ready_state(proc, True, 60)
    return {
        "kind": "cut",
        "refused_s": round(refuse, 2),
        "went_down": went_down,
        "came_back": came_back,
        "ready_again_s": round(time.monotonic() - t, 2),
        "transitions": watch.since(mark),
    }


async def slow_link(
    h: Harness,
    proc: ChaosProcess,
    watch: Any,
    proxy: Any,
    progress: Callable[[], int],
    counted: str,
) -> dict[str, Any]:
    """A drawn latency each way for a few seconds: how far ``progress()`` went meanwhile
    (reported as ``counted``) and whether the worker stayed ready."""
    mark = len(watch.transitions)
    latency = h.rng.uniform(0.05, 0.2)
    seconds = 4.0 if h.quick else 8.0
    before = progress()
    proxy.latency = latency
    await asyncio.sleep(seconds)
    proxy.latency = 0.0
    return {
        "kind": "slow",
        "latency_ms_each_way": round(latency * 1000),
        "seconds": seconds,
        counted: progress() - before,
        "stayed_ready": all(up for _, up in watch.since(mark)) and await proc.ready(),
        "transitions": watch.since(mark),
    }


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


def kill_figures(h: Harness, kills: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``kill9`` scenario's figures, started with what :meth:`Harness.kill_loop` did."""
    figures = h.scenario("kill9")
    figures["kills"] = len(kills)
    figures["kills_during_startup"] = sum(1 for k in kills if k["phase"] == "startup")
    figures["restart_s_median"] = median_or_none([k["ready_s"] for k in kills if "ready_s" in k])
    return figures


def link_figures(
    h: Harness, proc: ChaosProcess, pid: int, watch: Any, faults: list[dict[str, Any]]
) -> dict[str, Any]:
    """The ``broker_link`` scenario's figures, and its checks: the worker recovered by itself
    (the same process ``pid``), /readyz went false then true on every cut and long stall."""
    figures = h.scenario("broker_link")
    figures["faults"] = faults
    figures["same_process"] = proc.alive and proc.pid == pid and proc.starts == 1
    figures["not_ready_s"] = watch.not_ready_s
    h.check(figures["same_process"], "broker_link: the worker was restarted or died")
    for fault in faults:
        if fault["kind"] in ("cut", "stall-long"):
            h.check(
                fault["went_down"] and fault["came_back"],
                f"broker_link: /readyz did not go false then true on {fault['kind']}",
            )
    return figures


async def restart_broker(h: Harness, proc: ChaosProcess) -> dict[str, Any]:
    """``stop_app`` for a drawn while, ``start_app``, then wait for the worker to be ready:
    the ``broker_restart`` scenario's figures."""
    figures = h.scenario("broker_restart")
    figures.update(await h.broker_restart(h.rng.uniform(2.0, 5.0)))
    t = time.monotonic()
    figures["came_back"] = await wait_ready_state(proc, True, 120)
    figures["ready_after_start_app_s"] = round(time.monotonic() - t, 2)
    return figures


def check_restart(
    h: Harness, proc: ChaosProcess, pid: int, watch: Any, figures: dict[str, Any]
) -> None:
    """The ``broker_restart`` checks: the same process, /readyz false then true."""
    figures["went_down"] = watch.went_down
    figures["transitions"] = watch.transitions
    figures["same_process"] = proc.alive and proc.pid == pid and proc.starts == 1
    h.check(figures["same_process"], "broker_restart: the worker was restarted or died")
    h.check(watch.went_down and figures["came_back"], "broker_restart: /readyz not false->true")
