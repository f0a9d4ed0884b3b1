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
time, backlog in ``delay.in``, probe latency before, during and after).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from bench.chaos import ChaosProcess, Harness, run_scenarios
from bench.chaos_directed import QueueDepth, _median, _stall, _wait_ready_state, metric
from bench.common import percentile, rss_bytes
from workers.delay.client import DelayClient
from workers.delay.config import DelaySettings

TOPICS = 4

KILLED = (
    "kill -9 while it was in flight (ingress not yet acknowledged, or confirmed at the "
    "target before its delete was committed): published again, same message_id and body"
)
LINK = (
    "broker connection fault while it was in flight (ingress ack or the target's confirm "
    "lost with the connection): published again, same message_id and body"
)
PRODUCER = (
    "the producer published it again after an unconfirmed publish (two copies in delay.in, "
    "same message_id and body)"
)


def settings_for(prefix: str, **overrides: Any) -> DelaySettings:
    names = {
        "in_exchange": f"{prefix}.in",
        "in_queue": f"{prefix}.in",
        "dead_exchange": f"{prefix}.dead",
        "dead_queue": f"{prefix}.dead",
        "control_exchange": f"{prefix}.control",
        "control_queue": f"{prefix}.control",
    }
    return DelaySettings(**{**names, **overrides})


def env_for(s: DelaySettings, **host: str) -> dict[str, str]:
    out = {f"BRIDGE_DELAY__{f.upper()}": str(getattr(s, f)) for f in s.model_fields_set}
    out.update({f"BRIDGE_{k.upper()}": v for k, v in host.items()})
    return out


async def delete_names(url: str, exchanges: list[str], queues: list[str]) -> None:
    conn = await aio_pika.connect(url)
    try:
        for queue in queues:
            channel = await conn.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue)
        for exchange in exchanges:
            channel = await conn.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(exchange)
    finally:
        await conn.close()


@dataclass
class Arrival:
    at_ms: float  # wall clock when the consumer got it
    topic: str
    body: bytes


