"""The load of the ``delay`` suite: producers of delayed messages with confirms and resends, the
consumers of the target topics, and the ledger entries they make."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter, defaultdict
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from bench.chaos.delay.deployment import KILLED, LINK, PRODUCER, Fault, Msg, Pair, Sinks
from bench.chaos.harness import Harness
from bench.harness.stats import percentile
from workers.delay.client import DelayClient
from workers.delay.config import DelaySettings


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
