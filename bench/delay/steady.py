"""``steady``: ingest and delivery at once at a fixed rate, worker CPU per message and lateness end
to end; with ``--against TREE`` the same rounds with that checkout's worker, interleaved. Each
round also runs the ``floor``: the same publisher and consumers with no worker between them
(published straight to the target exchanges, due at once), which is what the machine and the
broker add to the end-to-end lateness on their own."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.delay.scale import bulk_store
from bench.delay.traffic import Arrivals, ConsumerGroup, bench_publisher
from bench.delay.worker import Worker, delete_worker_names, now_ms, summary
from bench.harness.broker import broker_info_cached, delete_names
from bench.harness.cpu import CpuWatch
from bench.harness.report import broker_url, progress
from bridge.amqp.frames import Properties


async def steady_round(
    args: argparse.Namespace, tmp: Path, tree: Path | None, rate: int, seconds: float
) -> dict[str, Any]:
    """Publish at ``rate``/s for ``seconds`` with ``x-delay`` 1 s over 10 topics while the
    earlier ones fall due: ingest and delivery at the same time, the consumers in a process
    of their own. Worker CPU (from /proc, lanes included) per message, lateness end to end."""
    delay_ms = 1000
    topics = [f"t{i}" for i in range(10)]
    tag = f"bs-{uuid.uuid4().hex[:6]}"
    stored: dict[str, Any] = {}
    if args.stored:
        # Written before the worker starts, due from 2 h ahead over 2 h: beyond the window,
        # so they only weigh on the store (its indexes, its page cache) while the round runs.
        (tmp / tag / "delay").mkdir(parents=True)
        path = tmp / tag / "delay" / "delay.sqlite3"
        bulk_s = bulk_store(
            path,
            args.stored,
            first_due=now_ms() + 7_200_000,
            spread_ms=7_200_000,
            uuid_ids=args.message_ids == "uuid",
        )
        stored = {"stored_before": args.stored, "bulk_insert_s": round(bulk_s, 1)}
    parts = tmp / f"{tag}.parts.json" if args.parts and tree is None else None
    worker = Worker(tag, tmp / tag, tree=tree, parts=parts).start()
    n = int(rate * seconds)
    group = ConsumerGroup([(f"{tag}.{t}.q", f"{tag}.{t}") for t in topics], n)
    try:
        await group.start(deadline=time.time() + seconds + 60)
        async with bench_publisher(1000) as publisher:
            in_exchange = worker.names["in_exchange"]

            def one(i: int) -> asyncio.Future[None]:
                headers = {
                    "x-delay": delay_ms,
                    "x-target-exchange": f"{tag}.{topics[i % 10]}",
                    "bench-due": now_ms() + delay_ms,
                }
                return publisher.publish(
                    in_exchange, "bench", BODY, _properties(i, headers, args.message_ids)
                )

            watch = _watch(group)
            cpu0, t0 = worker.cpu_seconds(), time.perf_counter()
            publish_s = await _publish_at(rate, n, one)
            arrivals = Arrivals()
            arrivals.merge(await group.result())
            wall = time.perf_counter() - t0
            machine = watch.stop()
            cpu = worker.cpu_seconds() - cpu0
            late = list(arrivals.late.values())
            result = {
                "tree": str(tree) if tree else "this checkout",
                **stored,
                "published_per_s": round(n / publish_s, 1),
                "delivered": len(late),
                "expected": n,
                "duplicates": arrivals.duplicates,
                "early": arrivals.early,
                "end_to_end": summary(late),
                "worker_view": worker.lateness_from_histogram(),
                "worker_cpu_cores": round(cpu / wall, 3),
                "worker_cpu_us_per_message": round(cpu / max(len(late), 1) * 1e6, 1),
                "others": {**machine, "consumers_cores": round(arrivals.cpu_s / wall, 3)},
            }
    finally:
        group.kill()
        worker.stop()
        await delete_worker_names(worker, topics)
    if parts is not None:  # written by the worker as it stopped
        result["parts"] = json.loads(parts.read_text()) if parts.exists() else None
    return result


def _watch(group: ConsumerGroup) -> CpuWatch:
    """This process's CPU (the publisher) and the broker's, beside the worker's: on two
    cores they all compete. The consumer process reports its own (it has ended, and been
    reaped, before the watch stops)."""
    pids = {"publisher": os.getpid()}
    info = broker_info_cached()
    if info:
        pids["broker"] = info["pid"]
    return CpuWatch(pids, no_runqueue=("broker",)).start()


BODY = b"x" * 100


def _properties(i: int, headers: dict[str, Any], ids: str = "counter") -> Properties:
    """``ids``: ``counter`` (0, 1, 2...: the store's message_id index grows at one end and
    shrinks at the other) or ``uuid`` (random, as most producers send them: every insert
    and delete lands on another page of that index)."""
    message_id = uuid.uuid4().hex if ids == "uuid" else f"{i}"
    return Properties(headers=headers, message_id=message_id, delivery_mode=2)


async def _publish_at(rate: int, n: int, one: Callable[[int], asyncio.Future[None]]) -> float:
    """``one(i)`` for i < n at ``rate``/s (a tick of 10 ms; the publisher keeps at most
    1,000 unconfirmed); returns the seconds the publishing took (all confirmed). The
    publisher is the project's own (:mod:`bridge.amqp`): on two cores the load generator
    should take as little CPU from the broker and the worker as it can."""
    pending: list[asyncio.Future[None]] = []
    t0 = time.perf_counter()
    per_tick = max(1, round(rate * 0.01))
    i = 0
    while i < n:
        wait = t0 + (i / rate) - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        for _ in range(min(per_tick, n - i)):
            pending.append(one(i))
            i += 1
    publish_s = time.perf_counter() - t0
    await asyncio.gather(*pending)
    return publish_s


async def floor_round(rate: int, seconds: float) -> dict[str, Any]:
    """The same publisher and consumer process as :func:`steady_round` with no worker
    between them: published straight to the 10 target exchanges, due at once. Its
    lateness is what the machine and the broker add on their own."""
    topics = [f"t{i}" for i in range(10)]
    tag = f"bf-{uuid.uuid4().hex[:6]}"
    n = int(rate * seconds)
    group = ConsumerGroup([(f"{tag}.{t}.q", f"{tag}.{t}") for t in topics], n)
    try:
        await group.start(deadline=time.time() + seconds + 60)  # declares the topics
        async with bench_publisher(1000) as publisher:

            def one(i: int) -> asyncio.Future[None]:
                headers = {"bench-due": now_ms()}
                return publisher.publish(
                    f"{tag}.{topics[i % 10]}", "bench", BODY, _properties(i, headers)
                )

            watch = _watch(group)
            t0 = time.perf_counter()
            publish_s = await _publish_at(rate, n, one)
            arrivals = Arrivals()
            arrivals.merge(await group.result())
            late = list(arrivals.late.values())
            return {
                "published_per_s": round(n / publish_s, 1),
                "delivered": len(late),
                "expected": n,
                "end_to_end": summary(late),
                "others": {
                    **watch.stop(),
                    "consumers_cores": round(arrivals.cpu_s / (time.perf_counter() - t0), 3),
                },
            }
    finally:
        group.kill()
        await delete_names(
            broker_url(), [f"{tag}.{t}" for t in topics], [f"{tag}.{t}.q" for t in topics]
        )


async def bench_steady(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The issue's steady state: 2,000 msg/s published and delivered at once; with
    ``--against TREE`` the same rounds with that checkout's worker, interleaved."""
    rate = 2000
    seconds = 5.0 if args.quick else 20.0
    rounds: dict[str, list[dict[str, Any]]] = {"worker": [], "against": []}
    floor: list[dict[str, Any]] = []
    for r in range(args.rounds):
        progress(f"steady round {r}: floor, {rate}/s for {seconds:g} s, no worker")
        floor.append(await floor_round(rate, seconds))
        progress(
            f"  floor p99 {floor[-1]['end_to_end']['p99_ms']} ms, "
            f"delivered {floor[-1]['delivered']}/{floor[-1]['expected']}"
        )
        if args.side_by_side and args.against is not None:
            # Both checkouts at once, each with its own publisher, consumers and rate: the
            # machine's speed, which drifts by +-15 % between rounds, is the same for both.
            progress(f"steady round {r}: {rate}/s each for {seconds:g} s, side by side")
            both = await asyncio.gather(
                steady_round(args, tmp, None, rate, seconds),
                steady_round(args, tmp, args.against, rate, seconds),
            )
            for name, res in zip(("worker", "against"), both, strict=True):
                rounds[name].append(res)
                _report_round(name, res)
            continue
        for name, tree in (("worker", None), ("against", args.against)):
            if name == "against" and tree is None:
                continue
            progress(f"steady round {r}: {rate}/s for {seconds:g} s, x-delay 1 s, {name}")
            rounds[name].append(await steady_round(args, tmp, tree, rate, seconds))
            _report_round(name, rounds[name][-1])
    out: dict[str, Any] = {
        "rate_per_s": rate,
        "side_by_side": bool(args.side_by_side and args.against is not None),
        "message_ids": args.message_ids,
        "stored_before_each_round": args.stored,
        "publish_seconds": seconds,
        "rounds": rounds,
        "floor": floor,
        "floor_median_p99_ms": statistics.median(x["end_to_end"]["p99_ms"] or 0 for x in floor)
        if floor
        else None,
        "goal_worker_cpu_us_per_message_at_most": 120,
        "goal_p99_ms_below": 50,
    }
    for name, rs in rounds.items():
        if rs:
            out[f"{name}_median"] = {
                "worker_cpu_us_per_message": statistics.median(
                    x["worker_cpu_us_per_message"] for x in rs
                ),
                "p99_ms": statistics.median(x["end_to_end"]["p99_ms"] or 0 for x in rs),
            }
    if rounds["against"]:
        out["ratio_cpu_per_message_median"] = round(
            statistics.median(
                a["worker_cpu_us_per_message"] / b["worker_cpu_us_per_message"]
                for a, b in zip(rounds["worker"], rounds["against"], strict=True)
            ),
            2,
        )
    return out


def _report_round(name: str, res: dict[str, Any]) -> None:
    progress(
        f"  {name}: cpu {res['worker_cpu_us_per_message']} us/msg, p99 "
        f"{res['end_to_end']['p99_ms']} ms, delivered {res['delivered']}/{res['expected']}"
    )
