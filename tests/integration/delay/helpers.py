"""Shared pieces of the delay integration tests: unique names, a running worker, a target
exchange with a queue that records when each message arrived."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from bench.harness.broker import delete_names
from bench.harness.procs import settings_env
from tests.conftest import get_messages, running_host
from workers.delay.client import DelayClient
from workers.delay.config import DelaySettings
from workers.delay.worker import DelayWorker

ENV_FIELDS = (
    "in_exchange",
    "in_queue",
    "dead_exchange",
    "dead_queue",
    "control_exchange",
    "control_queue",
    "lanes",
    "batch",
    "horizon_ms",
    "window_ms",
    "window_max_entries",
    "load_interval_s",
    "synchronous",
)


def delay_settings(unique: str, **overrides: Any) -> DelaySettings:
    names: dict[str, Any] = {
        "in_exchange": f"{unique}.delay.in",
        "in_queue": f"{unique}.delay.in",
        "dead_exchange": f"{unique}.delay.dead",
        "dead_queue": f"{unique}.delay.dead",
        "control_exchange": f"{unique}.delay.control",
        "control_queue": f"{unique}.delay.control",
        "lanes": 4,
        "load_interval_s": 0.05,
    }
    names.update(overrides)
    return DelaySettings(**names)


def env_for(settings: DelaySettings) -> dict[str, str]:
    """The same settings as BRIDGE_DELAY__* variables, for a worker subprocess."""
    return settings_env("delay", settings, ENV_FIELDS)


async def cleanup(url: str, s: DelaySettings, exchanges: list[str], queues: list[str]) -> None:
    await delete_names(
        url,
        [s.in_exchange, s.dead_exchange, s.control_exchange, *exchanges],
        [s.in_queue, s.dead_queue, s.control_queue, *queues],
    )


@dataclass
class Received:
    message: AbstractIncomingMessage
    at_ms: float  # wall clock when the consumer got it


@dataclass
class Sink:
    """A target exchange (topic) bound '#' to a queue that records arrival times."""

    exchange: str
    queue: str
    got: list[Received] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def ids(self) -> list[str | None]:
        return [r.message.message_id for r in self.got]

    async def wait_for(self, count: int, timeout: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.got) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.exchange}: {len(self.got)} of {count} messages arrived"
                )
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), min(remaining, 0.5))
        return self.got


async def make_sink(amqp: Any, unique: str, name: str) -> Sink:
    channel = await amqp.channel()
    sink = Sink(f"{unique}.{name}", f"{unique}.{name}.q")
    exchange = await channel.declare_exchange(sink.exchange, "topic", durable=True)
    queue = await channel.declare_queue(sink.queue, durable=True)
    await queue.bind(exchange, "#")

    async def on_message(message: AbstractIncomingMessage) -> None:
        sink.got.append(Received(message, time.time() * 1000))
        sink.arrived.set()

    await queue.consume(on_message, no_ack=True)
    return sink


@contextlib.asynccontextmanager
async def delay_worker(
    broker_url: str,
    state: Path,
    settings: DelaySettings,
    amqp: Any,
    *,
    exchanges: list[str] | None = None,
    queues: list[str] | None = None,
) -> AsyncIterator[tuple[DelayWorker, DelayClient]]:
    worker = DelayWorker(settings)
    try:
        async with running_host(broker_url, state, [worker]):
            client = await DelayClient(amqp, settings).open()
            try:
                yield worker, client
            finally:
                await client.close()
    finally:
        await cleanup(broker_url, settings, exchanges or [], queues or [])


async def dead_letters(
    amqp: Any, settings: DelaySettings, count: int, timeout: float = 10.0
) -> list[AbstractIncomingMessage]:
    return await get_messages(amqp, settings.dead_queue, count, timeout)


async def wait_stored(client: DelayClient, total: int, timeout: float = 10.0) -> dict[str, Any]:
    """Poll counts until ``total`` messages are stored (the worker consumed them)."""
    deadline = time.monotonic() + timeout
    reply: dict[str, Any] = {}
    while True:
        try:  # a reply lost while the worker reconnects is the caller's to retry (contract)
            reply = await client.counts(timeout=max(0.5, min(3.0, deadline - time.monotonic())))
        except TimeoutError:
            reply = {"error": "no reply (timeout)"}
        if reply.get("total") == total:
            return reply
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {total} stored, counts say {reply}")
        await asyncio.sleep(0.05)


def now_ms() -> int:
    return int(time.time() * 1000)


def header(message: AbstractIncomingMessage, name: str) -> Any:
    value = (message.headers or {}).get(name)
    return value.decode() if isinstance(value, bytes) else value
