"""What other replicas say, seen by one gateway on the real broker: counts and sticky records
from a peer are applied, bad peer messages are counted and ignored (never fatal), and a
sticky stream deleted under a running gateway is declared and read again."""

from __future__ import annotations

import asyncio
import json
import time

import aio_pika
import pytest

from tests.integration.gateway.helpers import gateway_settings, running_gateway, wait_until

pytestmark = pytest.mark.integration


def sticky_doc(records: list[list[object]], boot: str = "peer-boot") -> bytes:
    return json.dumps(
        {"v": 1, "op": "sticky", "replica": "gw-x", "boot": boot, "records": records}
    ).encode()


def counts_doc(seq: int, counts: object, **extra: object) -> bytes:
    doc = {
        "v": 1,
        "op": "counts",
        "replica": "gw-x",
        "boot": "peer-boot",
        "seq": seq,
        "sent": time.time(),
        "counts": counts,
        **extra,
    }
    return json.dumps(doc).encode()


async def test_peer_counts_sticky_records_and_bad_input(broker_url, amqp, tmp_path, unique):
    s = gateway_settings(unique, peer_report_s=0.2, peer_ttl_s=2.0)
    async with running_gateway(broker_url, tmp_path, s) as gw:
        worker = gw.worker
        channel = await amqp.channel()
        peers = await channel.get_exchange(s.peers_exchange_name)

        async def to_peers(body: bytes) -> None:
            await peers.publish(aio_pika.Message(body), routing_key="")

        async def to_stream(body: bytes) -> None:
            await channel.default_exchange.publish(
                aio_pika.Message(body), routing_key=s.sticky_stream_name
            )

        def kinds() -> dict[str, float]:
            out: dict[str, float] = {}
            for family in worker.metrics.peer_messages.collect():
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        out[sample.labels["kind"]] = sample.value
            return out

        # Bad input on both channels: counted as malformed, the gateway carries on.
        for bad in (
            b"not json",
            b"[1, 2]",
            counts_doc(1, {"s1": -3}),
            counts_doc(1, {"bad server id!": 1}),
            counts_doc(1, "nope"),
            counts_doc(1, {"s1": 1}, op="explode"),
        ):
            await to_peers(bad)
        for bad in (
            b"\xff\xfe",
            sticky_doc([["k", "s1"]]),
            sticky_doc([["", "s1", time.time()]]),
            sticky_doc([["k", "s1", "yesterday"]]),
            sticky_doc([["k", "../etc", time.time()]]),
        ):
            await to_stream(bad)
        await wait_until(lambda: kinds().get("malformed", 0) >= 11, "bad messages counted")
        assert worker.balancer.replicas(time.monotonic()) == []
        assert worker.balancer.sticky_record("k") is None

        # A peer's counts steer the choice: s1 looks busy, so a new client goes to s2.
        await to_peers(counts_doc(5, {"s1": 7}))
        await wait_until(lambda: worker.balancer.replicas(time.monotonic()) == ["gw-x"], "peer")
        await to_peers(counts_doc(4, {"s1": 0}))  # older: ignored
        await wait_until(lambda: kinds().get("stale", 0) >= 1, "stale report counted")
        client = await gw.connect()
        assert client.server == "s2"
        # ... and the peer's sticky record beats least-loaded for its client_id.
        await to_stream(sticky_doc([["k", "s1", time.time()]]))
        await wait_until(lambda: worker.balancer.sticky_record("k") is not None, "record")
        sticky = await gw.connect(client_id="k")
        assert sticky.server == "s1"

        # The peer leaves: its counts go at once.
        await to_peers(
            json.dumps(
                {"v": 1, "op": "leave", "replica": "gw-x", "boot": "peer-boot", "seq": 6}
            ).encode()
        )
        await wait_until(lambda: worker.balancer.replicas(time.monotonic()) == [], "peer gone")

        # Someone deletes the sticky stream: the gateway declares it again and reads on.
        await channel.queue_delete(s.sticky_stream_name)
        channel = await amqp.channel()

        async def learnt_after_delete() -> bool:
            try:
                await channel.declare_queue(s.sticky_stream_name, passive=True)
            except Exception:
                return False
            # On its own connection, retried: RabbitMQ 3.10 crashes the channel of a publish
            # into a stream declared a moment ago (function_clause in osiris_writer:write
            # with the writer still `none`) and closes that connection with 541; the gateway
            # declares the stream again within milliseconds of the delete.
            try:
                async with await aio_pika.connect(broker_url) as conn:
                    publisher = await conn.channel()
                    await publisher.default_exchange.publish(
                        aio_pika.Message(sticky_doc([["k2", "s2", time.time()]], "peer-boot-2")),
                        routing_key=s.sticky_stream_name,
                    )
            except Exception:
                return False
            return True

        deadline = time.monotonic() + 30
        while not await learnt_after_delete():
            assert time.monotonic() < deadline, "stream never declared again"
            channel = await amqp.channel()
            await asyncio.sleep(0.1)
        await wait_until(
            lambda: worker.balancer.sticky_record("k2") is not None, "read on", timeout=30
        )
        await client.bye()
        await sticky.bye()
