"""kill -9 of the delay worker process while messages are pending and due: after restarts
every message is delivered, never early; duplicates only for publishes in flight at a kill,
and a duplicate carries the original message_id and body."""

from __future__ import annotations

import asyncio
import collections
import random
import time

import aio_pika
import pytest

from bench.harness.procs import WorkerProcess
from tests.integration.delay.helpers import cleanup, delay_settings, env_for, make_sink
from workers.delay.client import DelayClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_kill9_during_pending_and_due_messages(broker_url, tmp_path, unique):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"seed={seed}")
    s = delay_settings(unique, lanes=4, batch=50, window_ms=1500, window_max_entries=400)
    proc = WorkerProcess(
        ["delay"],
        broker_url=broker_url,
        state_dir=tmp_path / "state",
        env=env_for(s),
        log=tmp_path / "worker.log",
    )
    conn = await aio_pika.connect_robust(broker_url)
    sink = await make_sink(conn, unique, "crash")
    try:
        proc.start().wait_ready()
        client = await DelayClient(conn, s).open()
        total = 1500
        earliest: dict[str, float] = {}  # message id -> earliest allowed arrival (epoch ms)
        kills = 0

        async def killer(stop: asyncio.Event) -> None:
            nonlocal kills
            while not stop.is_set():
                await asyncio.sleep(rng.uniform(0.4, 1.0))
                if stop.is_set():
                    return
                await asyncio.to_thread(proc.kill9)
                kills += 1
                proc.start()
                await asyncio.to_thread(proc.wait_ready)

        stop = asyncio.Event()
        kill_task = asyncio.create_task(killer(stop))
        for i in range(total):
            mid = f"c-{i}"
            kind = i % 3
            sent = time.time() * 1000
            if kind == 0:  # due now
                await client.send(mid.encode(), sink.exchange, delay_ms=0, message_id=mid)
                earliest[mid] = sent
            elif kind == 1:  # due soon, relative
                delay = rng.randint(300, 2500)
                await client.send(mid.encode(), sink.exchange, delay_ms=delay, message_id=mid)
                earliest[mid] = sent + delay
            else:  # absolute, a bit later
                at = int(sent) + rng.randint(1000, 4000)
                await client.send(mid.encode(), sink.exchange, deliver_at_ms=at, message_id=mid)
                earliest[mid] = at
            if i % 100 == 0:
                await asyncio.sleep(0.02)
        deadline = time.monotonic() + 60
        while len({r.message.message_id for r in sink.got}) < total:
            assert time.monotonic() < deadline, (
                f"{len({r.message.message_id for r in sink.got})} of {total} delivered "
                f"(seed {seed}); log: {proc.log.read_text()[-2000:]}"
            )
            await asyncio.sleep(0.1)
        stop.set()
        await kill_task
        await asyncio.sleep(0.5)  # late duplicates, if any, arrive now
        assert kills >= 2, "the test must actually kill the worker"

        ids = [r.message.message_id for r in sink.got]
        assert set(ids) == set(earliest), f"lost or foreign messages (seed {seed})"
        dupes = {m: n for m, n in collections.Counter(ids).items() if n > 1}
        # in flight at a kill: at most one batch per lane
        assert sum(n - 1 for n in dupes.values()) <= kills * s.lanes * s.batch
        for r in sink.got:
            mid = r.message.message_id
            assert mid is not None
            assert r.message.body == mid.encode(), "a duplicate must be the same message"
            assert r.at_ms >= earliest[mid], f"{mid} delivered early (seed {seed})"
        print(f"kills={kills} delivered={len(ids)} duplicates={sum(dupes.values()) - len(dupes)}")
        assert (await client.counts())["total"] == 0
        await client.close()
    finally:
        if proc.proc and proc.proc.poll() is None:
            proc.terminate()
        await conn.close()
        await cleanup(broker_url, s, [sink.exchange], [sink.queue])


async def test_sigterm_drains_without_loss_or_duplicates(broker_url, tmp_path, unique):
    s = delay_settings(unique, lanes=2, batch=50)
    proc = WorkerProcess(
        ["delay"],
        broker_url=broker_url,
        state_dir=tmp_path / "state",
        env=env_for(s),
        log=tmp_path / "worker.log",
    )
    conn = await aio_pika.connect_robust(broker_url)
    sink = await make_sink(conn, unique, "drain")
    try:
        proc.start().wait_ready()
        client = await DelayClient(conn, s).open()
        total = 600
        for i in range(total):
            await client.send(b"x", sink.exchange, delay_ms=(i % 2) * 1500, message_id=f"d-{i}")
            if i == total // 2:
                assert await asyncio.to_thread(proc.terminate) == 0, proc.log.read_text()[-2000:]
                proc.start()
        await asyncio.to_thread(proc.wait_ready)
        await sink.wait_for(total, timeout=30)
        await asyncio.sleep(0.5)
        ids = [r.message.message_id for r in sink.got]
        assert sorted(ids) == sorted(f"d-{i}" for i in range(total)), "lost or duplicated"
        await client.close()
    finally:
        if proc.proc and proc.proc.poll() is None:
            proc.terminate()
        await conn.close()
        await cleanup(broker_url, s, [sink.exchange], [sink.queue])
