"""The traffic of the parts: a confirmed publisher, and consumers of the target topics, each group
in a process of its own (``python -m bench.delay.traffic SPEC``)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika

from bench.harness.report import broker_url
from bridge.amqp.frames import Properties
from bridge.amqp.link import Link
from bridge.amqp.publisher import Publisher


async def publish_all(
    publisher: Publisher, exchange: str, messages: list[tuple[dict[str, Any], str]]
) -> float:
    """Publish persistent messages (``headers``, ``message_id``) with confirms, at most the
    publisher's window in flight; returns messages/s. The publisher is the project's own
    (:mod:`bridge.amqp`), as in the steady part: on two cores the load generator should
    take as little CPU from the broker and the worker as it can."""
    body = b"x" * 100
    window = max(1, publisher.window)
    pending: deque[asyncio.Future[None]] = deque()
    started = time.perf_counter()
    for headers, message_id in messages:
        if len(pending) >= window:
            await pending.popleft()  # a failed publish raises: the benchmark stops
        pending.append(
            publisher.publish(
                exchange,
                "bench",
                body,
                Properties(headers=headers, message_id=message_id, delivery_mode=2),
            )
        )
    for fut in pending:
        await fut
    return len(messages) / (time.perf_counter() - started)


@contextlib.asynccontextmanager
async def bench_publisher(window: int = 500) -> AsyncIterator[Publisher]:
    """A confirming publisher on a link of its own, closed afterwards."""
    link = Link(broker_url(), name="bench publisher")
    publisher = Publisher(link, window=window)
    await link.start()
    try:
        yield publisher
    finally:
        await link.close()


REPO = str(Path(__file__).resolve().parents[2])


class Arrivals:
    """What the consumers of the target queues saw: (arrival - due) per message id."""

    def __init__(self) -> None:
        self.late: dict[str, float] = {}
        self.duplicates = 0
        self.early = 0
        self.cpu_s = 0.0  # the consumer processes' CPU, start-up included

    def merge(self, doc: dict[str, Any]) -> None:
        for mid, lateness in doc["late"].items():
            if mid in self.late:
                self.duplicates += 1
            else:
                self.late[mid] = lateness
        self.duplicates += doc["duplicates"]
        self.early += doc["early"]
        self.cpu_s += doc.get("cpu_s", 0.0)


async def consume_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Body of a consumer process: one connection and queue per topic (each topic's consumers
    would have their own), records (arrival - due) per message id until ``expected``
    messages arrived or ``deadline`` (epoch s) passed.

    The consumers run on the project's own data path (:mod:`bridge.amqp`, no-ack, prefetch
    2,000): the cheapest AMQP client here, so that on a machine of two cores the measuring
    apparatus takes as little CPU from the broker and the worker as it can (aio-pika cost
    about three times as much per message). Declarations go through aio-pika."""
    from bridge.amqp.consumer import Consumer
    from bridge.amqp.frames import Delivery
    from bridge.amqp.link import Link

    late: dict[str, float] = {}
    counts = {"duplicates": 0, "early": 0}
    done = asyncio.Event()
    expected = spec["expected"]

    def on_message(message: Delivery) -> None:
        arrived = time.time() * 1000
        due = (message.properties.headers or {}).get("bench-due")
        mid = message.properties.message_id or ""
        if mid in late:
            counts["duplicates"] += 1
        elif isinstance(due, int):
            lateness = arrived - due
            if lateness < -1:  # allow for the 1 ms resolution of due times
                counts["early"] += 1
            late[mid] = round(lateness, 3)
            if len(late) >= expected:
                done.set()

    declare = await aio_pika.connect(spec["url"])
    channel = await declare.channel()
    for queue_name, exchange in spec["queues"]:
        queue = await channel.declare_queue(queue_name, durable=True)
        ex = await channel.declare_exchange(exchange, "topic", durable=True)
        await queue.bind(ex, "#")
    await declare.close()
    links = []
    for queue_name, _ in spec["queues"]:
        link = Link(spec["url"], name=f"bench consumer {queue_name}")
        Consumer(link, queue_name, on_message, prefetch=2000, no_ack=True)
        await link.start()
        links.append(link)
    # start() returns once every channel is set up: the consumers consume
    assert all(link.ready for link in links), [link.not_ready() for link in links]
    print("ready", flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), max(0.0, spec["deadline"] - time.time()))
    # Stay quiet until the other groups' messages are all due: closing the connections and
    # writing tens of thousands of results right when this group is done would take the
    # CPU from the broker while it delivers the others' (on two cores, or one when pinned).
    quiet = spec.get("report_after", 0.0) - time.time()
    if quiet > 0:
        await asyncio.sleep(quiet)
    for link in links:
        await link.close()
    return {"late": late, **counts, "cpu_s": time.process_time()}


class ConsumerGroup:
    """Consumers of some target topics in a process of their own.

    A topic's consumers are an application of their own: in the isolation part the hot
    topic's consumer must not share an interpreter (and its event loop) with the cold
    topics' consumers, or the measurement would include the time the cold messages wait
    behind the hot ones inside this benchmark.
    """

    def __init__(self, queues: list[tuple[str, str]], expected: int) -> None:
        self.queues = queues
        self.expected = expected
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, deadline: float, report_after: float = 0.0) -> None:
        """``deadline`` (epoch s): stop waiting for the expected messages then.
        ``report_after`` (epoch s): once done, report no sooner (see
        :func:`consume_child`): when the topics of other groups are still due."""
        spec = {"url": broker_url(), "queues": self.queues, "expected": self.expected}
        spec["deadline"] = deadline
        spec["report_after"] = report_after
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.delay.traffic",
            json.dumps(spec),
            stdout=asyncio.subprocess.PIPE,
            limit=2**28,
            cwd=REPO,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 120)
        if line.strip() != b"ready":
            raise RuntimeError(f"consumer process failed to start: {line!r}")

    async def result(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        out = await self.proc.stdout.read()
        await self.proc.wait()
        return dict(json.loads(out))

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


def consumer_main() -> None:
    """``python -m bench.delay.traffic SPEC``: the body of one :class:`ConsumerGroup` process."""
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    # measuring apparatus: full garbage collections would add their pauses to the lateness
    gc.freeze()
    gc.set_threshold(700, 10, 1000)
    json.dump(asyncio.run(consume_child(json.loads(sys.argv[1]))), sys.stdout)


if __name__ == "__main__":
    consumer_main()
