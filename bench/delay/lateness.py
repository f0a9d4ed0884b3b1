"""``lateness``: arrival minus due time for messages falling due at a sustained rate over 10
topics, 8 lanes vs. 1 (and the schedule runner ``isolation`` shares)."""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.delay.traffic import Arrivals, ConsumerGroup, bench_publisher, publish_all
from bench.delay.worker import (
    NoiseProbe,
    Worker,
    broker_pid,
    cpu_pressure,
    delete_worker_names,
    now_ms,
    stored,
    summary,
)
from bench.harness.cpu import cpu_seconds
from bench.harness.report import progress


async def run_schedule(
    *,
    tag: str,
    state: Path,
    lanes: int,
    schedule: list[tuple[str, int]],  # (topic suffix, due ms offset from the start)
    lead_ms: int,
    settle_s: float,
    groups: list[list[str]] | None = None,
    headers: Callable[[str], dict[str, Any]] | None = None,
    on_started: Callable[[int], None] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Store ``schedule`` in a fresh worker, let it fall due, and measure arrivals.

    ``groups`` splits the topics over consumer processes (default: one process for all);
    ``headers`` adds headers to each message of a topic (suffix); ``on_started`` gets the
    worker's pid once it is ready (to pin it).
    """
    worker = Worker(tag, state, lanes=lanes, **settings).start()
    if on_started is not None:
        on_started(worker.pid)
    topics = sorted({t for t, _ in schedule})
    per_topic: dict[str, int] = {}
    for topic, _ in schedule:
        per_topic[topic] = per_topic.get(topic, 0) + 1
    consumers = [
        ConsumerGroup(
            [(f"{tag}.{t}.q", f"{tag}.{t}") for t in group], sum(per_topic[t] for t in group)
        )
        for group in (groups or [topics])
    ]
    arrivals = Arrivals()
    try:
        start = now_ms() + lead_ms
        last_due = start + max(o for _, o in schedule)
        for group in consumers:
            await group.start(deadline=last_due / 1000 + settle_s, report_after=last_due / 1000 + 1)
        messages = []
        for i, (topic, offset) in enumerate(schedule):
            due = start + offset
            extra = headers(topic) if headers is not None else {}
            messages.append(
                (
                    {
                        "x-deliver-at": due,
                        "x-target-exchange": f"{tag}.{topic}",
                        "bench-due": due,
                        **extra,
                    },
                    f"{topic}-{i}",
                )
            )
        async with bench_publisher(500) as publisher:
            await publish_all(publisher, worker.names["in_exchange"], messages)
        await stored(worker, len(messages), 600)
        slack = start - now_ms()
        progress(f"  {len(messages)} stored {slack} ms before the first falls due")
        if slack < 0:
            raise RuntimeError("the schedule was not stored before it fell due; raise lead_ms")
        await asyncio.sleep(max(0.0, (start - now_ms()) / 1000 - 0.2))
        probe = NoiseProbe((last_due - now_ms()) / 1000)
        cpu0 = worker.cpu_seconds()
        broker = broker_pid()
        b0 = cpu_seconds(broker) if broker else 0.0
        t0 = time.perf_counter()
        for group in consumers:
            arrivals.merge(await group.result())
        worker_s = worker.cpu_seconds() - cpu0
        broker_s = cpu_seconds(broker) - b0 if broker else None
        cpu = worker_s / (time.perf_counter() - t0)
        busy = worker.process.metrics().get("bridge_delay_lane_busy_seconds_total", {})
        return {
            "lanes_that_sent": sum(1 for seconds in busy.values() if seconds > 0),
            "consumer_processes": [len(g) for g in (groups or [topics])],
            "machine_noise_10ms_sleep_oversleep": probe.result(),
            "cpu_pressure_some_avg60_pct": cpu_pressure(),
            "arrivals": arrivals,
            "worker_view": worker.lateness_from_histogram(),
            # per consumer group (hot and cold): the worker's part of each group's lateness
            "worker_view_by_group": {
                ",".join(g): worker.lateness_from_histogram(f"{tag}.{t}" for t in g)
                for g in (groups or [topics])
            },
            "worker_cpu_cores": round(cpu, 2),
            "worker_cpu_us_per_message": round(worker_s * 1e6 / len(messages), 1),
            "broker_cpu_us_per_message": (
                round(broker_s * 1e6 / len(messages), 1) if broker_s is not None else None
            ),
            **worker.memory(),
            "delivered": len(arrivals.late),
            "expected": len(messages),
            "duplicates": arrivals.duplicates,
            "early": arrivals.early,
        }
    finally:
        for group in consumers:
            group.kill()
        worker.stop()
        await delete_worker_names(worker, topics)


async def bench_lateness(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    rate = 2000
    seconds = 5 if args.quick else 20
    n = rate * seconds
    schedule = [(f"t{i % 10}", i * 1000 // rate) for i in range(n)]
    out: dict[str, Any] = {"due_rate_per_s": rate, "duration_s": seconds, "topics": 10}
    for lanes in (8, 1):
        progress(f"lateness: {n} messages due at {rate}/s over 10 topics, {lanes} lane(s)")
        tag = f"bl{lanes}-{uuid.uuid4().hex[:6]}"
        r = await run_schedule(
            tag=tag,
            state=tmp / tag,
            lanes=lanes,
            schedule=schedule,
            lead_ms=int(n / 2.5) + 3000,
            settle_s=30,
        )
        late = list(r.pop("arrivals").late.values())
        out[f"lanes_{lanes}"] = {"end_to_end": summary(late), **r}
    out["goal_p99_ms_below"] = 50
    return out
