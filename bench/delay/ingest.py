"""``ingest``: messages/s stored by the worker vs. a plain confirmed publish of the same messages."""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika

from bench.delay.traffic import bench_publisher, publish_all
from bench.delay.worker import Worker, broker_pid, now_ms, stored
from bench.harness.broker import delete_names
from bench.harness.cpu import cpu_seconds
from bench.harness.report import broker_url, progress


async def bench_ingest(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    n = 5_000 if args.quick else 30_000
    tag = f"bd-{uuid.uuid4().hex[:6]}"
    conn = await aio_pika.connect_robust(broker_url())  # topology only
    out: dict[str, Any] = {"messages": n, "publish_window": 500, "body_bytes": 100}
    try:
        channel = await conn.channel()
        far = now_ms() + 3_600_000
        messages = [
            ({"x-deliver-at": far, "x-target-exchange": f"{tag}.t", "bench-due": far}, f"m{i}")
            for i in range(n)
        ]
        baseline_rates, worker_rates = [], []
        broker = broker_pid()
        me = os.getpid()
        # CPU per stored message of each process on the two paths (microseconds): what the
        # worker's path adds beyond the plain loop, when the machine is the limit.
        cpu_us: dict[str, dict[str, list[float]]] = {"plain": {}, "worker": {}}

        def charge(path: str, name: str, seconds: float) -> None:
            cpu_us[path].setdefault(name, []).append(round(seconds * 1e6 / n, 0))

        for round_ in range(args.rounds):
            # The baseline publishes the very messages the worker gets (headers, body,
            # ids, persistent) the same way, through a topic exchange bound '#' to a quorum
            # queue, i.e. delay.in's topology with nobody consuming: the ratio is then what
            # the worker's consuming, storing and acknowledging cost, nothing else.
            q = f"{tag}.plain{round_}"
            plain = await channel.declare_exchange(q, "topic", durable=True)
            queue = await channel.declare_queue(
                q, durable=True, arguments={"x-queue-type": "quorum"}
            )
            await queue.bind(plain, "#")
            progress(f"ingest: plain confirmed publish into a quorum queue, round {round_ + 1}")
            b0, p0 = (cpu_seconds(broker) if broker else 0.0), cpu_seconds(me)
            async with bench_publisher(500) as publisher:
                baseline_rates.append(round(await publish_all(publisher, q, messages), 0))
            charge("plain", "producer", cpu_seconds(me) - p0)
            if broker:
                charge("plain", "broker", cpu_seconds(broker) - b0)
            await delete_names(broker_url(), [q], [q])

            worker = Worker(f"{tag}.w{round_}", tmp / f"ingest{round_}", lanes=8).start()
            try:
                progress(f"ingest: through the worker, round {round_ + 1}")
                cpu0 = worker.cpu_seconds()
                b0, p0 = (cpu_seconds(broker) if broker else 0.0), cpu_seconds(me)
                started = time.perf_counter()
                async with bench_publisher(500) as publisher:
                    publish_rate = await publish_all(
                        publisher, worker.names["in_exchange"], messages
                    )
                done = await stored(worker, n, 300)
                elapsed = done - started
                charge("worker", "producer", cpu_seconds(me) - p0)
                if broker:
                    charge("worker", "broker", cpu_seconds(broker) - b0)
                charge("worker", "worker", worker.cpu_seconds() - cpu0)
                worker_rates.append(round(n / elapsed, 0))
                out.setdefault("worker_publish_side_msgs_per_s", []).append(round(publish_rate, 0))
                out.setdefault("worker_cpu_cores", []).append(
                    round((worker.cpu_seconds() - cpu0) / elapsed, 2)
                )
            finally:
                worker.stop()
                await delete_names(
                    broker_url(),
                    [
                        worker.names["in_exchange"],
                        worker.names["dead_exchange"],
                        worker.names["control_exchange"],
                    ],
                    [
                        worker.names["in_queue"],
                        worker.names["dead_queue"],
                        worker.names["control_queue"],
                    ],
                )
        out["plain_confirmed_publish_msgs_per_s"] = baseline_rates
        out["through_worker_stored_msgs_per_s"] = worker_rates
        best_plain, best_worker = max(baseline_rates), max(worker_rates)
        out["ratio_best_worker_to_best_plain"] = round(best_worker / best_plain, 2)
        out["cpu_us_per_message_median"] = {
            path: {name: statistics.median(v) for name, v in by.items()}
            for path, by in cpu_us.items()
        }
        out["ratio_per_round"] = per_round = [
            round(w / p, 2) for w, p in zip(worker_rates, baseline_rates, strict=True)
        ]
        # Each round measures the plain loop and then the worker back to back, so the pair
        # shares the machine's state; the median of the pairs is the headline (the best of
        # each side can come from rounds minutes apart, under other load).
        out["ratio_median_of_rounds"] = round(statistics.median(per_round), 2)
        out["goal_ratio_at_least"] = 0.5
    finally:
        await conn.close()
    return out
