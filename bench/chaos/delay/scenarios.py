"""Fault scenarios of the ``delay`` worker for ``python -m bench.chaos``.

Each scenario runs its own worker process (``rabbitmq-bridge run delay``, unique exchange and queue
names, deleted at the end) under load from :class:`Load`: producers publish delayed messages
with publisher confirms, retrying an unconfirmed publish with the same ``message_id``, into
``TOPICS`` target exchanges, each with a quorum queue that a consumer here reads (manual
acks, so the consumer's own connection faults lose nothing). The mix:

- ``delay``: ``x-delay`` 0-3 s (most come due during the run);
- ``at_past``: ``x-deliver-at`` up to 10 minutes in the past (due at once);
- ``at_future``: ``x-deliver-at`` 0.2-4 s ahead;
- ``keyed``: a pair with the same ``x-delay-key``: the old one due in 1.5-5 s, then 0-0.5 s
  after its confirm the new one, due in 0-0.5 s (``x-delay``) or at once (``x-deliver-at``
  in the past), often on another topic.

The ledger is keyed by ``message_id``; every message's body names it. Checks:

- **lost**: every confirmed message that was not replaced arrives at its topic (``lost`` 0);
- **never early**: no arrival before the message's due time. For ``x-delay`` the due time
  is the worker's consume time plus the delay, which is after the producer started the
  publish, so ``int(publish start) + delay`` is a lower bound; ``x-deliver-at`` is exact.
  Lateness (arrival minus that bound) is reported per kind;
- **duplicates**: a second arrival must carry the same body and topic and is allowed only
  when something the contract names explains it (``duplicated.reasons``): the producer
  published it twice (an unconfirmed publish retried), a ``kill -9`` between its publish
  and the repeat (ingress acknowledgement or the delete after the broker's confirm lost
  with the process), or a broker connection fault in that span (a confirm lost with the
  connection: the lane publishes again). Anything else is a violation;
- **replacement** (docs/delay.md, "Replacement by key"): a newer message with the same key
  deletes every older stored one *that is not being published at that moment*. A lane
  publishes a message only once it is due, and the worker publishes the new message only
  after the commit that also deleted the old rows. So if the old message was delivered
  although it was due *after* the new one's first arrival, it was neither in flight nor
  published when the replacement was stored: a violation. An old message due before that
  arrival may have been in flight: allowed (``replaced_delivered_in_flight``), with the one
  exception below. A replaced message is owed nothing (its ledger entry expects no
  destination); its replacement is owed.
- **redelivery order**: "newer" means later *consumed by the worker*. When a fault returns
  both messages of a pair to ``delay.in`` unacknowledged (kill -9, connection loss), the
  broker may redeliver them in another order, and then the old one legitimately replaces the
  new one. A pair with a fault between the old one's publish and the end of the check is
  reported as ``pairs_reorder_possible`` and, if the old one won, not counted as a
  violation or a loss (``pairs_old_won_after_fault``).
- the store is empty at the end (control RPC ``counts``), and the scenarios with broker
  faults see ``/readyz`` go false and come back in the same process.

Scenarios: ``kill9`` (``h.kills`` kill -9 at drawn moments, some during start-up),
``broker_link`` (through a TCP proxy: connections dropped and refused for a while, short and
long stalls, a slow link), ``broker_restart`` (``rabbitmqctl stop_app`` / ``start_app``),
``overload`` (producers at twice what the worker takes for ``h.overload_seconds``: RSS over
time, backlog in ``delay.in``, probe latency before, during and after)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import aio_pika

from bench.chaos import probes
from bench.chaos.delay.deployment import Arrival, Sinks, deployment
from bench.chaos.delay.load import LOAD_SETTINGS, Load
from bench.chaos.harness import Harness, run_scenarios
from bench.chaos.probes import QueueDepth, metric, stall
from bench.harness.broker import delete_names
from bench.harness.cpu import rss_bytes
from bench.harness.stats import percentile
from workers.delay.client import DelayClient


async def kill9(h: Harness) -> None:
    async with deployment(h, "kill9", **LOAD_SETTINGS) as (s, proc, sinks):
        load = await Load(h, s, sinks, "kill9").start()
        try:
            t0 = time.monotonic()
            first_kill = len(h.kill_times)
            kills = await h.kill_loop(proc, h.kills, gap=(0.4, 2.0) if h.quick else (0.5, 3.0))
            for at in h.kill_times[first_kill:]:
                load.fault(at * 1000, at * 1000, "kill")
            figures = probes.kill_figures(h, kills)
            figures["load_s"] = round(time.monotonic() - t0, 1)
            await asyncio.sleep(1.0)
            await load.finish()
            confirmed = sum(1 for m in load.msgs.values() if m.confirmed)
            figures["messages_per_s"] = round(confirmed / figures["load_s"], 1)
        finally:
            await load.close()


async def broker_link(h: Harness) -> None:
    proxy = await h.proxy()
    async with deployment(
        h, "broker_link", proxy=proxy, host={"heartbeat_s": "1"}, **LOAD_SETTINGS
    ) as (s, proc, sinks):
        load = await Load(h, s, sinks, "broker_link").start()
        watch = h.watch(proc)
        pid = proc.pid
        faults: list[dict[str, Any]] = []

        def sinks_total() -> int:
            return sinks.total

        async def fault(coro: Any) -> None:
            start = time.time() * 1000
            result = await coro
            # only a dropped connection returns unacknowledged deliveries and loses confirms;
            # a stall the heartbeat did not notice and a slow link only delay them
            if result["kind"] == "cut" or result.get("went_down"):
                load.fault(start, time.time() * 1000, "link")
            faults.append(result)

        try:
            await asyncio.sleep(1.0)
            for cycle in range(1 if h.quick else 3):
                await fault(probes.cut(h, proc, watch, proxy))
                await fault(stall(h, proc, watch, proxy, h.rng.uniform(1.0, 2.5), "short"))
                if "stall_long" not in h.skip:
                    await fault(stall(h, proc, watch, proxy, 30.0, "long"))
                await fault(
                    probes.slow_link(h, proc, watch, proxy, sinks_total, "delivered_meanwhile")
                )
                h.progress(f"broker_link cycle {cycle + 1} done")
            await load.finish()
        finally:
            await watch.stop()
            await load.close()
        probes.link_figures(h, proc, pid, watch, faults)["recoveries"] = watch.recoveries


async def broker_restart(h: Harness) -> None:
    async with deployment(h, "broker_restart", **LOAD_SETTINGS) as (s, proc, sinks):
        load = await Load(h, s, sinks, "broker_restart").start()
        watch = h.watch(proc)
        pid = proc.pid
        try:
            await asyncio.sleep(3)
            start = time.time() * 1000
            figures = await probes.restart_broker(h, proc)
            load.fault(start, time.time() * 1000, "link")
            await asyncio.sleep(3)
            await load.finish(timeout=120)
        finally:
            await watch.stop()
            await load.close()
        probes.check_restart(h, proc, pid, watch, figures)


@dataclass
class Flood:
    """Open-loop producers of messages due at once, at a fixed total rate."""

    client: DelayClient
    topic: str
    rate: float
    producers: int = 3
    window: int = 256
    confirmed: int = 0
    failed: int = 0
    sent: int = 0
    running: bool = True
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self, tag: str) -> Flood:
        self._tasks = [asyncio.create_task(self._run(f"{tag}{j}")) for j in range(self.producers)]
        return self

    async def _run(self, tag: str) -> None:
        window = asyncio.Semaphore(self.window)
        body = bytes(100)
        pending: set[asyncio.Task[None]] = set()
        per_s = self.rate / self.producers
        t0 = time.monotonic()
        k = 0

        async def one(mid: str) -> None:
            try:
                await self.client.send(body, self.topic, delay_ms=0, message_id=mid)
                self.confirmed += 1
            except Exception:
                self.failed += 1
            finally:
                window.release()

        while self.running:
            wait = t0 + k / per_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await window.acquire()
            task = asyncio.create_task(one(f"{tag}-{k}"))
            pending.add(task)
            task.add_done_callback(pending.discard)
            self.sent += 1
            k += 1
        await asyncio.gather(*pending, return_exceptions=True)

    async def stop(self) -> None:
        self.running = False
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def overload(h: Harness) -> None:
    """Producers at twice what the worker takes (measured first) for ``h.overload_seconds``:
    the backlog must stay in the broker's ``delay.in`` (the worker holds at most PREFETCH
    deliveries and its window), its RSS bounded, every confirmed message delivered, and the
    latency of a probe back to where it was once the backlog is gone."""
    seconds = h.overload_seconds
    async with deployment(h, "overload", topics=1) as (s, proc, probe_sink):
        flood_sink = await Sinks([f"{probe_sink.names[0]}-flood"]).start(
            h.broker_url, consume=False, lazy=True
        )
        conn = await aio_pika.connect_robust(h.broker_url)
        depth_of = QueueDepth(h.broker_url)
        figures = h.scenario("overload")
        stop = asyncio.Event()
        probe_sent: dict[str, float] = {}
        probe: list[tuple[float, float]] = []  # (seconds since t0, latency s)
        depth: list[tuple[float, int]] = []
        rss: list[tuple[float, int]] = []
        stored: list[tuple[float, float]] = []
        t0 = time.monotonic()

        def on_probe(mid: str, a: Arrival) -> None:
            sent = probe_sent.get(mid)
            if sent is not None:
                probe.append((time.monotonic() - t0, a.at_ms / 1000 - sent))

        probe_sink.on_arrival = on_probe

        async def accepted() -> float:
            return await metric(proc, "bridge_delay_received_total", 'outcome="accepted"')

        async def probing(client: DelayClient) -> None:
            k = 0
            while not stop.is_set():
                mid = f"probe-{k}"
                k += 1
                probe_sent[mid] = time.time()
                with contextlib.suppress(Exception):
                    await client.send(b"probe", probe_sink.names[0], delay_ms=0, message_id=mid)
                await asyncio.sleep(0.2)

        async def sample() -> None:
            while not stop.is_set():
                t = time.monotonic() - t0
                depth.append((t, await depth_of(s.in_queue)))
                with contextlib.suppress(OSError):
                    rss.append((t, rss_bytes(proc.pid)))
                stored.append((t, await metric(proc, "bridge_delay_stored_messages")))
                await asyncio.sleep(1.0)

        flood: Flood | None = None
        try:
            client = await DelayClient(conn, s).open()
            probe_client = await DelayClient(conn, s).open()
            helpers = [asyncio.create_task(probing(probe_client)), asyncio.create_task(sample())]
            await asyncio.sleep(3.0 if h.quick else 5.0)
            t_flood = time.monotonic() - t0
            base_rss = rss_bytes(proc.pid)
            # what the worker takes: flood flat out for a few seconds
            calibrate = Flood(client, flood_sink.names[0], rate=50_000).start("cal")
            a0 = await accepted()
            await asyncio.sleep(5.0)
            capacity = (await accepted() - a0) / 5.0
            await calibrate.stop()
            rate = 2 * max(capacity, 100.0)
            h.progress(f"overload: worker takes {capacity:.0f}/s; offering {rate:.0f}/s")
            flood = Flood(client, flood_sink.names[0], rate=rate).start("ov")
            a1 = await accepted()
            await asyncio.sleep(max(0.0, seconds - 5.0))
            await flood.stop()
            t_stop = time.monotonic() - t0
            accepted_during = await accepted() - a1
            owed = calibrate.confirmed + flood.confirmed
            h.progress(f"overload: flood stopped, backlog {await depth_of(s.in_queue)}")
            drained_at = None
            drain_limit = max(300.0, 3 * seconds)
            deadline = time.monotonic() + drain_limit
            delivered = 0
            while time.monotonic() < deadline:
                delivered = await depth_of(flood_sink.names[0])
                if await depth_of(s.in_queue) == 0 and delivered >= owed:
                    drained_at = time.monotonic() - t0
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(6.0)
            stop.set()
            await asyncio.gather(*helpers, return_exceptions=True)
            delivered = await depth_of(flood_sink.names[0])
            retries = await metric(proc, "bridge_delay_publish_retries_total")
        finally:
            stop.set()
            if flood is not None:
                await flood.stop()
            await conn.close()
            await depth_of.close()
            await flood_sink.close()
            await delete_names(h.broker_url, flood_sink.names, flood_sink.names)

    def lat(lo: float, hi: float) -> dict[str, float]:
        xs = [v for t, v in probe if lo <= t < hi]
        return {
            "n": len(xs),
            "p50_ms": round(percentile(xs, 50) * 1000, 1),
            "p99_ms": round(percentile(xs, 99) * 1000, 1),
            "max_ms": round(max(xs, default=0.0) * 1000, 1),
        }

    end = drained_at if drained_at is not None else t_stop
    before = lat(0.0, t_flood)
    after = lat(end + 1.0, end + 6.0)

    def every_10s(samples: list[tuple[float, Any]], unit: float = 1.0) -> list[float]:
        out, step = [], t_flood
        for t, v in samples:
            if t_flood <= t <= end and t >= step:
                out.append(round(v / unit, 1))
                step += 10.0
        return out

    figures.update(
        {
            "flood_s": seconds,
            "worker_capacity_per_s": round(capacity, 1),
            "offered_per_s": round(rate, 1),
            "published_per_s": round(flood.confirmed / max(seconds - 5.0, 1.0), 1),
            "worker_accept_rate_per_s": round(accepted_during / max(seconds - 5.0, 1.0), 1),
            "messages_confirmed": owed,
            "messages_delivered": delivered,
            "publish_failures": flood.failed + calibrate.failed,
            "lane_publish_retries": retries,
            "backlog_max": max((d for _, d in depth), default=0),
            "backlog_at_flood_end": next((d for t, d in depth if t >= t_stop), None),
            "backlog_every_10s": every_10s(depth),
            "stored_in_worker_max": max((v for _, v in stored), default=0),
            "drain_s_after_flood": round(end - t_stop, 1) if drained_at is not None else None,
            "rss_mb": {
                "before": round(base_rss / 2**20, 1),
                "max": round(max((r for _, r in rss), default=0) / 2**20, 1),
                "end": round(rss[-1][1] / 2**20, 1) if rss else None,
                "every_10s": every_10s(rss, 2**20),
            },
            "probe_latency": {"before": before, "during": lat(t_flood, t_stop), "after": after},
        }
    )
    h.check(drained_at is not None, f"overload: not drained within {drain_limit:.0f} s")
    # nothing confirmed went missing: the flood's queue holds every confirmed message (more
    # only if a lane published one again after a lost confirm)
    h.check(
        delivered >= owed and (delivered == owed or retries > 0),
        f"overload: {owed} confirmed, {delivered} delivered ({retries} lane retries)",
    )
    figures["latency_recovered"] = after["n"] > 0 and after["p50_ms"] <= 3 * before["p50_ms"] + 5
    h.check(figures["latency_recovered"], f"overload: latency did not recover: {after}")


SCENARIOS = {
    "kill9": kill9,
    "broker_link": broker_link,
    "broker_restart": broker_restart,
    "overload": overload,
}


async def run(h: Harness) -> None:
    await run_scenarios(h, SCENARIOS)
