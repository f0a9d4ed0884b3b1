"""Where the directed worker's memory per idle HTTP long-poller goes: a tracemalloc diff.

    python -m bench.directed.http_memory --pollers 1000

The directed worker runs in this process (on uvloop, as ``bridge.cli run`` runs it) with
tracemalloc on; N long-pollers (``wait_ms`` 30,000, one keep-alive connection each) run in a
child process. Snapshots are taken with a few warm-up pollers waiting and with all N waiting
(after a full garbage collection each time); the difference, divided by the pollers added, is
the Python heap per poller, by the line that allocated it (``--frames`` deep). RSS per poller
is measured too, but tracemalloc's own bookkeeping inflates it: the RSS figure to quote is
``bench.directed.http``'s, without tracemalloc. One JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness.broker import delete_names
from bench.harness.cpu import rss_bytes
from bench.harness.procs import free_port
from bench.harness.report import broker_url, emit, progress, unique
from bench.harness.stats import rnd


async def pollers(port: int, count: int, start: int) -> None:
    """The child: ``count`` long-pollers that re-poll forever; one line on stdout per
    request sent, so the parent knows when all are out."""
    base = f"http://127.0.0.1:{port}/directed/v1/targets"
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
    )

    async def node(i: int) -> None:
        body = {"max": 10, "wait_ms": 30_000}
        while True:
            async with session.post(f"{base}/node-{i:05d}/pull", json=body) as r:
                await r.read()

    tasks = [asyncio.create_task(node(i)) for i in range(start, start + count)]
    await asyncio.gather(*tasks)


def spawn(port: int, count: int, start: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.directed.http_memory",
            "--child",
            str(port),
            str(count),
            str(start),
        ]
    )


def stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        child.kill()
        child.wait()


PARTS = [  # (part, substrings of the allocating file), first match wins
    ("aiohttp: connection handler, parser, request, streams, tasks", ("aiohttp/", "yarl/", "multidict/")),
    ("event loop: uvloop transport and socket (allocated in C)", ("asyncio/runners.py",)),
    ("weak references to the two tasks", ("weakref",)),
    ("the target's cursor state (exists with or without a poll)", ("store.py", "model.py")),
    ("the pull path: http_api, the worker's pull and wait, bridge/http.py", ("workers/", "bridge/")),
]  # fmt: skip


def by_part(diff: list[tracemalloc.StatisticDiff], per: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for stat in diff:
        name = stat.traceback[0].filename
        part = next((p for p, keys in PARTS if any(k in name for k in keys)), "other")
        out[part] = out.get(part, 0.0) + stat.size_diff / per
    return {part: rnd(size, 0) for part, size in sorted(out.items(), key=lambda kv: -kv[1])}


def top(diff: list[tracemalloc.StatisticDiff], per: int, n: int) -> list[dict[str, Any]]:
    out = []
    for stat in diff[:n]:
        frames = [f"{Path(f.filename).name}:{f.lineno}" for f in stat.traceback]
        out.append(
            {
                "bytes_per_poller": rnd(stat.size_diff / per, 1),
                "blocks_per_poller": rnd(stat.count_diff / per, 2),
                "where": " < ".join(frames),
            }
        )
    return out


async def waiting(host: Any, count: int, timeout: float) -> None:
    """Until ``count`` HTTP connections are open (each sends its long poll at once), then 5 s
    for the last requests to be parked (past the commit each makes before it waits)."""
    deadline = time.monotonic() + timeout
    while (open_ := host.http.open) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {open_} of {count} pollers connected")
        await asyncio.sleep(0.1)
    await asyncio.sleep(5.0)


def snapshot() -> tracemalloc.Snapshot:
    gc.collect()
    return tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from bench.directed.http import settings_for
    from tests.conftest import running_host
    from workers.directed.worker import DirectedWorker

    s = settings_for(unique("bm"))
    port = free_port()
    root = Path(tempfile.mkdtemp(prefix="bench-directed-mem-"))
    tracemalloc.start(args.frames)
    worker = DirectedWorker(s)
    children = []
    try:
        async with running_host(
            broker_url(), root, [worker], http_port=port, http_keepalive_s=120
        ) as host:
            warm = max(10, args.pollers // 20)
            children.append(spawn(port, warm, 0))
            await waiting(host, warm, 60)
            rss0, before = rss_bytes_self(), snapshot()
            progress("warm-up pollers waiting:", warm)
            children.append(spawn(port, args.pollers, warm))
            await waiting(host, warm + args.pollers, 300)
            rss1, after = rss_bytes_self(), snapshot()
            progress("all pollers waiting:", warm + args.pollers)
            stop(children)  # before the host stops: it would wait for the long polls
    finally:
        stop(children)
        await delete_names(
            broker_url(),
            [s.requests_exchange, s.pull_exchange, s.control_exchange, s.dead_exchange],
            [s.requests_queue, s.pull_queue, s.control_queue, s.dead_queue],
        )
    by_line = after.compare_to(before, "traceback")
    total = sum(stat.size_diff for stat in by_line)
    blocks = sum(stat.count_diff for stat in by_line)
    by_file = after.compare_to(before, "filename")
    return {
        "pollers": args.pollers,
        "traced_bytes_per_poller": rnd(total / args.pollers, 0),
        "traced_blocks_per_poller": rnd(blocks / args.pollers, 1),
        "rss_bytes_per_poller_with_tracemalloc": rnd((rss1 - rss0) / args.pollers, 0),
        "by_part": by_part(by_file, args.pollers),
        "by_file": [
            {
                "file": s.traceback[0].filename.split("site-packages/")[-1],
                "bytes_per_poller": rnd(s.size_diff / args.pollers, 1),
            }
            for s in by_file[: args.top]
        ],
        "by_site": top(by_line, args.pollers, args.top),
    }


def rss_bytes_self() -> int:
    import os

    return rss_bytes(os.getpid())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pollers", type=int, default=1000)
    p.add_argument("--frames", type=int, default=4, help="traceback depth of a site")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--child", nargs=3, type=int, metavar=("PORT", "COUNT", "START"))
    return p.parse_args(argv)


def run() -> None:
    args = parse_args()
    if args.child:
        port, count, start = args.child
        asyncio.run(pollers(port, count, start))
        return
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    emit(asyncio.run(main(args)))


if __name__ == "__main__":
    _ = json
    run()
