"""Topics other than the target exchange (``BRIDGE_DELAY__TOPIC_BY``), and a state directory
written before topics were stored (schema version 1), with a real worker and broker."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import generate_latest

from tests.integration.delay.helpers import (
    dead_letters,
    delay_settings,
    delay_worker,
    header,
    make_sink,
    now_ms,
    wait_stored,
)
from tests.unit.delay.test_store import write_v1_file


async def test_tenant_header_names_the_topic_in_counts_list_metrics_and_delivery(
    broker_url, amqp, tmp_path, unique
):
    s = delay_settings(unique, topic_by="header:x-tenant", window_ms=1000)
    sink = await make_sink(amqp, unique, "shared")
    async with delay_worker(
        broker_url, tmp_path, s, amqp, exchanges=[sink.exchange], queues=[sink.queue]
    ) as (worker, client):
        due = now_ms() + 60_000
        for i, tenant in enumerate(["acme", "acme", "globex"]):
            await client.send(
                b"later",
                sink.exchange,
                deliver_at_ms=due + i,
                message_id=f"{tenant}-{i}",
                headers={"x-tenant": tenant},
            )
        await client.send(b"later", sink.exchange, deliver_at_ms=due, message_id="none")
        counts = await wait_stored(client, 4)
        assert counts["topics"] == {
            "acme": {"pending": 2, "next_due_ms": due},
            "globex": {"pending": 1, "next_due_ms": due + 2},
            sink.exchange: {"pending": 1, "next_due_ms": due},
        }
        page = await client.list("acme")
        assert [(m["id"], m["exchange"]) for m in page["messages"]] == [
            ("acme-0", sink.exchange),
            ("acme-1", sink.exchange),
        ]
        # the gauge follows the commit's bookkeeping on the worker's loop: poll it
        deadline = time.monotonic() + 10
        while 'bridge_delay_scheduled_messages{topic="acme"} 2.0' not in (
            generate_latest(worker.metrics.registry).decode()
        ):
            assert time.monotonic() < deadline, "scheduled gauge never showed acme's 2"
            await asyncio.sleep(0.05)
        assert (await client.cancel(message_id="globex-2"))["cancelled"]

        await client.send(b"now", sink.exchange, delay_ms=0, headers={"x-tenant": "acme"})
        got = await sink.wait_for(1)
        assert header(got[0].message, "x-tenant") == "acme"  # not a control header: kept
        text = generate_latest(worker.metrics.registry).decode()
        assert 'bridge_delay_lateness_seconds_count{topic="acme"} 1.0' in text


async def test_a_topic_sends_into_each_message_s_own_exchange_and_dead_letters_name_it(
    broker_url, amqp, tmp_path, unique
):
    s = delay_settings(unique, topic_by="header:x-tenant")
    a = await make_sink(amqp, unique, "a")
    b = await make_sink(amqp, unique, "b")
    missing = f"{unique}.missing"
    async with delay_worker(
        broker_url,
        tmp_path,
        s,
        amqp,
        exchanges=[a.exchange, b.exchange],
        queues=[a.queue, b.queue],
    ) as (_, client):
        at = now_ms() + 300
        for i, target in enumerate([a.exchange, b.exchange, missing, a.exchange]):
            await client.send(
                b"x",
                target,
                deliver_at_ms=at,
                message_id=f"m{i}",
                headers={"x-tenant": "acme"},
            )
        await a.wait_for(2)
        await b.wait_for(1)
        assert a.ids() == ["m0", "m3"] and b.ids() == ["m1"]
        dead = await dead_letters(amqp, s, 1)
        assert [(m.message_id, header(m, "x-target-exchange")) for m in dead] == [("m2", missing)]
        assert header(dead[0], "x-dead-reason") == "exchange_not_found"


async def test_exchange_and_routing_key_topics(broker_url, amqp, tmp_path, unique):
    s = delay_settings(unique, topic_by="exchange+routing_key")
    async with delay_worker(broker_url, tmp_path, s, amqp) as (_, client):
        due = now_ms() + 60_000
        await client.send(b"x", "orders", deliver_at_ms=due, routing_key="eu.created")
        await client.send(b"x", "orders", deliver_at_ms=due, routing_key="us.created")
        await client.send(b"x", "orders", deliver_at_ms=due, routing_key="eu.created")
        counts = await wait_stored(client, 3)
        assert {t: c["pending"] for t, c in counts["topics"].items()} == {
            "orders/eu.created": 2,
            "orders/us.created": 1,
        }


async def test_a_state_dir_of_schema_version_1_opens_and_delivers(
    broker_url, amqp, tmp_path, unique
):
    s = delay_settings(unique)
    sink = await make_sink(amqp, unique, "old")
    late = now_ms() + 3_600_000
    write_v1_file(tmp_path / "delay", [(1, now_ms() - 5_000, sink.exchange), (2, late, "billing")])
    async with delay_worker(
        broker_url, tmp_path, s, amqp, exchanges=[sink.exchange], queues=[sink.queue]
    ) as (worker, client):
        assert worker.store is not None and worker.store.db.migrated_from == 1
        got = await sink.wait_for(1)
        assert got[0].message.message_id == "m1" and got[0].message.body == b"hi"
        counts = await wait_stored(client, 1)
        assert counts["topics"] == {"billing": {"pending": 1, "next_due_ms": late}}
        page = await client.list("billing")
        assert [(m["id"], m["exchange"]) for m in page["messages"]] == [("m2", "billing")]
        # and new messages go on being stored and delivered next to the old ones
        await client.send(b"new", sink.exchange, delay_ms=0, message_id="m3")
        await sink.wait_for(2)
        assert sink.ids() == ["m1", "m3"]
