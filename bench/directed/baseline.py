"""Baseline: one quorum queue per target behind a fanout exchange, one message published once:
broker memory and disk growth, and time until every queue has it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

import aio_pika

from bench.directed.worker import ms
from bench.harness.broker import broker_info_cached, broker_memory, disk_blocks_bytes, du_bytes
from bench.harness.report import broker_url, progress, unique
from bench.harness.stats import median, rnd


async def _in_parallel(conn: Any, items: list[str], fn: Any, channels: int = 16) -> list[Any]:
    """Run ``fn(channel, item)`` over items, one channel per slice (AMQP RPCs are serial)."""
    out: list[Any] = [None] * len(items)

    async def lane(k: int) -> None:
        channel = await conn.channel(publisher_confirms=False)
        for i in range(k, len(items), channels):
            out[i] = await fn(channel, items[i])
        await channel.close()

    await asyncio.gather(*(lane(k) for k in range(min(channels, len(items)))))
    return out


async def bench_baseline(args: argparse.Namespace) -> dict[str, Any]:
    info = broker_info_cached()
    if not info:
        return {"skipped": "rabbitmqctl not available; broker-side figures need a local broker"}
    data_dir = Path(info["data_dir"])
    quorum_dir = data_dir / "quorum"
    token = unique("bench-baseline")
    n = args.baseline_targets
    queues = [f"{token}.q{i:05d}" for i in range(n)]
    exchange = f"{token}.fanout"
    body = os.urandom(args.body_bytes)

    def ra_dirs() -> set[Path]:
        return {p for p in quorum_dir.glob("*/*") if p.is_dir()}

    ours: set[Path] = set()

    def measure() -> dict[str, Any]:
        mem = broker_memory(info["pid"])
        wal = list(quorum_dir.glob("*/*.wal"))
        return {
            **mem,
            # The Ra WAL (shared by every quorum queue of the node) plus our queues' own
            # directories; other queues' directories are left out to cut the noise.
            "disk_bytes": du_bytes([*wal, *ours]),
            "data_dir_bytes": du_bytes([data_dir]),
            "data_dir_blocks_bytes": disk_blocks_bytes([data_dir]),
        }

    conn = await aio_pika.connect(broker_url())
    out: dict[str, Any] = {"targets": n, "queue_type": "quorum", "body_bytes": args.body_bytes}
    try:
        dirs0 = await asyncio.to_thread(ra_dirs)
        m0 = await asyncio.to_thread(measure)
        channel = await conn.channel(publisher_confirms=True)
        ex = await channel.declare_exchange(exchange, "fanout", durable=True)

        async def declare(ch: Any, name: str) -> None:
            q = await ch.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
            await q.bind(exchange, "")

        t0 = time.perf_counter()
        await _in_parallel(conn, queues, declare)
        out["declare_seconds"] = rnd(time.perf_counter() - t0, 2)
        progress(f"baseline: {n} quorum queues declared in {out['declare_seconds']} s")
        m1 = await asyncio.to_thread(measure)
        ours.update(await asyncio.to_thread(ra_dirs) - dirs0)
        out["queue_dirs_found"] = len(ours)
        out["queue_dirs_bytes_per_queue"] = rnd(du_bytes(ours) / max(len(ours), 1))

        async def count(ch: Any, name: str) -> int:
            q = await ch.declare_queue(name, passive=True)
            return int(q.declaration_result.message_count or 0)

        runs = []
        prev = m1
        for i in range(1, args.baseline_messages + 1):
            t0 = time.perf_counter()
            await ex.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key="",
            )
            t_confirm = time.perf_counter() - t0
            sweeps = []
            while True:
                s0 = time.perf_counter()
                counts = await _in_parallel(conn, queues, count)
                sweeps.append(time.perf_counter() - s0)
                if min(counts) >= i:
                    break
            t_all = time.perf_counter() - t0
            m = await asyncio.to_thread(measure)
            run = {
                "publish_confirm_ms": ms(t_confirm),
                "all_queues_have_it_ms": ms(t_all),
                "count_sweeps": len(sweeps),
                "count_sweep_ms": ms(median(sweeps)),
                "memory_erlang_bytes_per_target": rnd(
                    (m["erlang_total"] - prev["erlang_total"]) / n
                ),
                "memory_rss_bytes_per_target": rnd((m["rss"] - prev["rss"]) / n),
                "disk_bytes_per_target": rnd((m["disk_bytes"] - prev["disk_bytes"]) / n),
            }
            runs.append(run)
            progress(f"baseline message {i}: {run}")
            prev = m
        out.update(
            {
                "queue_memory_erlang_bytes_per_target": rnd(
                    (m1["erlang_total"] - m0["erlang_total"]) / n
                ),
                "queue_memory_rss_bytes_per_target": rnd((m1["rss"] - m0["rss"]) / n),
                "queue_disk_bytes_per_target": rnd((m1["disk_bytes"] - m0["disk_bytes"]) / n),
                "publish_confirm_ms_median": rnd(median(r["publish_confirm_ms"] for r in runs)),
                "all_queues_have_it_ms_median": rnd(
                    median(r["all_queues_have_it_ms"] for r in runs)
                ),
                "message_memory_erlang_bytes_per_target_median": rnd(
                    median(r["memory_erlang_bytes_per_target"] for r in runs)
                ),
                "message_disk_bytes_per_target_median": rnd(
                    median(r["disk_bytes_per_target"] for r in runs)
                ),
                "message_disk_bytes_per_target_min": rnd(
                    min(r["disk_bytes_per_target"] for r in runs)
                ),
                "messages": runs,
                "memory_before": m0,
                "memory_after_declare": m1,
                "notes": [
                    f"{n} quorum queues, not 10,000: 10,000 quorum queues (one Ra server "
                    "each) are too heavy for a 2-core machine shared with other work",
                    "memory: erlang:memory(total) after a full GC of every process, so "
                    "other traffic on the broker adds noise; rss is the OS view",
                    "disk: apparent size of the node's Ra WAL plus the directories of these "
                    "queues (data_dir_bytes: the whole data directory); the WAL is shared by "
                    "all quorum queues of the node, so other traffic only adds to it: the "
                    "min over messages is the least noisy figure",
                    "all_queues_have_it_ms: publish until passive declares of every queue "
                    "report the message; its granularity is one sweep over all queues "
                    "(count_sweep_ms); publish_confirm_ms is when the broker confirmed it, "
                    "which for a fanout to quorum queues means every queue committed it",
                ],
            }
        )
    finally:
        progress(f"baseline: deleting {n} queues")
        with contextlib.suppress(Exception):
            await _in_parallel(conn, queues, lambda ch, name: ch.queue_delete(name))
        with contextlib.suppress(Exception):
            ch = await conn.channel()
            await ch.exchange_delete(exchange)
        await conn.close()
    return out
