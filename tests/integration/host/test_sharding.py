"""bridge.sharding computes the consistent-hash exchange's routing exactly: checked against
the broker's own routing, and the ring repair restores shard order from any binding order."""

from __future__ import annotations

import asyncio
import random

import aio_pika
import pytest

from bridge.amqp.frames import Properties
from bridge.amqp.link import Link
from bridge.amqp.publisher import Publisher
from bridge.ring import RingKeeper
from bridge.sharding import CHX_TYPE, chx_bucket, chx_header_bucket, header_hash_typed

pytestmark = [pytest.mark.integration]


async def route(channel, exchange, queues, keys: list[str]) -> dict[str, int]:
    for key in keys:
        await exchange.publish(aio_pika.Message(key.encode()), routing_key=key)
    got: dict[str, int] = {}
    deadline = asyncio.get_running_loop().time() + 10
    while len(got) < len(keys) and asyncio.get_running_loop().time() < deadline:
        for i, q in enumerate(queues):
            while (m := await q.get(no_ack=True, fail=False)) is not None:
                got[m.body.decode()] = i
        await asyncio.sleep(0.05)
    assert len(got) == len(keys)
    return got


@pytest.mark.parametrize("shards", [2, 3, 5])
async def test_python_routing_matches_the_broker(chx_broker, unique, shards):
    broker_url = chx_broker
    conn = await aio_pika.connect(broker_url)
    try:
        ch = await conn.channel()
        ex = await ch.declare_exchange(f"{unique}.chx", CHX_TYPE, auto_delete=True)
        queues = []
        for i in range(shards):
            q = await ch.declare_queue(f"{unique}.q{i}", exclusive=True)
            await q.bind(ex, "1")
            queues.append(q)
        rng = random.Random(shards)
        keys = [f"cdn-{rng.randrange(10**6):06d}" for _ in range(150)]
        keys += ["", "é", "中文-target", "x" * 255, "node-1", "node-10"]
        keys = list(dict.fromkeys(keys))
        got = await route(ch, ex, queues, keys)
        wrong = {
            k: (got[k], chx_bucket(k, shards)) for k in keys if got[k] != chx_bucket(k, shards)
        }
        assert not wrong
    finally:
        await conn.close()


async def _ring_fixture(ch, unique: str, n: int = 4):
    ex = await ch.declare_exchange(f"{unique}.chx", CHX_TYPE)
    names = [f"{unique}.q{i}" for i in range(n)]
    # not exclusive: the keeper binds them from a connection of its own
    queues = [await ch.declare_queue(name) for name in names]
    return ex, names, queues


async def _drop(ch, ex, names) -> None:
    for name in names:
        await ch.queue_delete(name)
    await ch.exchange_delete(ex.name)


async def test_ring_repair_restores_shard_order(chx_broker, unique):
    conn = await aio_pika.connect_robust(chx_broker)
    ch = await conn.channel()
    ex, names, queues = await _ring_fixture(ch, unique)
    try:
        for i in (2, 0, 3):  # bound out of order, queue 1 not at all (as a restored queue)
            await queues[i].bind(ex, "1")
        keys = [f"k{i}" for i in range(120)]
        before = await route(ch, ex, queues[:1] + queues[2:], keys)
        assert any(before[k] != chx_bucket(k, 4) for k in keys)

        # two shards repairing at the same time end in shard order, every queue in the ring
        await asyncio.gather(
            RingKeeper(chx_broker, ex.name, names, worker="test").repair("test"),
            RingKeeper(chx_broker, ex.name, names, worker="test").repair("test"),
        )
        after = await route(ch, ex, queues, keys)
        assert all(after[k] == chx_bucket(k, 4) for k in keys)
    finally:
        await _drop(ch, ex, names)
        await conn.close()


