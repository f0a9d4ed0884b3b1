"""RSS of a fresh gateway process before and after N connected idle clients."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from bench.gateway.clients import FramedClient, Recorder
from bench.gateway.processes import Child, gateway_env, wait_alive
from bench.harness.cpu import rss_bytes
from bench.harness.procs import WorkerProcess, free_port
from bench.harness.report import progress
from bench.harness.stats import rnd


async def idle_memory(
    args: argparse.Namespace,
    root: Path,
    prefix: str,
    broker_pid: int,
    tree: Path | None = None,
) -> dict[str, Any]:
    """RSS of a fresh gateway before and after ``args.idle`` idle connections."""
    import json

    port = free_port()
    gateway = WorkerProcess(
        ["gateway"],
        state_dir=root / f"idle-{prefix}",
        env=gateway_env(prefix + "-idle", port),
        tree=tree,
    )
    gateway.start().wait_ready(60)
    backend = Child(
        ["echo-backend", "idle"], gateway_env(prefix + "-idle", port), root / "idle-backend.log"
    )
    try:
        await wait_alive(gateway, "idle")
        await asyncio.sleep(1.0)
        before = rss_bytes(gateway.pid)
        loop = asyncio.get_running_loop()
        recorder = Recorder()
        transports = []
        started = time.perf_counter()
        batch = 500
        for first in range(0, args.idle, batch):
            pending = []
            for _ in range(min(batch, args.idle - first)):
                transport, client = await loop.create_connection(
                    lambda: FramedClient(recorder), "127.0.0.1", port
                )
                transports.append(transport)
                pending.append(client.ready)
            await asyncio.wait_for(asyncio.gather(*pending), 60)
        connect_s = time.perf_counter() - started
        # every connect event confirmed, then let allocator and GC settle
        for _ in range(300):
            summary = json.loads(gateway.http("/admin/gateway/summary")[1])
            if summary["publish_in_flight"] == 0:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.0)
        after = rss_bytes(gateway.pid)
        connections = summary["connections"]
        for transport in transports:
            transport.close()
        await asyncio.sleep(1.0)
        result = {
            "connections": connections,
            "rss_before_mib": rnd(before / 2**20, 1),
            "rss_after_mib": rnd(after / 2**20, 1),
            "bytes_per_connection": round((after - before) / max(connections, 1)),
            "connects_per_s": rnd(args.idle / connect_s, 1),
        }
        progress(f"idle {prefix}", result)
        return result
    finally:
        backend.stop()
        gateway.stop()
