"""``crash``: kill -9 of the gateway at seeded moments under echo load, restart, resends."""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path
from typing import Any

from bench.chaos.gateway.deployment import (
    RssWatch,
    _running_pid,
    alive_at,
    cleanup,
    env_for,
    finish,
    queue_depth,
    settings_for,
    start_servers,
)
from bench.chaos.gateway.ledger import SERVERS, ChaosClient, ServerLedger, analyse
from bench.harness.procs import WorkerProcess, free_port
from bench.harness.report import progress, unique
from bench.harness.stats import percentile, rnd
from workers.gateway.backend import BackendServer


async def crash(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    prefix = unique("chaos-gw-crash")
    port = free_port()
    gateway = WorkerProcess(["gateway"], state_dir=root / "crash", env=env_for(prefix, port))
    ledger = ServerLedger()
    servers: list[BackendServer] = []
    await asyncio.to_thread(lambda: gateway.start().wait_ready(60))
    rss = RssWatch(lambda: _running_pid(gateway))
    schedule: list[str] = []  # seconds up before the kill + seconds down
    restart_s: list[float] = []
    start_failures = 0
    try:
        servers = await start_servers(prefix, ledger)
        await alive_at(gateway, SERVERS)
        clients = [
            ChaosClient(f"c{i}", lambda: port, window=4, seed=args.seed * 1000 + i)
            for i in range(args.clients)
        ]
        tasks = [asyncio.get_running_loop().create_task(c.run()) for c in clients]
        await asyncio.sleep(2.0)
        for kill in range(args.kills):
            up, down = rng.uniform(0.3, 3.0), rng.uniform(0.0, 1.0)
            schedule.append(f"{up:.2f}+{down:.2f}")
            await asyncio.sleep(up)
            assert gateway.proc is not None
            gateway.proc.kill()  # SIGKILL
            await asyncio.to_thread(gateway.proc.wait)
            await asyncio.sleep(down)
            started = time.monotonic()
            for _ in range(20):
                try:
                    await asyncio.to_thread(lambda: gateway.start().wait_ready(60))
                    break
                except RuntimeError as exc:  # e.g. the broker still saw the old consumer
                    start_failures += 1
                    progress("restart failed, again:", str(exc)[-200:])
                    await asyncio.sleep(0.5)
            restart_s.append(time.monotonic() - started)
            progress(f"crash: kill {kill + 1}/{args.kills} after {up:.2f}s up, {down:.2f}s down")
        await asyncio.sleep(3.0)
        await finish(clients, tasks, timeout=120)
        await asyncio.sleep(1.0)  # the last disconnect events
        out = analyse(clients, ledger)
        out.update(
            {
                "kills": args.kills,
                "kill_schedule_s": schedule,
                "restart_to_ready_s": {
                    "p50": rnd(percentile(restart_s, 50), 2),
                    "max": rnd(max(restart_s, default=0), 2),
                },
                "start_failures": start_failures,
                "clients": args.clients,
                "replies_to_dead_sessions_in_undeliverable": await queue_depth(
                    settings_for(prefix).undeliverable_queue
                ),
                "max_rss_mib": rss.max_mib(),
            }
        )
        return out
    finally:
        rss.stop()
        await asyncio.to_thread(gateway.stop)
        for server in servers:
            await server.stop()
        await cleanup(prefix)


# -- broker faults -------------------------------------------------------------------------