class Sinks:
    """Target exchanges (topic, durable), each with a quorum queue bound ``#``. Consumed
    here with manual acks unless ``consume`` is false (the overload flood's sink)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.arrivals: dict[str, list[Arrival]] = defaultdict(list)
        self.consumer_redeliveries = 0
        self.total = 0
        self.on_arrival: Any = None
        self._conn: AbstractRobustConnection | None = None

    async def start(self, url: str, *, consume: bool = True, lazy: bool = False) -> Sinks:
        self._conn = await aio_pika.connect_robust(url)
        channel = await self._conn.channel()
        await channel.set_qos(prefetch_count=1000)
        for name in self.names:
            exchange = await channel.declare_exchange(name, "topic", durable=True)
            args = {"x-queue-mode": "lazy"} if lazy else {"x-queue-type": "quorum"}
            queue = await channel.declare_queue(name, durable=True, arguments=args)
            await queue.bind(exchange, "#")
            if consume:
                await queue.consume(partial(self._on_message, name))
        return self

    async def _on_message(self, topic: str, message: AbstractIncomingMessage) -> None:
        mid = message.message_id or ""
        if message.redelivered and mid in self.arrivals:
            # our own ack was lost with our connection: the broker's doing, not the worker's
            self.consumer_redeliveries += 1
        else:
            arrival = Arrival(time.time() * 1000, topic, message.body)
            self.arrivals[mid].append(arrival)
            self.total += 1
            if self.on_arrival is not None:
                self.on_arrival(mid, arrival)
        with contextlib.suppress(Exception):
            await message.ack()

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()


@contextlib.asynccontextmanager
async def deployment(
    h: Harness,
    scenario: str,
    *,
    proxy: Any = None,
    host: dict[str, str] | None = None,
    topics: int = TOPICS,
    **over: Any,
) -> AsyncIterator[tuple[DelaySettings, ChaosProcess, Sinks]]:
    prefix = h.unique(f"chaos-delay-{scenario}")
    s = settings_for(prefix, **over)
    sinks = Sinks([f"{prefix}.t{i}" for i in range(topics)])
    proc = h.process(["delay"], env=env_for(s, **(host or {})), proxy=proxy, name=scenario)
    try:
        await sinks.start(h.broker_url)
        h.scenario(scenario)["start_s"] = round(await proc.start(), 2)
        yield s, proc, sinks
    finally:
        await proc.stop()
        await sinks.close()
        await delete_names(
            h.broker_url,
            [s.in_exchange, s.dead_exchange, s.control_exchange, *sinks.names],
            [s.in_queue, s.dead_queue, s.control_queue, *sinks.names],
        )


@dataclass
class Msg:
    id: str
    topic: str
    kind: str
    published_ms: float  # wall clock before the first publish attempt
    due_lo_ms: int  # it must not arrive before this
    key: str | None = None
    attempts: int = 0
    confirmed: bool = False

    @property
    def body(self) -> bytes:
        return f"{self.id}|{self.topic}|{self.kind}".encode()


@dataclass
class Fault:
    start_ms: float
    end_ms: float
    kind: str  # "kill" or "link"


@dataclass
class Pair:
    old: str
    new: str


class Load:
    """Producers of delayed messages; the check of what the sinks received."""

    def __init__(
        self,
        h: Harness,
        s: DelaySettings,
        sinks: Sinks,
        scenario: str,
        *,
        producers: int = 3,
        pause: float = 0.005,
    ) -> None:
        self.h, self.s, self.sinks, self.scenario = h, s, sinks, scenario
        self.producers, self.pause = producers, pause
        self.stop_producing = asyncio.Event()
        self.msgs: dict[str, Msg] = {}
        self.pairs: list[Pair] = []
        self.replaces: dict[str, str] = {}  # new message id -> the old one of its pair
        self.faults: list[Fault] = []
        self.stats: Counter[str] = Counter()
        self._tasks: list[asyncio.Task[None]] = []
        self._conns: list[AbstractRobustConnection] = []
        self.started_ms = time.time() * 1000

    async def start(self) -> Load:
        conn = await aio_pika.connect_robust(self.h.broker_url)
        self._conns.append(conn)
        client = await DelayClient(conn, self.s).open()
        for j in range(self.producers):
            self._tasks.append(asyncio.create_task(self._produce(client, j)))
        return self

    def fault(self, start_ms: float, end_ms: float, kind: str) -> None:
        self.faults.append(Fault(start_ms, end_ms, kind))

    async def _send(self, client: DelayClient, m: Msg, **how: Any) -> None:
        self.msgs[m.id] = m
        self.h.ledger.sent(m.id)
        while True:  # at-least-once publisher: the same message_id until confirmed
            m.attempts += 1
            try:
                await asyncio.wait_for(
                    client.send(m.body, m.topic, message_id=m.id, **how), timeout=10
                )
                break
            except Exception:
                self.stats["publish_retries"] += 1
                await asyncio.sleep(0.2)
        m.confirmed = True
        self.stats[f"confirmed_{m.kind}"] += 1
        self.h.ledger.acknowledged(m.id, [m.topic])

    async def _produce(self, client: DelayClient, j: int) -> None:
        rng = random.Random(f"{self.h.seed}:{self.h.name}:{self.scenario}:p{j}")
        topics = self.sinks.names
        k = 0
        while not self.stop_producing.is_set():
            base = f"{self.scenario}-p{j}-{k}"
            k += 1
            topic = rng.choice(topics)
            r = rng.random()
            t0 = time.time() * 1000
            if r < 0.35:
                d = rng.randint(0, 3000)
                await self._send(client, Msg(base, topic, "delay", t0, int(t0) + d), delay_ms=d)
            elif r < 0.5:
                at = int(t0) - rng.randint(1, 600_000)
                await self._send(client, Msg(base, topic, "at_past", t0, at), deliver_at_ms=at)
            elif r < 0.7:
                at = int(t0) + rng.randint(200, 4000)
                await self._send(client, Msg(base, topic, "at_future", t0, at), deliver_at_ms=at)
            else:
                await self._pair(client, rng, base, topic)
            await asyncio.sleep(self.pause)

    async def _pair(self, client: DelayClient, rng: random.Random, base: str, topic: str) -> None:
        key = f"{base}-key"
        t0 = time.time() * 1000
        d = rng.randint(1500, 5000)
        old = Msg(f"{base}-old", topic, "keyed_old", t0, int(t0) + d, key=key)
        await self._send(client, old, delay_ms=d, key=key)
        await asyncio.sleep(rng.uniform(0.0, 0.5))
        topic2 = rng.choice(self.sinks.names)
        t1 = time.time() * 1000
        if rng.random() < 0.5:
            d2 = rng.randint(0, 500)
            new = Msg(f"{base}-new", topic2, "keyed_new", t1, int(t1) + d2, key=key)
            await self._send(client, new, delay_ms=d2, key=key)
        else:
            at = int(t1) - rng.randint(1, 60_000)
            new = Msg(f"{base}-new", topic2, "keyed_new", t1, at, key=key)
            await self._send(client, new, deliver_at_ms=at, key=key)
        self.pairs.append(Pair(old.id, new.id))
        self.replaces[new.id] = old.id
        self.h.ledger.acknowledged(old.id, [])  # replaced: owed nothing

    # -- the check ---------------------------------------------------------------------

    def missing(self) -> int:
        ledger, arrivals = self.h.ledger, self.sinks.arrivals
        return sum(
            1
            for mid in self.msgs
            for t in ledger.expected.get(mid, ())
            if not arrivals.get(mid) and not self._old_may_have_won(mid)
        )

    def _old_may_have_won(self, new: str) -> bool:
        old = self.replaces.get(new)
        if old is None or not self.sinks.arrivals.get(old):
            return False
        m = self.msgs[old]
        return self._fault_between(m.published_ms, self.sinks.arrivals[old][0].at_ms) is not None

    def _fault_between(self, lo_ms: float, hi_ms: float) -> Fault | None:
        for f in self.faults:
            if f.start_ms <= hi_ms and f.end_ms >= lo_ms:
                return f
        return None

    async def finish(self, timeout: float = 90.0) -> None:
        """Stop producing, wait for everything owed, then check the arrivals."""
        self.stop_producing.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        latest_due = max((m.due_lo_ms for m in self.msgs.values()), default=0)
        deadline = time.monotonic() + max(0.0, latest_due / 1000 - time.time()) + timeout
        while time.monotonic() < deadline:
            if not self.missing():
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(2.0)  # late duplicates arrive now
        self._check()
        self.h.scenario(self.scenario)["store_empty_at_end"] = await self._store_empty()

    def _check(self) -> None:
        h, ledger, msgs = self.h, self.h.ledger, self.msgs
        figures = h.scenario(self.scenario)
        early: list[str] = []
        wrong: list[str] = []
        lateness: dict[str, list[float]] = defaultdict(list)
        first: dict[str, float] = {}
        # replaced messages first: who won a pair decides what is owed
        pair_stats: Counter[str] = Counter()
        for pair in self.pairs:
            old, new = msgs[pair.old], msgs[pair.new]
            old_at = self.sinks.arrivals.get(pair.old)
            new_at = self.sinks.arrivals.get(pair.new)
            # a fault before both were durably consumed may have reordered them
            settled = max([a[0].at_ms for a in (old_at, new_at) if a] or [time.time() * 1000])
            fault = self._fault_between(old.published_ms, settled)
            if fault is not None:
                pair_stats["pairs_reorder_possible"] += 1
            if not old_at:
                pair_stats["replaced_not_delivered"] += 1
                continue
            if not new_at:
                if fault is not None:  # the worker consumed the old one last: it won
                    pair_stats["pairs_old_won_after_fault"] += 1
                    ledger.acknowledged(old.id, [old.topic])
                    ledger.acknowledged(new.id, [])
                else:
                    pair_stats["violation_old_delivered_new_never"] += 1
                    wrong.append(f"{old.id} delivered, its replacement {new.id} never")
                continue
            if old.due_lo_ms <= new_at[0].at_ms:
                pair_stats["replaced_delivered_in_flight"] += 1
            elif fault is not None:
                pair_stats["replaced_delivered_after_fault"] += 1
            else:
                pair_stats["violation_replaced_delivered"] += 1
                wrong.append(
                    f"{old.id} (due >= {old.due_lo_ms}) delivered although its replacement "
                    f"{new.id} arrived at {new_at[0].at_ms:.0f}, before it was due"
                )
        for mid, arrivals in self.sinks.arrivals.items():
            m = msgs.get(mid)
            if m is None:
                wrong.append(f"foreign message {mid!r} at {arrivals[0].topic}")
                continue
            for n, a in enumerate(arrivals):
                if a.at_ms < m.due_lo_ms:
                    early.append(f"{mid} ({m.kind}) {m.due_lo_ms - a.at_ms:.1f} ms early")
                if a.body != m.body or a.topic != m.topic:
                    wrong.append(f"{mid}: arrived at {a.topic} with body {a.body[:60]!r}")
                reason = None
                if n > 0:
                    reason = self._duplicate_reason(m, a.at_ms)
                ledger.delivered(mid, m.topic, reason)
            first[mid] = arrivals[0].at_ms
            # x-deliver-at in the past: due at once, so late from the publish start
            lateness[m.kind].append(arrivals[0].at_ms - max(m.due_lo_ms, m.published_ms))
        figures.update(self.stats)
        figures.update(pair_stats)
        figures["pairs"] = len(self.pairs)
        figures["consumer_redeliveries_ignored"] = self.sinks.consumer_redeliveries
        figures["missing_after_drain"] = self.missing()
        figures["early"] = len(early)
        figures["lateness_ms"] = {
            kind: {
                "n": len(xs),
                "p50": round(percentile(xs, 50), 1),
                "p99": round(percentile(xs, 99), 1),
                "max": round(max(xs), 1),
                "min": round(min(xs), 1),
            }
            for kind, xs in sorted(lateness.items())
        }
        figures["lateness_means"] = (
            "first arrival minus the earliest allowed time: for x-delay the publish start plus "
            "the delay (so it includes the time the message waited in delay.in), for "
            "x-deliver-at the given time, for x-deliver-at in the past the publish start"
        )
        h.check(not early, f"{self.scenario}: {len(early)} delivered early: {early[:5]}")
        h.check(not wrong, f"{self.scenario}: {len(wrong)} contract violations: {wrong[:5]}")

    def _duplicate_reason(self, m: Msg, at_ms: float) -> str | None:
        if m.attempts > 1:
            return PRODUCER
        fault = self._fault_between(m.published_ms, at_ms)
        if fault is None:
            return None
        return KILLED if fault.kind == "kill" else LINK

    async def _store_empty(self, timeout: float = 30.0) -> bool:
        """The worker's store holds nothing once everything owed arrived (control RPC)."""
        conn = await aio_pika.connect_robust(self.h.broker_url)
        try:
            client = await DelayClient(conn, self.s).open()
            deadline = time.monotonic() + timeout
            reply: dict[str, Any] = {}
            while time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    reply = await client.counts(timeout=5)
                    if reply.get("total") == 0:
                        return True
                await asyncio.sleep(0.5)
            self.h.fail(f"{self.scenario}: store not empty at the end: {reply}")
            return False
        finally:
            await conn.close()

    async def close(self) -> None:
        self.stop_producing.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in self._conns:
            with contextlib.suppress(Exception):
                await conn.close()


