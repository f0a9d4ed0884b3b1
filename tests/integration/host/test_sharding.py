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


async def test_ring_repair_restores_shard_order(chx_broker, unique):
    broker_url = chx_broker
    conn = await aio_pika.connect_robust(broker_url)
    try:
        ch = await conn.channel()
        ex = await ch.declare_exchange(f"{unique}.chx", CHX_TYPE, auto_delete=True)
        names = [f"{unique}.q{i}" for i in range(4)]
        queues = [await ch.declare_queue(n, exclusive=True) for n in names]
        for i in (2, 0, 3, 1):  # bound out of order
            await queues[i].bind(ex, "1")
        keys = [f"k{i}" for i in range(120)]
        before = await route(ch, ex, queues, keys)
        assert any(before[k] != chx_bucket(k, 4) for k in keys)

        ring = RingKeeper(lambda: conn.channel(), ex.name, names, worker="test")
        # two shards repairing at the same time still end in shard order
        await asyncio.gather(
            ring.repair("test"),
            RingKeeper(lambda: conn.channel(), ex.name, names, worker="test").repair("test"),
        )
        after = await route(ch, ex, queues, keys)
        assert all(after[k] == chx_bucket(k, 4) for k in keys)
    finally:
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