async def test_ring_repairs_never_overlap(chx_broker, unique):
    """Rounds of two keepers repairing at once: every queue stays in the ring (on RabbitMQ
    3.10 overlapping unbind/bind pairs leave a queue bound but without a bucket), and a
    repair waits while another connection holds the ring lock."""
    conn = await aio_pika.connect_robust(chx_broker)
    ch = await conn.channel()
    ex, names, queues = await _ring_fixture(ch, unique)
    keepers = [RingKeeper(chx_broker, ex.name, names, worker=f"test{i}") for i in range(2)]
    keys = [f"k{i}" for i in range(40)]
    assert {chx_bucket(k, 4) for k in keys} == {0, 1, 2, 3}
    holder = await aio_pika.connect(chx_broker)
    try:
        for _ in range(15):
            await asyncio.gather(*(k.repair("test") for k in keepers))
            got = await route(ch, ex, queues, keys)
            assert all(got[k] == chx_bucket(k, 4) for k in keys)

        await (await holder.channel()).declare_queue(keepers[0].lock_queue, exclusive=True)
        await queues[0].unbind(ex, "1")  # queue 0 out of the ring while the lock is held
        waiting = asyncio.create_task(keepers[0].repair("test"))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        with pytest.raises(TimeoutError, match="ring-lock"):
            await RingKeeper(chx_broker, ex.name, names, worker="t", lock_wait_s=0.2).repair("test")
        got = await route(ch, ex, queues[1:], keys)  # nothing reaches queue 0 yet
        assert set(got.values()) == {0, 1, 2}
        await holder.close()  # the lock goes with the connection
        await asyncio.wait_for(waiting, 10)
        got = await route(ch, ex, queues, keys)
        assert all(got[k] == chx_bucket(k, 4) for k in keys)
    finally:
        if not holder.is_closed:
            await holder.close()
        await _drop(ch, ex, names)
        await conn.close()


@pytest.mark.parametrize("shards", [2, 3])
async def test_python_header_routing_matches_the_broker(chx_broker, unique, shards):
    """hash-header: the broker hashes the header's typed value; strings, bytes that are not
    UTF-8 (long strings) and byte arrays each route as chx_header_bucket says."""
    conn = await aio_pika.connect(chx_broker)
    try:
        ch = await conn.channel()
        ex = await ch.declare_exchange(
            f"{unique}.chx", CHX_TYPE, auto_delete=True, arguments={"hash-header": "x-k"}
        )
        queues = []
        for i in range(shards):
            q = await ch.declare_queue(f"{unique}.q{i}", exclusive=True)
            await q.bind(ex, "1")
            queues.append(q)
        rng = random.Random(shards)
        values: list[object] = [f"order-{rng.randrange(10**6)}" for _ in range(60)]
        values += ["", "é", "中文", "x" * 255, b"\xff\xfe-raw", bytearray(b"order-7")]
        values += [bytearray(f"b-{i}".encode()) for i in range(20)]
        # published through the project's data path: it writes str and bytes as long strings
        # and bytearray as a byte array (aio-pika cannot send the last two)
        link = Link(chx_broker, name="test")
        publisher = Publisher(link)
        await link.start()
        typed = header_hash_typed(link.server_properties.get("version"))
        try:
            for i, value in enumerate(values):
                await publisher.publish(
                    ex.name, "rk", str(i).encode(), Properties(headers={"x-k": value})
                )
        finally:
            await link.close()
        got: dict[int, int] = {}
        deadline = asyncio.get_running_loop().time() + 10
        while len(got) < len(values) and asyncio.get_running_loop().time() < deadline:
            for q_index, q in enumerate(queues):
                while (m := await q.get(no_ack=True, fail=False)) is not None:
                    got[int(m.body)] = q_index
            await asyncio.sleep(0.05)
        assert len(got) == len(values)
        wrong = {
            repr(v): (got[i], chx_header_bucket(v, shards, typed=typed))
            for i, v in enumerate(values)
            if got[i] != chx_header_bucket(v, shards, typed=typed)
        }
        assert not wrong
    finally:
        await conn.close()
