"""``scale``: 1,000,000 pending messages written straight into the worker's SQLite file, then
worker RSS, store size on disk and time from process start to ready."""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

from bench.delay.worker import Worker, now_ms
from bench.harness.broker import delete_names
from bench.harness.report import broker_url, progress
from bridge.amqp.frames import Properties
from workers.delay.store import SCHEMA, SCHEMA_VERSION


def bulk_store(
    path: Path, n: int, *, first_due: int, spread_ms: int, uuid_ids: bool = False
) -> float:
    """Write ``n`` pending rows straight into a delay store file (bench-only fast path);
    message ids ``m0``, ``m1``... or random UUIDs (``uuid_ids``)."""
    started = time.perf_counter()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("CREATE TABLE bridge_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.executemany(
        "INSERT INTO bridge_meta VALUES (?, ?)",
        [("worker", "delay"), ("schema_version", str(SCHEMA_VERSION))],
    )
    for statement in SCHEMA:
        conn.execute(statement)
    props = Properties(delivery_mode=2, message_id="x").encode()
    body = b"x" * 100
    conn.execute("BEGIN")
    chunk = 50_000
    for start in range(0, n, chunk):
        rows = [
            (
                i + 1,
                first_due + (i * 7919 % n) * spread_ms // n,
                f"topic{i % 100}",
                "bench",
                None,
                uuid.uuid4().hex if uuid_ids else f"m{i}",
                props,
                body,
            )
            for i in range(start, min(n, start + chunk))
        ]
        conn.executemany(
            "INSERT INTO pending (mid, due_ms, topic, routing_key, key, message_id, props,"
            " body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - started


async def bench_scale(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    n = 100_000 if args.quick else 1_000_000
    cap = 200_000
    tag = f"bs-{uuid.uuid4().hex[:6]}"
    state = tmp / tag
    (state / "delay").mkdir(parents=True)
    db = state / "delay" / "delay.sqlite3"
    # Due over 2 hours from 5 minutes ahead, with a 1 hour window: half of them are inside
    # the window, so the loader fills memory up to the cap and nothing falls due meanwhile.
    progress(f"scale: writing {n} pending rows straight into SQLite (bench-only bulk path)")
    bulk_s = bulk_store(db, n, first_due=now_ms() + 300_000, spread_ms=7_200_000)
    size = sum(p.stat().st_size for p in (state / "delay").iterdir())
    progress("scale: starting the worker")
    worker = Worker(tag, state, lanes=8, window_ms=3_600_000, window_max_entries=cap)
    try:
        worker.start()
        t0 = time.perf_counter()
        window, stable_since, filled_at = -1, time.perf_counter(), time.perf_counter()
        while time.perf_counter() - t0 < 180:
            current = worker.summary().get("window", 0)
            if current != window:
                window, stable_since, filled_at = current, time.perf_counter(), time.perf_counter()
            elif time.perf_counter() - stable_since > 2:
                break  # the loader is done: the window holds everything due within it, or the cap
            await asyncio.sleep(0.05)
        filled_s = (worker.ready_s or 0) + (filled_at - t0)
        summary_doc = worker.summary()
        return {
            "pending": n,
            "inserted_by": "bulk SQLite path in bench/delay/scale.py (not through AMQP)",
            "bulk_insert_s": round(bulk_s, 1),
            "store_bytes_on_disk": size,
            "store_mb_on_disk": round(size / 2**20, 1),
            "window_entries": summary_doc.get("window"),
            "window_cap": cap,
            "start_to_ready_s": round(worker.ready_s or 0, 2),
            "start_to_window_loaded_s": round(filled_s, 2),
            **worker.memory(),
            "goals": {"rss_mb_below": 250, "ready_s_below": 10},
        }
    finally:
        worker.stop()
        await delete_names(
            broker_url(),
            [
                worker.names["in_exchange"],
                worker.names["dead_exchange"],
                worker.names["control_exchange"],
            ],
            [worker.names["in_queue"], worker.names["dead_queue"], worker.names["control_queue"]],
        )
