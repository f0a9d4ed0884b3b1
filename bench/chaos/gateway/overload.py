"""``overload``: clients open-loop at twice what the only backend handles, then stop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
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
from bench.chaos.gateway.ledger import ChaosClient, ServerLedger, analyse
from bench.harness.procs import WorkerProcess, free_port
from bench.harness.report import progress, unique
from bench.harness.stats import percentile, rnd
from workers.gateway.backend import BackendServer
from workers.gateway.config import GatewaySettings


async def overload(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    prefix = unique("chaos-gw-overload")
    port = free_port()
    gateway = WorkerProcess(["gateway"], state_dir=root / "overload", env=env_for(prefix, port))
    ledger = ServerLedger(delay_s=0.002)  # one slow backend, one message at a time
    servers: list[BackendServer] = []
    await asyncio.to_thread(lambda: gateway.start().wait_ready(60))
    rss = RssWatch(lambda: _running_pid(gateway), period=0.25)
    window_samples: list[int] = []
    depth_samples: list[tuple[float, int]] = []
    queue = settings_for(prefix).server_queue("s1")
    stop_sampling = asyncio.Event()

    async def sample() -> None:
        while not stop_sampling.is_set():
            with contextlib.suppress(OSError, ValueError):
                summary = json.loads(gateway.http("/admin/gateway/summary")[1])
                window_samples.append(int(summary["publish_in_flight"]))
            depth_samples.append((time.monotonic(), await queue_depth(queue)))
            await asyncio.sleep(0.5)

    try:
        servers = await start_servers(prefix, ledger, ("s1",), prefetch=1)
        await alive_at(gateway, ("s1",))
        sampler = asyncio.get_running_loop().create_task(sample())
        # what the backend can take: a closed loop with many messages outstanding
        calibrate = ChaosClient("cal", lambda: port, window=64, resend_after_s=600, seed=2)
        calibrating = asyncio.get_running_loop().create_task(calibrate.run())
        await asyncio.sleep(4.0)
        capacity = len(calibrate.answered) / 4.0
        await finish([calibrate], [calibrating], timeout=60)
        rate = args.overload_factor * capacity
        probe = ChaosClient("probe", lambda: port, window=1, rate=5.0, resend_after_s=600, seed=1)
        probe_task = asyncio.get_running_loop().create_task(probe.run())
        await asyncio.sleep(5.0)
        baseline_end = time.monotonic()
        handled_before = len(ledger.data)
        load = [
            ChaosClient(
                f"o{i}",
                lambda: port,
                window=10**9,
                rate=rate / args.clients,
                size=256,
                resend_after_s=600,
                seed=100 + i,
            )
            for i in range(args.clients)
        ]
        progress(f"overload: {rate:.0f}/s offered, {capacity:.0f}/s taken, {args.overload_s}s")
        tasks = [asyncio.get_running_loop().create_task(c.run()) for c in load]
        await asyncio.sleep(args.overload_s)
        load_end = time.monotonic()
        handled_during = len(ledger.data) - handled_before
        for client in load:
            client.sending = False
        await finish(load, tasks, timeout=args.overload_s * 6 + 120)
        drained = time.monotonic()
        await asyncio.sleep(5.0)
        probe.sending = False
        await asyncio.wait_for(probe_task, 60)
        stop_sampling.set()
        await sampler

        def rtts(since: float, until: float) -> list[float]:
            return [r for t, r in probe.rtts if since <= t < until]

        base = rtts(0, baseline_end)
        base_p50 = percentile(base, 50)
        recovered_at = next(
            (t for t, r in probe.rtts if t > load_end and r <= max(3 * base_p50, base_p50 + 0.05)),
            None,
        )
        out = analyse([*load, probe], ledger)
        out.update(
            {
                "backend_capacity_per_s": rnd(capacity, 1),
                "offered_per_s": rnd(rate, 1),
                "seconds": args.overload_s,
                "backend_handled_per_s": rnd(handled_during / (load_end - baseline_end), 1),
                "backlog_max": max((d for _, d in depth_samples), default=0),
                "backlog_drained_after_load_s": rnd(drained - load_end, 1),
                "publish_in_flight_max": max(window_samples, default=0),
                "publish_window": GatewaySettings().publish_window,
                "rss_mib": {
                    "before": rss.max_mib(0, baseline_end),
                    "max_during": rss.max_mib(baseline_end, load_end),
                    "max_after": rss.max_mib(load_end),
                    "end": rnd(rss.samples[-1][1] / 2**20, 1) if rss.samples else None,
                    "every_10s_of_load": _every(rss.samples, baseline_end, drained, 2**20),
                },
                "backlog_every_10s_of_load": _every(depth_samples, baseline_end, drained),
                "probe_rtt_ms": {
                    "before_p50": rnd(base_p50 * 1000, 1),
                    "during_max": rnd(max(rtts(baseline_end, load_end), default=0) * 1000, 1),
                    "after_drain_p50": rnd(percentile(rtts(drained, float("inf")), 50) * 1000, 1),
                },
                "latency_recovered_after_load_s": (
                    rnd(recovered_at - load_end, 1) if recovered_at is not None else None
                ),
                "max_rss_mib": rss.max_mib(),
            }
        )
        return out
    finally:
        stop_sampling.set()
        rss.stop()
        await asyncio.to_thread(gateway.stop)
        for server in servers:
            await server.stop()
        await cleanup(prefix)


def _every(
    samples: list[tuple[float, int]], since: float, until: float, unit: int = 1
) -> list[float]:
    """The first sample of each 10 s step from ``since`` to ``until`` (RSS, queue depth)."""
    out: list[float] = []
    step = since
    for t, value in samples:
        if since <= t <= until and t >= step:
            out.append(rnd(value / unit, 1))
            step += 10.0
    return out


# -- the run -------------------------------------------------------------------------------
