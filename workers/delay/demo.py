"""The ``delay`` part of ``rabbitmq-bridge demo``: 300 messages on a hot topic and 5 on a cold
one, all due at one instant; each arrives, none before its time, and the lateness is
measured at the consumer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from bridge.demo import FlowResult, Tour, percentile
from workers.delay.client import DelayClient
from workers.delay.config import DelaySettings
from workers.delay.worker import DelayWorker

HOT_MESSAGES = 300  # messages due at one instant on the hot topic ...
COLD_MESSAGES = 5  # ... and on the cold one
DUE_IN_MS = 3000  # time to publish and store them before the instant


class DelayDemo:
    flow = "delay"
    order = 20

    def __init__(self, prefix: str) -> None:
        p = self.prefix = prefix
        self.settings = DelaySettings(
            in_exchange=f"{p}.delay.in",
            in_queue=f"{p}.delay.in",
            dead_exchange=f"{p}.delay.dead",
            dead_queue=f"{p}.delay.dead",
            control_exchange=f"{p}.delay.control",
            control_queue=f"{p}.delay.control",
            default_target=None,
            lanes=4,
            batch=500,
            load_interval_s=0.05,
        )
        self.worker = DelayWorker(self.settings)
        self.hot_exchange = f"{p}.orders"  # the two business topics
        self.cold_exchange = f"{p}.alerts"

    def names(self) -> list[tuple[str, str]]:
        s = self.settings
        return [
            ("exchange", s.in_exchange),
            ("exchange", s.control_exchange),
            ("exchange", s.dead_exchange),
            ("exchange", self.hot_exchange),
            ("exchange", self.cold_exchange),
            ("queue", s.in_queue),
            ("queue", s.control_queue),
            ("queue", s.dead_queue),
            ("queue", self.hot_exchange + ".q"),
            ("queue", self.cold_exchange + ".q"),
        ]

    async def run(self, tour: Tour, result: FlowResult) -> None:
        say = tour.say
        arrived: dict[str, dict[str, float]] = {self.hot_exchange: {}, self.cold_exchange: {}}
        total = HOT_MESSAGES + COLD_MESSAGES
        all_in = asyncio.Event()
        channel = await tour.connection.channel()
        tour.cleanups.append(channel.close)
        for exchange_name in (self.hot_exchange, self.cold_exchange):
            # auto-delete exchange + exclusive queue: gone with the demo's connection even if the
            # explicit deletion at the end never runs
            exchange = await channel.declare_exchange(
                exchange_name, aio_pika.ExchangeType.TOPIC, auto_delete=True
            )
            queue = await channel.declare_queue(exchange_name + ".q", exclusive=True)
            await queue.bind(exchange, "#")
            await queue.consume(_recorder(arrived, exchange_name, total, all_in), no_ack=True)

        client = await DelayClient(tour.connection, self.settings).open()
        tour.cleanups.append(client.close)
        due = _now_ms() + DUE_IN_MS
        sends = [(f"order-{i}", self.hot_exchange) for i in range(HOT_MESSAGES)]
        sends += [(f"alert-{i}", self.cold_exchange) for i in range(COLD_MESSAGES)]
        result.what = f"{total} messages due at one instant, hot and cold topic"
        say(
            "delay",
            f"publish {HOT_MESSAGES} messages to hot topic {self.hot_exchange} and {COLD_MESSAGES} "
            f"to cold topic {self.cold_exchange}, all due at {_clock(due)} (x-deliver-at)",
        )
        for start in range(0, total, 100):
            await asyncio.gather(
                *(
                    client.send(
                        b"due", exchange, deliver_at_ms=due, message_id=mid, routing_key="demo"
                    )
                    for mid, exchange in sends[start : start + 100]
                )
            )
        while True:
            stored = int((await client.counts()).get("total", 0))
            if stored == total or _now_ms() >= due - 100:
                break
            await asyncio.sleep(0.05)
        early = sum(len(a) for a in arrived.values())
        say(
            "delay",
            f"stored by the worker before the instant: {stored}/{total}; delivered so far: {early}",
        )

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_in.wait(), max(due - _now_ms(), 0) / 1000 + 15)
        figures, problems = [], []
        for label, exchange_name, expected in (
            ("hot", self.hot_exchange, HOT_MESSAGES),
            ("cold", self.cold_exchange, COLD_MESSAGES),
        ):
            late = [at - due for at in arrived[exchange_name].values()]
            p50, worst = (percentile(late, 50), max(late)) if late else (0.0, 0.0)
            say(
                "delay",
                f"{label}: {len(late)}/{expected} arrived, lateness p50 {p50:.0f} ms, "
                f"max {worst:.0f} ms",
            )
            figures.append(f"{label} p50 {p50:.0f}/max {worst:.0f} ms")
            if len(late) != expected:
                problems.append(f"{label}: {expected - len(late)} missing")
            if late and min(late) < 0:
                problems.append(f"{label}: delivered {-min(late):.0f} ms EARLY")
        result.figures = ", ".join(figures)
        if problems:
            raise AssertionError("; ".join(problems))
        say(
            "delay",
            "every message arrived, none before its time (lateness measured at the consumer)",
        )
        result.ok = True


def _recorder(
    arrived: dict[str, dict[str, float]], exchange: str, total: int, all_in: asyncio.Event
) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
    """A consumer that notes when each message arrived (wall clock, like the due times)."""

    async def on_message(message: AbstractIncomingMessage) -> None:
        arrived[exchange][message.message_id or ""] = time.time() * 1000
        if sum(len(a) for a in arrived.values()) >= total:
            all_in.set()

    return on_message


def _now_ms() -> int:
    return int(time.time() * 1000)


def _clock(ms: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}"