# -- scenarios ------------------------------------------------------------------------------

# Small batches and a short in-memory window, so kills land in every phase: ingress, the
# loader, pipelined publishes, deletes after confirms.
LOAD_SETTINGS: dict[str, Any] = {
    "lanes": 4,
    "batch": 50,
    "window_ms": 2000,
    "load_interval_s": 0.1,
}


async def kill9(h: Harness) -> None:
    async with deployment(h, "kill9", **LOAD_SETTINGS) as (s, proc, sinks):
        load = await Load(h, s, sinks, "kill9").start()
        try:
            t0 = time.monotonic()
            first_kill = len(h.kill_times)
            kills = await h.kill_loop(proc, h.kills, gap=(0.4, 2.0) if h.quick else (0.5, 3.0))
            for at in h.kill_times[first_kill:]:
                load.fault(at * 1000, at * 1000, "kill")
            figures = h.scenario("kill9")
            figures["kills"] = len(kills)
            figures["kills_during_startup"] = sum(1 for k in kills if k["phase"] == "startup")
            figures["restart_s_median"] = _median([k["ready_s"] for k in kills if "ready_s" in k])
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

        async def fault(coro: Any) -> None:
            start = time.time() * 1000
            result = await coro
            # only a dropped connection returns unacknowledged deliveries and loses confirms;
            # a stall the heartbeat did not notice and a slow link only delay them
            if result["kind"] == "cut" or result["went_down"]:
                load.fault(start, time.time() * 1000, "link")
            faults.append(result)

        try:
            await asyncio.sleep(1.0)
            for cycle in range(1 if h.quick else 3):
                await fault(_cut(h, proc, watch, proxy))
                await fault(_stall(h, proc, watch, proxy, h.rng.uniform(1.0, 2.5), "short"))
                if "stall_long" not in h.skip:
                    await fault(_stall(h, proc, watch, proxy, 30.0, "long"))
                await fault(_slow_link(h, proc, watch, proxy, sinks))
                h.progress(f"broker_link cycle {cycle + 1} done")
            await load.finish()
        finally:
            await watch.stop()
            await load.close()
        figures = h.scenario("broker_link")
        figures["faults"] = faults
        figures["same_process"] = proc.alive and proc.pid == pid and proc.starts == 1
        figures["not_ready_s"] = watch.not_ready_s
        figures["recoveries"] = watch.recoveries
        h.check(figures["same_process"], "broker_link: the worker was restarted or died")
        for f in faults:
            if f["kind"] in ("cut", "stall-long"):
                h.check(
                    f["went_down"] and f["came_back"],
                    f"broker_link: /readyz did not go false then true on {f['kind']}",
                )


