"""``hotcold``: the scenario of issue 16, the worker against the delayed-message plugin in the
same run, in two placements.

50,000 messages due at one instant on a hot topic, 10 cold topics with one message due every
20 ms from 1 s before that instant to 10 s after it. Reported: cold-topic lateness end to
end (consumer arrival minus due time), of all cold messages and of those due while the burst
was sent, and the burst's drain time; the worker's and the broker's CPU seconds per message
over the due phase (from /proc).

- ``worker``: ``rabbitmq-bridge run delay`` (defaults: 8 lanes, batch 500); messages carry
  ``x-deliver-at`` and ``x-target-exchange`` (the topic);
- ``plugin``: one ``x-delayed-message`` exchange (``x-delayed-type`` direct) bound to each
  topic's exchange by the topic's name; messages carry ``x-delay`` = due time minus the
  moment of their publish. Skipped, saying so, when the broker has no such exchange type.

Placements: ``shared`` (nothing pinned: worker, broker and load generator share the cores)
and ``worker_own_core`` (``taskset``: the worker's process on the last CPU, the broker, this
process and the consumer processes on the others; the plugin variant gets the same pinning,
its last CPU idle). The broker must be a local node this user may pin (its pid comes from
``rabbitmqctl``); affinities are restored at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika

from bench.delay.isolation import burst_report
from bench.delay.lateness import run_schedule
from bench.delay.traffic import Arrivals, ConsumerGroup
from bench.delay.worker import NoiseProbe, broker_pid, cpu_pressure, now_ms
from bench.harness.broker import delete_names
from bench.harness.cpu import cpu_seconds, process_tree
from bench.harness.report import broker_url, progress

PLACEMENTS = ("shared", "worker_own_core")


def _cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pin(pid: int, cpus: list[int]) -> None:
    """Every thread of ``pid`` (and of its child processes) onto ``cpus``."""
    for p in process_tree(pid):
        subprocess.run(
            ["taskset", "-a", "-p", "-c", ",".join(map(str, cpus)), str(p)],
            check=True,
            capture_output=True,
        )


@contextlib.contextmanager
def placement(name: str) -> Iterator[list[int] | None]:
    """Pins the broker and this process (and so the consumers it starts) away from the last
    CPU for ``worker_own_core``; yields the worker's CPUs (None: not pinned)."""
    if name == "shared":
        yield None
        return
    cpus = _cpus()
    broker = broker_pid()
    if len(cpus) < 2 or broker is None:
        raise RuntimeError("worker_own_core needs 2 CPUs and the local broker's pid")
    port = urlsplit(broker_url()).port or 5672
    listening = subprocess.run(
        ["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, check=False
    ).stdout
    if f"pid={broker}," not in listening:  # never pin another node than the one measured
        raise RuntimeError(
            f"the broker pid {broker} (from rabbitmqctl) does not listen on port {port}: "
            "set TEST_BROKER_RABBITMQCTL to the CLI of the node at BRIDGE_AMQP_URL"
        )
    others, own = cpus[:-1], cpus[-1:]
    pin(broker, others)
    pin(os.getpid(), others)
    try:
        yield own
    finally:
        pin(broker, cpus)
        pin(os.getpid(), cpus)


def schedule_of(hot: int, span_ms: int) -> list[tuple[str, int]]:
    schedule: list[tuple[str, int]] = [("hot", 1000)] * hot
    for c in range(10):
        schedule += [(f"cold{c}", offset + c) for offset in range(0, span_ms + 1000, 20)]
    return schedule


async def plugin_available() -> bool:
    conn = await aio_pika.connect(broker_url())
    try:
        channel = await conn.channel()
        name = f"bench-probe-{uuid.uuid4().hex[:6]}"
        await channel.declare_exchange(
            name, "x-delayed-message", auto_delete=True, arguments={"x-delayed-type": "direct"}
        )
        await channel.exchange_delete(name)
        return True
    except Exception:
        return False
    finally:
        if not conn.is_closed:
            await conn.close()


async def run_plugin(tag: str, schedule: list[tuple[str, int]], lead_ms: int) -> dict[str, Any]:
    topics = sorted({t for t, _ in schedule})
    per_topic = {t: sum(1 for s, _ in schedule if s == t) for t in topics}
    groups = [["hot"], [f"cold{c}" for c in range(10)]]
    consumers = [
        ConsumerGroup([(f"{tag}.{t}.q", f"{tag}.{t}") for t in g], sum(per_topic[t] for t in g))
        for g in groups
    ]
    conn = await aio_pika.connect_robust(broker_url())
    plugin = f"{tag}.plugin"
    arrivals = Arrivals()
    try:
        channel = await conn.channel(publisher_confirms=True)
        start = now_ms() + lead_ms
        last_due = start + max(o for _, o in schedule)
        for group in consumers:
            await group.start(deadline=last_due / 1000 + 120, report_after=last_due / 1000 + 1)
        ex = await channel.declare_exchange(
            plugin, "x-delayed-message", durable=True, arguments={"x-delayed-type": "direct"}
        )
        for t in topics:
            target = await channel.get_exchange(f"{tag}.{t}")
            await target.bind(ex, routing_key=t)
        slots = asyncio.Semaphore(500)
        body = b"x" * 100

        async def one(i: int, topic: str, offset: int) -> None:
            due = start + offset
            async with slots:
                await ex.publish(
                    aio_pika.Message(
                        body,
                        headers={"x-delay": due - now_ms(), "bench-due": due},
                        message_id=f"{topic}-{i}",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=topic,
                )

        await asyncio.gather(*(one(i, t, o) for i, (t, o) in enumerate(schedule)))
        slack = start - now_ms()
        progress(f"  {len(schedule)} held by the plugin {slack} ms before the first falls due")
        if slack < 0:
            raise RuntimeError("the schedule was not published before it fell due; raise lead_ms")
        await asyncio.sleep(max(0.0, (start - now_ms()) / 1000 - 0.2))
        probe = NoiseProbe((last_due - now_ms()) / 1000)
        broker = broker_pid()
        b0, t0 = (cpu_seconds(broker) if broker else 0.0), time.perf_counter()
        for group in consumers:
            arrivals.merge(await group.result())
        elapsed = time.perf_counter() - t0
        return {
            "arrivals": arrivals,
            "machine_noise_10ms_sleep_oversleep": probe.result(),
            "cpu_pressure_some_avg60_pct": cpu_pressure(),
            "broker_cpu_cores": round((cpu_seconds(broker) - b0) / elapsed, 2) if broker else None,
            "broker_cpu_us_per_message": (
                round((cpu_seconds(broker) - b0) * 1e6 / len(schedule), 1) if broker else None
            ),
            "delivered": len(arrivals.late),
            "expected": len(schedule),
            "duplicates": arrivals.duplicates,
            "early": arrivals.early,
        }
    finally:
        for group in consumers:
            group.kill()
        await conn.close()
        await delete_names(
            broker_url(),
            [plugin, *(f"{tag}.{t}" for t in topics)],
            [f"{tag}.{t}.q" for t in topics],
        )


async def bench_hotcold(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    hot = 10_000 if args.quick else 50_000
    span_ms = 4_000 if args.quick else 10_000
    schedule = schedule_of(hot, span_ms)
    # time to store the schedule before it falls due: the worker stores >= 500 msg/s on this
    # busy machine, the plugin (one mnesia write per message through one Erlang process)
    # took up to 2.5 ms per message here (400 msg/s at a load average of 11)
    lead_ms = {"worker": 2 * len(schedule) + 5000, "plugin": 3 * len(schedule) + 10_000}
    has_plugin = await plugin_available()
    out: dict[str, Any] = {
        "hot_messages_due_at_once": hot,
        "cold_topics": 10,
        "cold_interval_ms": 20,
        "cold_window_ms": [-1000, span_ms],
        "cpus": _cpus(),
        "plugin": "x-delayed-message" if has_plugin else "not installed on this broker: skipped",
    }
    for where in PLACEMENTS:
        out[where] = {}
        for variant in ("worker", "plugin") if has_plugin else ("worker",):
            progress(f"hotcold: {hot} hot due at once + 10 cold topics, {variant}, {where}")
            tag = f"bh-{uuid.uuid4().hex[:6]}"
            with placement(where) as worker_cpus:
                if variant == "plugin":
                    r = await run_plugin(tag, schedule, lead_ms["plugin"])
                else:
                    r = await run_schedule(
                        tag=tag,
                        state=tmp / tag,
                        lanes=8,
                        schedule=schedule,
                        lead_ms=lead_ms["worker"],
                        settle_s=120,
                        groups=[["hot"], [f"cold{c}" for c in range(10)]],
                        on_started=(lambda pid: pin(pid, worker_cpus)) if worker_cpus else None,
                    )
            out[where][variant] = {**burst_report(r.pop("arrivals"), schedule), **r}
        if has_plugin:
            mine = out[where]["worker"]["cold"]["p99_ms"]
            theirs = out[where]["plugin"]["cold"]["p99_ms"]
            out[where]["cold_p99_worker_better_than_plugin_x"] = (
                round(theirs / mine, 1) if mine and theirs else None
            )
    shared = out["shared"]["worker"]["cold"]["p99_ms"]
    own = out["worker_own_core"]["worker"]["cold"]["p99_ms"]
    out["goals"] = {"shared_cold_p99_ms_below": 100, "shared_vs_plugin_at_least_x": 3}
    out["goals"]["own_core_cold_p99_ms_below"] = 50
    out["goals_met"] = {
        "shared_cold_p99": shared is not None and shared < 100,
        "shared_vs_plugin": (out["shared"].get("cold_p99_worker_better_than_plugin_x") or 0) >= 3,
        "own_core_cold_p99": own is not None and own < 50,
    }
    return out
