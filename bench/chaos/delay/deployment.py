"""The ``delay`` worker under fault: its settings, topology, target sinks and the records of what
was sent."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from bench.chaos.harness import ChaosProcess, Harness
from bench.harness.broker import delete_names
from bench.harness.procs import settings_env
from workers.delay.config import DelaySettings

TOPICS = 4

KILLED = (
    "kill -9 while it was in flight (ingress not yet acknowledged, or confirmed at the "
    "target before its delete was committed): published again, same message_id and body"
)
LINK = (
    "broker connection fault while it was in flight (ingress ack or the target's confirm "
    "lost with the connection): published again, same message_id and body"
)
PRODUCER = (
    "the producer published it again after an unconfirmed publish (two copies in delay.in, "
    "same message_id and body)"
)


def settings_for(prefix: str, **overrides: Any) -> DelaySettings:
    names = {
        "in_exchange": f"{prefix}.in",
        "in_queue": f"{prefix}.in",
        "dead_exchange": f"{prefix}.dead",
        "dead_queue": f"{prefix}.dead",
        "control_exchange": f"{prefix}.control",
        "control_queue": f"{prefix}.control",
    }
    return DelaySettings(**{**names, **overrides})


def env_for(s: DelaySettings, **host: str) -> dict[str, str]:
    out = settings_env("delay", s)
    out.update({f"BRIDGE_{k.upper()}": v for k, v in host.items()})
    return out


@dataclass
class Arrival:
    at_ms: float  # wall clock when the consumer got it
    topic: str
    body: bytes


class Sinks:
    """Target exchanges (topic, durable), each with a quorum queue bound ``#``. Consumed
    here with manual acks unless ``consume`` is false (the overload flood's sink)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.arrivals: dict[str, list[Arrival]] = defaultdict(list)
        self.consumer_redeliveries = 0
        self.total = 0
        self.on_arrival: Any = None
        self._conn: AbstractRobustConnection | None = None

    async def start(self, url: str, *, consume: bool = True, lazy: bool = False) -> Sinks:
        self._conn = await aio_pika.connect_robust(url)
        channel = await self._conn.channel()
        await channel.set_qos(prefetch_count=1000)
        for name in self.names:
            exchange = await channel.declare_exchange(name, "topic", durable=True)
            args = {"x-queue-mode": "lazy"} if lazy else {"x-queue-type": "quorum"}
            queue = await channel.declare_queue(name, durable=True, arguments=args)
            await queue.bind(exchange, "#")
            if consume:
                await queue.consume(partial(self._on_message, name))
        return self

    async def _on_message(self, topic: str, message: AbstractIncomingMessage) -> None:
        mid = message.message_id or ""
        if message.redelivered and mid in self.arrivals:
            # our own ack was lost with our connection: the broker's doing, not the worker's
            self.consumer_redeliveries += 1
        else:
            arrival = Arrival(time.time() * 1000, topic, message.body)
            self.arrivals[mid].append(arrival)
            self.total += 1
            if self.on_arrival is not None:
                self.on_arrival(mid, arrival)
        with contextlib.suppress(Exception):
            await message.ack()

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()


@contextlib.asynccontextmanager
async def deployment(
    h: Harness,
    scenario: str,
    *,
    proxy: Any = None,
    host: dict[str, str] | None = None,
    topics: int = TOPICS,
    **over: Any,
) -> AsyncIterator[tuple[DelaySettings, ChaosProcess, Sinks]]:
    prefix = h.unique(f"chaos-delay-{scenario}")
    s = settings_for(prefix, **over)
    sinks = Sinks([f"{prefix}.t{i}" for i in range(topics)])
    proc = h.process(["delay"], env=env_for(s, **(host or {})), proxy=proxy, name=scenario)
    try:
        await sinks.start(h.broker_url)
        h.scenario(scenario)["start_s"] = round(await proc.start(), 2)
        yield s, proc, sinks
    finally:
        await proc.stop()
        await sinks.close()
        await delete_names(
            h.broker_url,
            [s.in_exchange, s.dead_exchange, s.control_exchange, *sinks.names],
            [s.in_queue, s.dead_queue, s.control_queue, *sinks.names],
        )


@dataclass
class Msg:
    id: str
    topic: str
    kind: str
    published_ms: float  # wall clock before the first publish attempt
    due_lo_ms: int  # it must not arrive before this
    key: str | None = None
    attempts: int = 0
    confirmed: bool = False

    @property
    def body(self) -> bytes:
        return f"{self.id}|{self.topic}|{self.kind}".encode()


@dataclass
class Fault:
    start_ms: float
    end_ms: float
    kind: str  # "kill" or "link"


@dataclass
class Pair:
    old: str
    new: str
