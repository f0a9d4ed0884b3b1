"""Benchmark of the delay worker against the local broker; prints one JSON object.

    python -m bench.delay            # full run (several minutes)
    python -m bench.delay --quick    # scaled down smoke run (about a minute)
    python -m bench.delay --only ingest,lateness

Parts, each measured in the same run against its baseline:

- ``steady``: 2,000 msg/s published with ``x-delay`` 1 s over 10 topics while the earlier
  ones fall due (ingest and delivery at once, consumers in their own process): worker CPU
  per message from /proc (lanes included) and lateness end to end; with ``--against TREE``
  the same rounds with that checkout's worker (a git worktree of the commit before a
  change), interleaved, and the ratio;
- ``ingest``: messages/s stored by the worker (publisher confirms on, the worker acknowledges
  after its group commit) vs. a plain confirmed publish loop of the same messages through
  the same topology with nobody consuming (a topic exchange bound '#' to a quorum queue, as
  ``delay.in``): the limit of this machine for a confirmed publish of those messages;
- ``lateness``: arrival time at a consumer minus due time, for messages falling due at a
  sustained 2,000 msg/s over 10 topics, with 8 lanes vs. 1 lane (the single dispatcher the
  seed improves on). Messages are stored before they fall due;
- ``isolation``: 100,000 messages due at one instant on one hot topic while 10 cold topics
  each have a message due every 20 ms around that instant; cold-topic lateness, 8 vs. 1 lane;
- ``topics``: tenants sharing one exchange (``TOPIC_BY=header:x-tenant``): 50,000 due at once
  for a hot tenant, 10 cold tenants with a message every 20 ms; cold-tenant lateness with a
  topic per tenant vs. one topic for all (what ``TOPIC_BY=exchange`` gives them);
- ``hotcold``: issue 16's scenario (50,000 due at once on a hot topic, 10 cold topics with a
  message every 20 ms) against the delayed-message plugin in the same run where the broker
  has it, with everything sharing the cores and with the worker pinned to a core of its own;
- ``scale``: 1,000,000 pending messages written straight into the worker's SQLite file (a
  bulk path in this script: ingest through AMQP is measured by ``ingest``), then worker RSS,
  store size on disk and time from process start to ready, with the in-memory window full
  (the worker's bound, ``window_max_entries``).

The worker runs as a subprocess (``rabbitmq-bridge run delay``, uvloop), like in production; the
producer and the consumer run in this process. Lateness is measured end to end (consumer
arrival, so it includes the broker's delivery to the consumer); the worker's own view
(publish time minus due time, from its histogram) is reported next to it."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.delay.hotcold import bench_hotcold
from bench.delay.ingest import bench_ingest
from bench.delay.isolation import bench_isolation
from bench.delay.lateness import bench_lateness
from bench.delay.scale import bench_scale
from bench.delay.steady import bench_steady
from bench.delay.topics import bench_topics
from bench.delay.worker import cpu_pressure, machine_load
from bench.harness.report import emit, interpreter, machine

PARTS = {
    "steady": bench_steady,
    "ingest": bench_ingest,
    "lateness": bench_lateness,
    "isolation": bench_isolation,
    "scale": bench_scale,
    "topics": bench_topics,
    "hotcold": bench_hotcold,
}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-delay-"))
    doc: dict[str, Any] = {
        "benchmark": "delay",
        "quick": args.quick,
        "command": " ".join(["python -m bench.delay", *sys.argv[1:]]),
        "cpus": os.cpu_count(),
        "python": interpreter(),
        "machine": machine(),
        "load_average_at_start": machine_load(),
        "cpu_pressure_some_avg60_pct_at_start": cpu_pressure(),
    }
    try:
        for name in args.only:
            started = time.perf_counter()
            doc[name] = await PARTS[name](args, tmp)
            doc[name]["seconds"] = round(time.perf_counter() - started, 1)
            doc[name]["load_average_after"] = machine_load()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return doc


def _install_uvloop() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass


def cli() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.delay", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="scaled down smoke run")
    parser.add_argument(
        "--rounds", type=int, default=3, help="ingest and steady rounds (alternating)"
    )
    parser.add_argument(
        "--against",
        type=Path,
        default=None,
        help="steady part: also run this checkout's worker (a git worktree of an earlier "
        "commit), interleaved, and report the ratio",
    )
    parser.add_argument(
        "--message-ids",
        choices=("counter", "uuid"),
        default="counter",
        help="steady part: the messages' ids, 0, 1, 2... (default) or random UUIDs as most "
        "producers send them (every store insert and delete on another index page)",
    )
    parser.add_argument(
        "--side-by-side",
        action="store_true",
        help="steady part with --against: run both checkouts' rounds at the same time (each "
        "its own publisher, consumers and rate), so both see the same machine",
    )
    parser.add_argument(
        "--parts",
        action="store_true",
        help="steady part: run this checkout's worker under bench.delay.parts and report "
        "the CPU time of its parts per message (thread CPU time around its callbacks and "
        "task steps; the measuring adds its own cost: not for comparing CPU per message)",
    )
    parser.add_argument(
        "--stored",
        type=int,
        default=0,
        help="steady part: messages already stored (due hours ahead, beyond the window) "
        "when each round's worker starts, written straight into its SQLite file; their ids "
        "follow --message-ids (m0, m1... or UUIDs)",
    )
    parser.add_argument(
        "--only",
        type=lambda v: [p for p in v.split(",") if p],
        default=list(PARTS),
        help=f"comma-separated parts: {','.join(PARTS)}",
    )
    args = parser.parse_args()
    unknown = [p for p in args.only if p not in PARTS]
    if unknown:
        parser.error(f"unknown parts: {unknown}")
    _install_uvloop()
    # The consumer here is measuring apparatus: full garbage collections would add their
    # pauses (up to hundreds of ms with 100,000 ids recorded) to the lateness it records.
    gc.freeze()
    gc.set_threshold(700, 10, 1000)
    doc = asyncio.run(main(args))
    emit(doc)


if __name__ == "__main__":
    cli()
