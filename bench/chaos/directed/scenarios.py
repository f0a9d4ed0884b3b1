"""Fault scenarios of the ``directed`` worker for ``python -m bench.chaos``.

Each scenario runs its own worker process (unique exchange and queue names, deleted at the
end) under load from :class:`Load`: producers publish requests with confirms, each to a few
of 16 targets, retrying an unconfirmed publish with the same ``message_id``; one puller per
target pulls with the cursor (long polls), now and then re-pulling without acknowledging, as
a target that crashed before processing would. The ledger checks, per target, that every
confirmed request arrived, that a message is seen again only in a batch re-sent under the
same record id with ``redelivered: true`` (the contract's one kind of duplicate), and that
each producer's requests arrive in the order it published them.

- ``kill9``: kill -9 at drawn moments (some during start-up), restart, repeat;
- ``broker_link``: through a TCP proxy: drop all connections, short and long stalls, a slow
  link; the worker must recover by itself (same pid), /readyz false then true;
- ``broker_restart``: ``rabbitmqctl stop_app`` / ``start_app`` under load;
- ``overload``: producers far faster than the worker; RSS, broker backlog and pull latency
  before, during and after."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

import aio_pika

from bench.chaos import probes
from bench.chaos.directed.load import Load, deployment
from bench.chaos.harness import Harness, run_scenarios
from bench.chaos.probes import QueueDepth, metric, stall
from bench.harness.cpu import rss_bytes
from bench.harness.stats import percentile
from workers.directed.client import DirectedClient


async def kill9(h: Harness) -> None:
    async with deployment(h, "kill9") as (s, proc):
        load = await Load(h, s, "kill9").start()
        try:
            t0 = time.monotonic()
            kills = await h.kill_loop(proc, h.kills, gap=(0.4, 2.0) if h.quick else (0.5, 3.0))
            figures = probes.kill_figures(h, kills)
            figures["load_s"] = round(time.monotonic() - t0, 1)
            await asyncio.sleep(2)
            await load.finish()
            figures["requests_per_s"] = round(load.stats["confirmed"] / figures["load_s"], 1)
        finally:
            await load.close()


async def broker_link(h: Harness) -> None:
    proxy = await h.proxy()
    async with deployment(h, "broker_link", proxy=proxy, host={"heartbeat_s": "1"}) as (s, proc):
        load = await Load(h, s, "broker_link").start()
        watch = h.watch(proc)
        pid = proc.pid
        faults: list[dict[str, Any]] = []

        def pulls() -> int:
            return load.stats["pulls"]

        try:
            for cycle in range(1 if h.quick else 3):
                faults.append(await probes.cut(h, proc, watch, proxy))
                faults.append(await stall(h, proc, watch, proxy, h.rng.uniform(1.0, 2.5), "short"))
                faults.append(await stall(h, proc, watch, proxy, 30.0, "long"))
                faults.append(
                    await probes.slow_link(h, proc, watch, proxy, pulls, "pulls_answered")
                )
                h.progress(f"broker_link cycle {cycle + 1} done")
            await load.finish()
        finally:
            await watch.stop()
            await load.close()
        probes.link_figures(h, proc, pid, watch, faults)


async def broker_restart(h: Harness) -> None:
    async with deployment(h, "broker_restart") as (s, proc):
        load = await Load(h, s, "broker_restart").start()
        watch = h.watch(proc)
        pid = proc.pid
        try:
            await asyncio.sleep(3)
            figures = await probes.restart_broker(h, proc)
            await asyncio.sleep(3)
            await load.finish()
        finally:
            await watch.stop()
            await load.close()
        probes.check_restart(h, proc, pid, watch, figures)


async def overload(h: Harness) -> None:
    """Producers far faster than the worker; targets with drop-head queues (the default
    limit of 50 ids) and a short de-duplication window, so the worker's state is bounded by
    configuration and whatever RSS does beyond that is buffering."""
    seconds = h.overload_seconds
    targets = [f"o{i:02d}" for i in range(50)]
    async with deployment(h, "overload", queue_limit=50, dedup_retention_ms=10_000) as (s, proc):
        conn = await aio_pika.connect_robust(h.broker_url)
        depth_of = QueueDepth(h.broker_url)
        figures = h.scenario("overload")
        stop = asyncio.Event()
        probe_samples: list[tuple[float, float]] = []
        depth: list[tuple[float, int]] = []
        rss: list[tuple[float, int]] = []
        t0 = time.monotonic()
        try:
            client = await DirectedClient(conn, s).open()

            async def backlog() -> int:
                return await depth_of(s.requests_queue)

            async def applied() -> float:
                return sum(
                    [
                        await metric(proc, "bridge_directed_requests_total", f'outcome="{o}"')
                        for o in ("accepted", "duplicate")
                    ]
                )

            async def probe() -> None:  # one pull round trip every 200 ms
                record = None
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        reply = await client.pull("probe", record, max=1, timeout=30)
                        record = reply.get("record_id")
                        probe_samples.append((started - t0, time.monotonic() - started))
                    except Exception:
                        probe_samples.append((started - t0, 30.0))
                        with contextlib.suppress(Exception):  # see Load._reopen_rpc
                            await client.rpc.close()
                            await client.rpc.open()
                    await asyncio.sleep(0.2)

            async def sample() -> None:
                while not stop.is_set():
                    depth.append((time.monotonic() - t0, await backlog()))
                    with contextlib.suppress(OSError):
                        rss.append((time.monotonic() - t0, rss_bytes(proc.pid)))
                    await asyncio.sleep(1.0)

            async def drain_half() -> None:  # half the targets keep pulling
                records: dict[str, str | None] = {t: None for t in targets[::2]}
                while not stop.is_set():
                    for t in records:
                        with contextlib.suppress(Exception):
                            reply = await client.pull(t, records[t], max=50, timeout=30)
                            records[t] = reply.get("record_id")

            confirmed = 0
            flooding = asyncio.Event()

            async def flood(j: int) -> None:
                nonlocal confirmed
                rng = random.Random(f"{h.seed}:overload:{j}")
                window = asyncio.Semaphore(64)
                body = bytes(1024)
                k = 0

                async def one(mid: str, chosen: list[str]) -> None:
                    nonlocal confirmed
                    try:
                        await client.send(body, chosen, message_id=mid)
                        confirmed += 1
                    finally:
                        window.release()

                pending = set()
                while flooding.is_set():
                    await window.acquire()
                    task = asyncio.create_task(one(f"ov-{j}-{k}", rng.sample(targets, 10)))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    k += 1
                await asyncio.gather(*pending, return_exceptions=True)

            helpers = [asyncio.create_task(f()) for f in (probe, sample, drain_half)]
            await asyncio.sleep(3.0 if h.quick else 5.0)
            base_rss = rss_bytes(proc.pid)
            applied0 = await applied()
            t_flood = time.monotonic() - t0
            flooding.set()
            floods = [asyncio.create_task(flood(j)) for j in range(3)]
            await asyncio.sleep(seconds)
            flooding.clear()
            await asyncio.gather(*floods)
            t_stop = time.monotonic() - t0
            applied1 = await applied()
            h.progress(f"overload: flood stopped, backlog {await backlog()}")
            drained_at = None
            drain_limit = max(300.0, 3 * seconds)
            deadline = time.monotonic() + drain_limit
            while time.monotonic() < deadline:  # queue empty and the prefetched ones applied
                if await backlog() == 0 and await applied() - applied0 >= confirmed:
                    drained_at = time.monotonic() - t0
                    break
                await asyncio.sleep(0.25)
            await asyncio.sleep(5.0)
            stop.set()
            await asyncio.gather(*helpers, return_exceptions=True)
            applied2 = await applied()
        finally:
            stop.set()
            await conn.close()
            await depth_of.close()

    def lat(lo: float, hi: float) -> dict[str, float]:
        xs = [v for t, v in probe_samples if lo <= t < hi]
        return {
            "n": len(xs),
            "p50_ms": round(percentile(xs, 50) * 1000, 1),
            "p99_ms": round(percentile(xs, 99) * 1000, 1),
        }

    end = drained_at if drained_at is not None else t_stop
    after = lat(end + 1.0, end + 5.0)
    base = lat(0.0, t_flood)
    figures.update(
        {
            "flood_s": seconds,
            "requests_confirmed": confirmed,
            "publish_rate_per_s": round(confirmed / seconds, 1),
            "worker_accept_rate_per_s": round((applied1 - applied0) / seconds, 1),
            "requests_applied": int(applied2 - applied0),
            "backlog_max": max((d for _, d in depth), default=0),
            "backlog_at_flood_end": next((d for t, d in depth if t >= t_stop), None),
            "backlog_every_10s": [d for t, d in depth if int(t) % 10 == 0],
            "drain_s_after_flood": round(end - t_stop, 1) if drained_at is not None else None,
            "rss_mb": {
                "before": round(base_rss / 2**20, 1),
                "max": round(max((r for _, r in rss), default=0) / 2**20, 1),
                "end": round(rss[-1][1] / 2**20, 1) if rss else None,
                "every_10s": [round(r / 2**20, 1) for t, r in rss if int(t) % 10 == 0],
            },
            "pull_latency": {"before": base, "during": lat(t_flood, t_stop), "after": after},
        }
    )
    # nothing confirmed went missing: every flood request was consumed and applied
    h.check(
        figures["requests_applied"] >= confirmed,
        f"overload: {confirmed} confirmed but {figures['requests_applied']} applied",
    )
    h.check(drained_at is not None, f"overload: the backlog did not drain in {drain_limit:.0f} s")
    figures["latency_recovered"] = after["p50_ms"] <= 3 * base["p50_ms"] + 5
    h.check(figures["latency_recovered"], f"overload: pull latency did not recover: {after}")


SCENARIOS = {
    "kill9": kill9,
    "broker_link": broker_link,
    "broker_restart": broker_restart,
    "overload": overload,
}


async def run(h: Harness) -> None:
    await run_scenarios(h, SCENARIOS)
