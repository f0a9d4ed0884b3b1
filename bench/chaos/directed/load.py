"""The ``directed`` worker under fault: its deployment and the load (producers and pullers) that
records into the harness ledger."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aio_pika

from bench.chaos.harness import ChaosProcess, Harness
from bench.harness.broker import delete_names
from bench.harness.procs import settings_env
from workers.directed.client import DirectedClient
from workers.directed.config import DirectedSettings

TARGETS = [f"node-{i:02d}" for i in range(16)]
RESENT = (
    "batch re-sent under the same record_id (redelivered=true): target pulled without acknowledging"
)


def settings_for(prefix: str, **overrides: Any) -> DirectedSettings:
    names = {
        field: f"{prefix}.{default}"
        for field, default in (
            ("requests_exchange", "requests"),
            ("requests_queue", "requests"),
            ("pull_exchange", "pull"),
            ("pull_queue", "pull"),
            ("control_exchange", "control"),
            ("control_queue", "control"),
            ("dead_exchange", "dead"),
            ("dead_queue", "dead"),
        )
    }
    return DirectedSettings(**{**names, "queue_limit": 100_000, **overrides})


def env_for(s: DirectedSettings, **host: str) -> dict[str, str]:
    out = settings_env("directed", s, DirectedSettings.model_fields)
    out.update({f"BRIDGE_{k.upper()}": v for k, v in host.items()})
    return out


@contextlib.asynccontextmanager
async def deployment(
    h: Harness, scenario: str, *, proxy: Any = None, host: dict[str, str] | None = None, **over: Any
) -> AsyncIterator[tuple[DirectedSettings, ChaosProcess]]:
    s = settings_for(h.unique(f"chaos-{scenario}"), housekeeping_interval_s=0.2, **over)
    proc = h.process(["directed"], env=env_for(s, **(host or {})), proxy=proxy, name=scenario)
    try:
        h.scenario(scenario)["start_s"] = round(await proc.start(), 2)
        yield s, proc
    finally:
        await proc.stop()
        await delete_names(
            h.broker_url,
            [s.requests_exchange, s.pull_exchange, s.control_exchange, s.dead_exchange],
            [s.requests_queue, s.pull_queue, s.control_queue, s.dead_queue],
        )


class Load:
    """Producers and pullers for one scenario, recording into the harness ledger."""

    def __init__(
        self,
        h: Harness,
        s: DirectedSettings,
        scenario: str,
        *,
        producers: int = 3,
        pause: float = 0.01,
    ) -> None:
        self.h, self.s, self.scenario = h, s, scenario
        self.producers, self.pause = producers, pause
        self.stop_producing = asyncio.Event()
        self.done = asyncio.Event()
        self.keys: set[str] = set()
        self.origin: dict[str, tuple[int, int]] = {}  # message id -> (producer, sequence)
        self.order: dict[str, list[str]] = {t: [] for t in TARGETS}
        self.stats: Counter[str] = Counter()
        self.pull_errors: Counter[str] = Counter()
        self._tasks: list[asyncio.Task[None]] = []
        self._rpc_generation = 0
        self._reopen = asyncio.Lock()
        self._conns: list[aio_pika.abc.AbstractRobustConnection] = []

    async def _client(self) -> DirectedClient:
        conn = await aio_pika.connect_robust(self.h.broker_url)
        self._conns.append(conn)
        return await DirectedClient(conn, self.s).open()

    async def start(self) -> Load:
        send = await self._client()
        pull = await self._client()
        for j in range(self.producers):
            self._tasks.append(asyncio.create_task(self._produce(send, j)))
        for target in TARGETS:
            self._tasks.append(asyncio.create_task(self._pull(pull, target)))
        return self

    async def _produce(self, client: DirectedClient, j: int) -> None:
        rng = random.Random(f"{self.h.seed}:{self.h.name}:{self.scenario}:p{j}")
        k = 0
        while not self.stop_producing.is_set():
            mid = f"{self.scenario}-p{j}-{k}"
            targets = sorted(rng.sample(TARGETS, rng.randint(1, 4)))
            self.h.ledger.sent(mid)
            self.keys.add(mid)
            while True:  # at-least-once publisher: the same message_id until confirmed
                try:
                    await asyncio.wait_for(
                        client.send(b"%s body" % mid.encode(), targets, message_id=mid), 10
                    )
                    break
                except Exception:
                    self.stats["publish_retries"] += 1
                    await asyncio.sleep(0.2)
            self.h.ledger.acknowledged(mid, targets)
            self.origin[mid] = (j, k)
            self.stats["confirmed"] += 1
            k += 1
            await asyncio.sleep(self.pause)

    async def _pull(self, client: DirectedClient, target: str) -> None:
        rng = random.Random(f"{self.h.seed}:{self.h.name}:{self.scenario}:{target}")
        record: str | None = None
        seen_records: set[str] = set()
        ledger = self.h.ledger
        failures = 0
        while not self.done.is_set():
            started = time.monotonic()
            generation = self._rpc_generation
            try:
                reply = await client.pull(target, record, max=20, wait_ms=400, timeout=3)
            except Exception:
                self.stats["pull_timeouts"] += 1  # worker down or reconnecting: same cursor
                failures += 1
                if failures >= 3:
                    await self._reopen_rpc(client, generation)
                    failures = 0
                await asyncio.sleep(0.1)
                continue
            failures = 0
            self.stats["pulls"] += 1
            if "error" in reply:
                self.pull_errors[reply["error"].get("code", "?")] += 1
                await asyncio.sleep(0.2)
                continue
            rid, redelivered = reply["record_id"], reply["redelivered"]
            repeat = rid in seen_records
            if redelivered:
                self.stats["redelivered_replies"] += 1
                if not repeat:  # its first reply was lost (worker killed, reply dropped)
                    self.stats["lost_replies_recovered"] += 1
            for m in reply["messages"]:
                if ledger.delivered(m["id"], target, RESENT if repeat and redelivered else None):
                    self.order[target].append(m["id"])
            if rid is not None:
                seen_records.add(rid)
                if rng.random() < 0.03:
                    self.stats["re_pulls_without_ack"] += 1
                    continue  # like a target that crashed before processing the batch
            record = rid
            if rid is None and time.monotonic() - started < 0.05:
                await asyncio.sleep(0.05)
        with contextlib.suppress(Exception):  # acknowledge the last batch
            if record is not None:
                await client.pull(target, record, max=0, timeout=5)

    async def _reopen_rpc(self, client: DirectedClient, generation: int) -> None:
        """Consume direct reply-to again on a new channel.

        bridge.rpc.RpcClient consumes ``amq.rabbitmq.reply-to`` through ``get_queue(...,
        ensure=False)``, which aio-pika's robust channel does not restore after a
        reconnect: after a broker restart every call times out until this.
        """
        async with self._reopen:
            if generation != self._rpc_generation:
                return  # another puller did it
            with contextlib.suppress(Exception):
                await client.rpc.close()
            with contextlib.suppress(Exception):
                await client.rpc.open()
                self._rpc_generation += 1
                self.stats["rpc_client_reopened"] += 1

    def missing(self) -> int:
        ledger = self.h.ledger
        return sum(
            1 for mid in self.keys for t in ledger.expected.get(mid, ()) if not ledger.has(mid, t)
        )

    async def finish(self, timeout: float = 90.0) -> None:
        """Stop producing, let the pullers catch up, stop them, check order and statuses."""
        self.stop_producing.set()
        await asyncio.sleep(0.5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.missing():
                break
            await asyncio.sleep(0.2)
        self.done.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        figures = self.h.scenario(self.scenario)
        figures.update(self.stats)
        figures["pull_errors"] = dict(self.pull_errors)
        figures["missing_after_drain"] = self.missing()
        figures["order_violations"] = self._order_violations()
        self.h.check(figures["order_violations"] == 0, f"{self.scenario}: order violated")
        figures["status_checked"] = await self._statuses()

    def _order_violations(self) -> int:
        bad = 0
        for ids in self.order.values():
            last: dict[int, int] = {}
            for mid in ids:
                j, k = self.origin.get(mid, (-1, -1))
                if k < last.get(j, -1):
                    bad += 1
                last[j] = max(k, last.get(j, -1))
        return bad

    async def _statuses(self, sample: int = 200) -> int:
        """Every target acknowledged what it got, and each request was applied once."""
        client = await self._client()
        rng = random.Random(f"{self.h.seed}:{self.scenario}:status")
        keys = sorted(k for k in self.keys if k in self.h.ledger.expected)
        checked = 0
        for mid in rng.sample(keys, min(sample, len(keys))):
            reply = await client.status(mid, timeout=10)
            status = reply.get("status") or {}
            want = len(self.h.ledger.expected[mid])
            if not (status.get("total") == want and status.get("acked") == want):
                self.h.fail(f"{self.scenario}: status of {mid} is {reply}, expected {want} acked")
            checked += 1
        return checked

    async def close(self) -> None:
        self.stop_producing.set()
        self.done.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in self._conns:
            with contextlib.suppress(Exception):
                await conn.close()


# -- scenarios ------------------------------------------------------------------------------