async def _cut(h: Harness, proc: ChaosProcess, watch: Any, proxy: Any) -> dict[str, Any]:
    """Drop every connection and refuse new ones for a drawn while (the worker's host
    connection and every lane's)."""
    mark = len(watch.transitions)
    refuse = h.rng.uniform(0.5, 2.0)
    proxy.accepting = False
    proxy.cut()
    went_down = await _wait_ready_state(proc, False, 10)
    await asyncio.sleep(refuse)
    proxy.accepting = True
    t = time.monotonic()
    came_back = await _wait_ready_state(proc, True, 60)
    return {
        "kind": "cut",
        "refused_s": round(refuse, 2),
        "went_down": went_down,
        "came_back": came_back,
        "ready_again_s": round(time.monotonic() - t, 2),
        "transitions": watch.since(mark),
    }


async def _slow_link(
    h: Harness, proc: ChaosProcess, watch: Any, proxy: Any, sinks: Sinks
) -> dict[str, Any]:
    mark = len(watch.transitions)
    latency = h.rng.uniform(0.05, 0.2)
    seconds = 4.0 if h.quick else 8.0
    before = sinks.total
    proxy.latency = latency
    await asyncio.sleep(seconds)
    proxy.latency = 0.0
    return {
        "kind": "slow",
        "went_down": False,
        "latency_ms_each_way": round(latency * 1000),
        "seconds": seconds,
        "delivered_meanwhile": sinks.total - before,
        "stayed_ready": all(up for _, up in watch.since(mark)) and await proc.ready(),
        "transitions": watch.since(mark),
    }


async def broker_restart(h: Harness) -> None:
    async with deployment(h, "broker_restart", **LOAD_SETTINGS) as (s, proc, sinks):
        load = await Load(h, s, sinks, "broker_restart").start()
        watch = h.watch(proc)
        pid = proc.pid
        try:
            await asyncio.sleep(3)
            figures = h.scenario("broker_restart")
            start = time.time() * 1000
            figures.update(await h.broker_restart(h.rng.uniform(2.0, 5.0)))
            t = time.monotonic()
            figures["came_back"] = await _wait_ready_state(proc, True, 120)
            figures["ready_after_start_app_s"] = round(time.monotonic() - t, 2)
            load.fault(start, time.time() * 1000, "link")
            await asyncio.sleep(3)
            await load.finish(timeout=120)
        finally:
            await watch.stop()
            await load.close()
        figures["went_down"] = watch.went_down
        figures["transitions"] = watch.transitions
        figures["same_process"] = proc.alive and proc.pid == pid and proc.starts == 1
        h.check(figures["same_process"], "broker_restart: the worker was restarted or died")
        h.check(watch.went_down and figures["came_back"], "broker_restart: /readyz not false->true")


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
