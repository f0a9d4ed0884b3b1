"""kill -9 of the directed worker process during load: nothing acknowledged is lost,
nothing is applied twice, no target skips or repeats an acknowledged message."""

from __future__ import annotations

import asyncio
import random

import aio_pika
import pytest

from tests.integration.directed.helpers import cleanup, directed_process, directed_settings
from workers.directed.client import DirectedClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_kill9_during_requests_and_pulls(broker_url, tmp_path, unique):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"seed={seed}")
    s = directed_settings(unique, queue_limit=1000)
    proc = directed_process(broker_url, tmp_path, s)
    conn = await aio_pika.connect_robust(broker_url)
    try:
        proc.start().wait_ready()
        client = await DirectedClient(conn, s).open()
        targets = [f"n{i}" for i in range(12)]
        expected: dict[str, list[str]] = {t: [] for t in targets}
        total = 400
        kills = 0

        async def killer(stop: asyncio.Event) -> None:
            nonlocal kills
            while not stop.is_set():
                await asyncio.sleep(rng.uniform(0.2, 0.6))
                if stop.is_set():
                    return
                await asyncio.to_thread(proc.kill9)
                kills += 1
                proc.start()
                await asyncio.to_thread(proc.wait_ready)

        stop = asyncio.Event()
        kill_task = asyncio.create_task(killer(stop))
        for i in range(total):
            chosen = rng.sample(targets, rng.randint(1, len(targets)))
            await client.send(
                b"body-%d" % i, chosen, message_id=f"req-{i}"
            )  # confirmed by the broker
            for t in chosen:
                expected[t].append(f"req-{i}")
            if i % 50 == 0:
                await asyncio.sleep(0.05)

        # pull everything while the killer keeps going; on a timeout retry with the same cursor
        received: dict[str, list[str]] = {t: [] for t in targets}

        async def drain(target: str) -> None:
            record = None
            idle = 0
            while idle < 3:
                try:
                    reply = await client.pull(target, record, max=7, timeout=3)
                except TimeoutError:
                    continue  # worker was killed: retry with the same record id
                assert "error" not in reply, reply
                if reply["record_id"] != record:
                    # new batch, or (redelivered) a batch whose first reply died with the worker
                    received[target].extend(m["id"] for m in reply["messages"])
                record = reply["record_id"]
                if record is None:
                    idle += 1
                    await asyncio.sleep(0.2)
                else:
                    idle = 0

        await asyncio.gather(*(drain(t) for t in targets))
        stop.set()
        await kill_task
        assert kills >= 2, "the test must actually kill the worker"
        for t in targets:
            assert received[t] == expected[t], f"target {t}: order/loss/duplication (seed {seed})"
        for i in rng.sample(range(total), 20):
            status = (await client.status(f"req-{i}"))["status"]
            assert status["pending"] == 0 and status["acked"] == status["total"]
        await client.close()
    finally:
        if proc.proc and proc.proc.poll() is None:
            proc.terminate()
        await conn.close()
        await cleanup(broker_url, s)
