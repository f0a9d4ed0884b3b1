"""The delay worker against a real RabbitMQ: the wire contract end to end."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sqlite3

import aio_pika
import pytest

from bridge.amqp.frames import Double, Properties
from bridge.amqp.link import Link
from bridge.amqp.publisher import Publisher
from tests.integration.delay.helpers import (
    dead_letters,
    delay_settings,
    delay_worker,
    header,
    make_sink,
    now_ms,
    wait_stored,
)
from workers.delay.wire import CONTROL_HEADERS

pytestmark = pytest.mark.integration


async def test_delays_honoured_in_due_then_arrival_order_never_early(
    broker_url, amqp, tmp_path, unique
):
    s = delay_settings(unique, batch=3)
    sink = await make_sink(amqp, unique, "orders")
    async with delay_worker(
        broker_url, tmp_path, s, amqp, exchanges=[sink.exchange], queues=[sink.queue]
    ) as (_, client):
        base = now_ms() + 600
        plan = []  # (deliver_at, arrival index)
        for i in range(24):
            at = base + (i * 7 % 4) * 150  # four due times, interleaved arrivals
            plan.append((at, i))
            await client.send(
                b"m%d" % i, sink.exchange, deliver_at_ms=at, message_id=f"m{i}", routing_key="rk.a"
            )
        # and relative delays
        sent_at = now_ms()
        await client.send(b"r", sink.exchange, delay_ms=300, message_id="rel")
        got = await sink.wait_for(25)
        by_id = {r.message.message_id: r for r in got}
        for at, i in plan:
            assert by_id[f"m{i}"].at_ms >= at, "delivered before its x-deliver-at"
        assert by_id["rel"].at_ms >= sent_at + 300, "delivered before its x-delay"
        order = [r.message.message_id for r in got if r.message.message_id != "rel"]
        assert order == [f"m{i}" for _, i in sorted(plan)], "not in (due, arrival) order"
        assert {r.message.routing_key for r in got if r.message.message_id != "rel"} == {"rk.a"}
        lateness = sorted(by_id[f"m{i}"].at_ms - at for at, i in plan)
        print(f"lateness ms: min={lateness[0]:.1f} max={lateness[-1]:.1f}")


async def test_properties_and_headers_preserved_control_headers_removed(
    broker_url, amqp, tmp_path, unique
):
    s = delay_settings(unique)
    sink = await make_sink(amqp, unique, "props")
    async with delay_worker(
        broker_url, tmp_path, s, amqp, exchanges=[sink.exchange], queues=[sink.queue]
    ) as (_, client):
        stamp = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
        user_headers = {
            "x-app": "billing",
            "n": 42,
            "big": 2**40,
            "f": 1.5,
            "flag": True,
            "nested": {"a": [1, "two"]},
        }
        await client.send(
            b"\x00\x01payload",
            sink.exchange,
            delay_ms=50,
            key="invoice-7",
            routing_key="eu.invoices",
            message_id="p-1",
            headers=user_headers,
            content_type="application/octet-stream",
            content_encoding="gzip",
            correlation_id="corr-9",
            reply_to="somewhere",
            priority=3,
            expiration=3600,
            timestamp=stamp,
            type="invoice.created",
            app_id="billing-svc",
            user_id="guest",
        )
        # A message without a message_id gets a stable one at ingress.
        await client.send(b"bare", sink.exchange, delay_ms=0, delivery_mode=1)
        got = await sink.wait_for(2)
        m = next(r.message for r in got if r.message.message_id == "p-1")
        assert m.body == b"\x00\x01payload"
        assert m.routing_key == "eu.invoices"
        assert m.exchange == sink.exchange
        assert m.content_type == "application/octet-stream"
        assert m.content_encoding == "gzip"
        assert m.correlation_id == "corr-9"
        assert m.reply_to == "somewhere"
        assert m.priority == 3
        assert m.expiration == 3600
        assert m.timestamp == stamp
        assert m.type == "invoice.created"
        assert m.app_id == "billing-svc"
        assert m.user_id == "guest"
        assert m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert dict(m.headers) == user_headers
        assert not set(CONTROL_HEADERS) & set(m.headers)
        bare = next(r.message for r in got if r.message.body == b"bare")
        assert bare.message_id and bare.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT
        assert not bare.headers


async def test_a_64_bit_float_header_crosses_the_worker_bit_for_bit(
    broker_url, amqp, tmp_path, unique
):
    """A producer's ``d`` (64-bit float) header arrives as a ``d`` with the same value: the
    worker decodes and re-encodes the headers it stores, and a 32-bit ``f`` would round it."""
    s = delay_settings(unique)
    sink = await make_sink(amqp, unique, "double")
    value = 0.1 + 2**-40  # not representable in 32 bits
    link = Link(broker_url, name=f"{unique}-producer")
    publisher = Publisher(link, name="producer")
    async with delay_worker(
        broker_url, tmp_path, s, amqp, exchanges=[sink.exchange], queues=[sink.queue]
    ) as _:
        await link.start()
        try:
            headers = {"x-delay": 0, "x-target-exchange": sink.exchange, "price": Double(value)}
            props = Properties(message_id="d-1", headers=headers)
            await publisher.publish(s.in_exchange, "rk", b"d", props)
        finally:
            await link.close()
        got = await sink.wait_for(1)
        assert header(got[0].message, "price") == value


BAD_INPUTS = [
    ("invalid_delay", {"x-delay": "soon"}),
    ("invalid_delay", {"x-delay": "-5 ms"}),
    ("ambiguous_delay", {"x-delay": 10, "x-deliver-at": 1}),
    ("missing_delay", {}),
    ("missing_target", {"x-delay": 10, "x-target-exchange": None}),
    ("beyond_horizon", {"x-delay": 120_000}),
    ("invalid_key", {"x-delay": 10, "x-delay-key": ""}),
]


async def test_every_dead_letter_reason_while_valid_traffic_continues(
    broker_url, amqp, tmp_path, unique
):
    s = delay_settings(unique, horizon_ms=60_000)
    sink = await make_sink(amqp, unique, "ok")
    lonely = f"{unique}.lonely"  # exists, nothing bound: unroutable
    missing = f"{unique}.missing"  # never declared
    ch = await amqp.channel()
    await ch.declare_exchange(lonely, "direct", durable=True)
    async with delay_worker(
        broker_url,
        tmp_path,
        s,
        amqp,
        exchanges=[sink.exchange, lonely],
        queues=[sink.queue],
    ) as (worker, client):
        in_ex = await ch.get_exchange(s.in_exchange)
        valid = 0
        for i, (_, headers) in enumerate(BAD_INPUTS):
            hdrs = {"x-target-exchange": sink.exchange, **headers}
            hdrs = {k: v for k, v in hdrs.items() if v is not None}
            await in_ex.publish(
                aio_pika.Message(b"bad%d" % i, headers=hdrs, message_id=f"bad{i}"), "rk.bad"
            )
            await client.send(b"good", sink.exchange, delay_ms=20, message_id=f"good{valid}")
            valid += 1
        await client.send(b"u", lonely, delay_ms=30, message_id="unroutable-1", key="ku")
        await client.send(b"x", missing, delay_ms=30, message_id="missing-1")
        for i in range(3):
            await client.send(b"x", missing, delay_ms=0, message_id=f"missing-more-{i}")
        # a name RabbitMQ allows but pamqp would not encode (space, non-ASCII): still sent,
        # so the broker's 404 dead-letters it instead of a retry loop in the lane
        weird = f"{unique} missing ü"
        await client.send(b"w", weird, delay_ms=0, message_id="weird-1")
        await client.send(b"good", sink.exchange, delay_ms=60, message_id=f"good{valid}")
        valid += 1

        expected = len(BAD_INPUTS) + 1 + 5
        dead = await dead_letters(amqp, s, expected, timeout=15)
        reasons = sorted(header(m, "x-dead-reason") for m in dead)
        assert reasons == sorted(
            [r for r, _ in BAD_INPUTS] + ["unroutable"] + ["exchange_not_found"] * 5
        ), reasons
        strange = next(m for m in dead if m.message_id == "weird-1")
        assert header(strange, "x-target-exchange") == weird
        for m in dead:
            assert header(m, "x-dead-detail"), "every dead letter explains itself"
            if m.message_id and m.message_id.startswith("bad"):
                assert m.routing_key == "rk.bad"
        unroutable = next(m for m in dead if m.message_id == "unroutable-1")
        assert header(unroutable, "x-target-exchange") == lonely
        assert header(unroutable, "x-delay-key") == "ku"
        assert isinstance(header(unroutable, "x-deliver-at"), int)
        gone = next(m for m in dead if m.message_id == "missing-1")
        assert header(gone, "x-target-exchange") == missing
        # valid traffic kept flowing, and the lanes survived the channel closures
        got = await sink.wait_for(valid)
        assert sorted(r.message.message_id for r in got) == sorted(f"good{i}" for i in range(valid))
        await client.send(b"after", sink.exchange, delay_ms=0, message_id="after")
        await sink.wait_for(valid + 1)
        # A consumer can see a message before the worker has its confirm and has committed
        # the delete; nothing stays stored for long.
        for _ in range(100):
            if (await client.counts())["total"] == 0:
                break
            await asyncio.sleep(0.05)
        assert (await client.counts())["total"] == 0
        ok, reason = worker.ready()
        assert ok, reason


async def test_cancel_by_message_id_and_key_and_replace_by_key(broker_url, amqp, tmp_path, unique):
    s = delay_settings(unique)
    sink = await make_sink(amqp, unique, "cancel")
    async with delay_worker(
        broker_url, tmp_path, s, amqp, exchanges=[sink.exchange], queues=[sink.queue]
    ) as (_, client):
        await client.send(b"a", sink.exchange, delay_ms=1500, message_id="a")
        await client.send(b"b", sink.exchange, delay_ms=1500, message_id="b", key="kb")
        await client.send(b"c1", sink.exchange, delay_ms=1500, message_id="c1", key="kc")
        await client.send(b"c2", sink.exchange, delay_ms=1500, message_id="c2", key="kc")
        await client.send(b"d", sink.exchange, delay_ms=1500, message_id="d")
        await wait_stored(client, 4)
        assert await client.cancel(message_id="a") == {"cancelled": True, "count": 1}
        assert await client.cancel(key="kb") == {"cancelled": True, "count": 1}
        assert await client.cancel(message_id="a") == {
            "cancelled": False,
            "state": "sent_or_unknown",
        }
        assert (await client.cancel(key="never"))["cancelled"] is False
        got = await sink.wait_for(2)
        await asyncio.sleep(0.3)  # nothing else may follow
        assert sorted(r.message.message_id for r in got) == ["c2", "d"]
        replaced = next(r.message for r in got if r.message.message_id == "c2")
        assert replaced.body == b"c2"
        assert await client.cancel(message_id="d") == {
            "cancelled": False,
            "state": "sent_or_unknown",
        }
        assert (await client.counts())["total"] == 0


async def test_cancel_while_the_message_waits_for_its_commit(broker_url, amqp, tmp_path, unique):
    """A cancel that finds a message stored before the ingress's shared commit has put it
    into the window (its waiters run when the linger ends): the cancel waits for them, so the
    message is taken out of the window and never sent (the window keeps the row it was
    stored with: an entry admitted after the cancel's look would be sent)."""
    s = delay_settings(unique, ingress_commit_linger_ms=400)
    sink = await make_sink(amqp, unique, "cancel-early")
    async with delay_worker(
        broker_url, tmp_path, s, amqp, exchanges=[sink.exchange], queues=[sink.queue]
    ) as (worker, client):
        await client.send(b"a", sink.exchange, delay_ms=1000, message_id="early")
        channel = await amqp.channel()
        for _ in range(100):  # consumed (unacknowledged: the commit lingers)
            declared = await channel.declare_queue(s.in_queue, passive=True)
            if declared.declaration_result.message_count == 0:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert len(worker.scheduler) == 0, "admitted already: the race is not exercised"
        assert await client.cancel(message_id="early") == {"cancelled": True, "count": 1}
        await client.send(b"b", sink.exchange, delay_ms=1000, message_id="after")
        got = await sink.wait_for(1, timeout=10)
        await asyncio.sleep(0.3)
        assert [r.message.message_id for r in got] == ["after"]
        await channel.close()


async def test_a_fast_producer_is_not_held_back_by_the_commit_linger(
    broker_url, amqp, tmp_path, unique
):
    """Messages due in an hour may wait up to INGRESS_COMMIT_LINGER_MAX_MS for their commit
    (ten minutes here), but a commit is asked for at once when PREFETCH / 4 deliveries wait:
    the broker stops delivering at PREFETCH unacknowledged, so without that the ingress
    would stall for the whole linger."""
    s = delay_settings(unique, prefetch=8, ingress_commit_linger_max_ms=600_000)
    async with delay_worker(broker_url, tmp_path, s, amqp) as (_, client):
        far = now_ms() + 3_600_000
        for i in range(30):
            await client.send(b"x", "topic.far", deliver_at_ms=far + i, message_id=f"f{i}")
        total = 0
        for _ in range(200):
            total = (await client.counts())["total"]
            if total >= 24:
                break
            await asyncio.sleep(0.05)
        # every third delivery asks for the commit; the last one or two may wait their linger
        assert total >= 24, f"only {total} of 30 stored: the linger held the ingress back"


async def test_replace_by_key_outside_the_memory_window(broker_url, amqp, tmp_path, unique):
    # A tiny window: the first message is only in SQLite when its replacement arrives.
    s = delay_settings(unique, window_ms=100, window_max_entries=5)
    sink = await make_sink(amqp, unique, "far")
    async with delay_worker(
        broker_url, tmp_path, s, amqp, exchanges=[sink.exchange], queues=[sink.queue]
    ) as (worker, client):
        await client.send(b"old", sink.exchange, delay_ms=1200, message_id="old", key="k1")
        await client.send(b"x", sink.exchange, delay_ms=1200, message_id="x")
        await wait_stored(client, 2)
        assert len(worker.scheduler) == 0, "the window must not hold them yet"
        await client.send(b"new", sink.exchange, delay_ms=900, message_id="new", key="k1")
        await wait_stored(client, 2)
        # cancel by key beyond the window, too
        await client.send(b"far", sink.exchange, delay_ms=1000, message_id="far", key="k2")
        await wait_stored(client, 3)
        assert await client.cancel(key="k2") == {"cancelled": True, "count": 1}
        got = await sink.wait_for(2, timeout=10)
        assert [r.message.message_id for r in got] == ["new", "x"]
        assert worker.metrics.replaced._value.get() == 1


async def test_counts_and_list_pages(broker_url, amqp, tmp_path, unique):
    s = delay_settings(unique, window_ms=100)
    async with delay_worker(broker_url, tmp_path, s, amqp) as (_, client):
        base = now_ms() + 60_000
        for i in range(7):
            await client.send(
                b"x" * i, "topic.a", deliver_at_ms=base + i, message_id=f"a{i}", key=f"k{i}"
            )
        await client.send(b"y", "topic.b", deliver_at_ms=base + 100, message_id="b0")
        counts = await wait_stored(client, 8)
        assert counts["topics"] == {
            "topic.a": {"pending": 7, "next_due_ms": base},
            "topic.b": {"pending": 1, "next_due_ms": base + 100},
        }
        seen, after = [], None
        while True:
            page = await client.list("topic.a", limit=3, after=after)
            assert "error" not in page, page
            seen.extend(page["messages"])
            after = page["next"]
            if after is None:
                break
        assert [m["id"] for m in seen] == [f"a{i}" for i in range(7)]
        assert [m["size"] for m in seen] == list(range(7))
        assert seen[2]["key"] == "k2" and seen[2]["due_ms"] == base + 2
        assert (await client.list("nope"))["messages"] == []
        errors = [
            await client.control(b"not json"),
            await client.control({"op": "explode"}),
            await client.control({"op": "cancel"}),
            await client.control({"op": "list"}),
            await client.control({"op": "list", "topic": "t", "after": "garbage"}),
        ]
        assert [e["error"]["code"] for e in errors] == [
            "bad_json",
            "unknown_op",
            "invalid_request",
            "invalid_request",
            "invalid_request",
        ]


async def test_control_without_reply_to_is_dead_lettered(broker_url, amqp, tmp_path, unique):
    s = delay_settings(unique)
    async with delay_worker(broker_url, tmp_path, s, amqp) as (_, client):
        ch = await amqp.channel()
        ex = await ch.get_exchange(s.control_exchange)
        await ex.publish(aio_pika.Message(b'{"op": "counts"}', message_id="q1"), "")
        dead = await dead_letters(amqp, s, 1)
        assert [header(m, "x-dead-reason") for m in dead] == ["missing_reply_to"]
        assert (await client.counts())["total"] == 0


async def test_target_exchange_deleted_while_in_use(broker_url, amqp, tmp_path, unique):
    # The lane knows the exchange (a confirmed publish), then it disappears while a batch is
    # pipelined to it: the broker closes the channel (possibly the connection); the lane
    # recovers, proves the exchange missing with a single publish, dead-letters the batch.
    s = delay_settings(unique, lanes=1, batch=50)
    sink = await make_sink(amqp, unique, "vanishing")
    other = await make_sink(amqp, unique, "steady")
    async with delay_worker(
        broker_url,
        tmp_path,
        s,
        amqp,
        exchanges=[sink.exchange, other.exchange],
        queues=[sink.queue, other.queue],
    ) as (worker, client):
        await client.send(b"first", sink.exchange, delay_ms=0, message_id="first")
        await sink.wait_for(1)
        ch = await amqp.channel()
        await ch.exchange_delete(sink.exchange)
        at = now_ms() + 300
        for i in range(30):
            await client.send(b"v", sink.exchange, deliver_at_ms=at, message_id=f"v{i}")
        await client.send(b"s", other.exchange, deliver_at_ms=at, message_id="steady")
        dead = await dead_letters(amqp, s, 30, timeout=20)
        assert sorted(m.message_id for m in dead) == sorted(f"v{i}" for i in range(30))
        assert {header(m, "x-dead-reason") for m in dead} == {"exchange_not_found"}
        await other.wait_for(1)
        await client.send(b"later", other.exchange, delay_ms=0, message_id="later")
        await other.wait_for(2)
        # a row goes once its publish is confirmed and the delete committed, just after
        # the sink got the message: wait for that commit
        for _ in range(100):
            if (await client.counts())["total"] == 0:
                break
            await asyncio.sleep(0.05)
        assert (await client.counts())["total"] == 0
        assert worker.ready()[0]


async def test_target_exchange_the_broker_refuses_is_dead_lettered_after_bounded_retries(
    broker_url, amqp, tmp_path, unique
):
    """A target exchange the worker's user may not publish to (403 access_refused; here the
    internal exchange every vhost has, which nobody may publish to): retried
    ACCESS_REFUSED_ATTEMPTS times, then dead-lettered ``access_refused``; a message for
    another topic due at the same time is delivered, on the only lane."""
    from workers.delay.config import ACCESS_REFUSED_ATTEMPTS

    s = delay_settings(unique, lanes=1)
    other = await make_sink(amqp, unique, "steady")
    refused = "amq.rabbitmq.trace"
    async with delay_worker(
        broker_url, tmp_path, s, amqp, exchanges=[other.exchange], queues=[other.queue]
    ) as (worker, client):
        at = now_ms() + 200
        for i in range(3):
            await client.send(b"r", refused, deliver_at_ms=at, message_id=f"r{i}")
        await client.send(b"s", other.exchange, deliver_at_ms=at, message_id="steady")
        dead = await dead_letters(amqp, s, 3, timeout=30)
        assert sorted(m.message_id for m in dead) == ["r0", "r1", "r2"]
        assert {header(m, "x-dead-reason") for m in dead} == {"access_refused"}
        detail = header(dead[0], "x-dead-detail")
        assert f"refused {ACCESS_REFUSED_ATTEMPTS} times in a row" in detail, detail
        assert refused in detail
        await other.wait_for(1)
        # the topic stays refused: the next message is dead-lettered at its first refusal
        await client.send(b"r", refused, delay_ms=0, message_id="r3")
        (late,) = await dead_letters(amqp, s, 1, timeout=30)
        assert late.message_id == "r3" and header(late, "x-dead-reason") == "access_refused"
        await client.send(b"later", other.exchange, delay_ms=0, message_id="later")
        await other.wait_for(2)
        assert worker.ready()[0]


async def test_not_ready_while_commits_fail_then_recovers(broker_url, amqp, tmp_path, unique):
    s = delay_settings(unique)
    sink = await make_sink(amqp, unique, "disk")
    async with delay_worker(
        broker_url, tmp_path, s, amqp, exchanges=[sink.exchange], queues=[sink.queue]
    ) as (worker, client):
        committer = worker.committer
        assert committer is not None
        real_apply = committer.apply

        def disk_full(conn, items):
            raise sqlite3.OperationalError("database or disk is full")

        committer.apply = disk_full
        await client.send(b"x", sink.exchange, delay_ms=0, message_id="while-failing")
        for _ in range(100):
            if not worker.ready()[0]:
                break
            await asyncio.sleep(0.02)
        ok, reason = worker.ready()
        assert not ok and "disk is full" in reason
        assert sink.got == [], "nothing is delivered before it is stored"
        committer.apply = real_apply
        await sink.wait_for(1, timeout=10)
        assert worker.ready()[0]


async def test_metrics_and_admin_views(broker_url, amqp, tmp_path, unique):
    from prometheus_client import generate_latest

    s = delay_settings(unique)
    sink = await make_sink(amqp, unique, "metrics")
    async with delay_worker(
        broker_url, tmp_path, s, amqp, exchanges=[sink.exchange], queues=[sink.queue]
    ) as (worker, client):
        await client.send(b"a", sink.exchange, delay_ms=0, message_id="a")
        await client.send(b"b", sink.exchange, delay_ms=60_000, message_id="b")
        await client.send(b"c", sink.exchange, delay_ms=60_000, message_id="c", key="k")
        await client.send(b"d", sink.exchange, delay_ms=60_000, message_id="d", key="k")
        # missing delay (raw: the client refuses to send what the worker would refuse)
        channel = await amqp.channel()
        ingress = await channel.get_exchange(s.in_exchange)
        await ingress.publish(
            aio_pika.Message(b"e", headers={"x-target-exchange": sink.exchange}, message_id="e"),
            routing_key="",
        )
        await channel.close()
        await sink.wait_for(1)
        await wait_stored(client, 2)
        assert (await client.cancel(message_id="b"))["cancelled"]
        text = generate_latest(worker.metrics.registry).decode()
        for line in (
            'bridge_delay_received_total{outcome="accepted"} 4.0',
            'bridge_delay_received_total{outcome="rejected"} 1.0',
            "bridge_delay_published_total 1.0",
            'bridge_delay_dead_letters_total{reason="missing_delay"} 1.0',
            "bridge_delay_cancelled_total 1.0",
            "bridge_delay_replaced_total 1.0",
            f'bridge_delay_scheduled_messages{{topic="{sink.exchange}"}} 1.0',
            f'bridge_delay_lateness_seconds_count{{topic="{sink.exchange}"}} 1.0',
            f'bridge_delay_lateness_seconds_bucket{{le="0.0001",topic="{sink.exchange}"}}',
            'bridge_delay_lane_busy_seconds_total{lane="0"}',
        ):
            assert line in text, line
        summary = worker.admin("summary")
        assert summary["stored"] == 1 and len(summary["lanes"]) == s.lanes
        assert worker.admin("topics") == {sink.exchange: 1}
        assert worker.admin("nope") is None


async def test_cli_helpers(broker_url, amqp, tmp_path, unique, monkeypatch, capsys):
    from bridge.cli import main

    s = delay_settings(unique)
    sink = await make_sink(amqp, unique, "cli")
    monkeypatch.setenv("BRIDGE_AMQP_URL", broker_url)
    monkeypatch.setenv("BRIDGE_DELAY__IN_EXCHANGE", s.in_exchange)
    monkeypatch.setenv("BRIDGE_DELAY__CONTROL_EXCHANGE", s.control_exchange)
    async with delay_worker(
        broker_url, tmp_path, s, amqp, exchanges=[sink.exchange], queues=[sink.queue]
    ) as (_, client):

        async def run(*argv: str) -> dict:
            capsys.readouterr()
            assert await asyncio.to_thread(main, list(argv)) == 0
            return json.loads(capsys.readouterr().out)

        sent = await run(
            "delay", "send", "--to", sink.exchange, "--delay-ms", "60000", "--key", "k", "hello"
        )
        assert sent["sent"] is True
        await wait_stored(client, 1)
        counts = await run("delay", "counts")
        assert counts["topics"][sink.exchange]["pending"] == 1
        listed = await run("delay", "list", sink.exchange)
        assert [m["id"] for m in listed["messages"]] == [sent["message_id"]]
        assert (await run("delay", "cancel", "--key", "k"))["cancelled"] is True
        await run("delay", "send", "--to", sink.exchange, "--delay-ms", "0", "now")
        got = await sink.wait_for(1)
        assert got[0].message.body == b"now"


async def test_batch_written_in_windows_keeps_order_and_matches_returns_by_publish(
    broker_url, amqp, tmp_path, unique
):
    """One topic's batch larger than the publish window, due at one instant, goes out in
    due-then-arrival order; within it, publishes that share a message id and are partly
    unroutable (returned under ``mandatory``) are told apart: aiormq matches a return to
    its publish by message id, so the lane sends such publishes in separate waves."""
    s = delay_settings(unique, publish_window=16, batch=100)
    channel = await amqp.channel()
    target = f"{unique}.direct"
    exchange = await channel.declare_exchange(target, "direct", durable=True)
    queue = await channel.declare_queue(f"{target}.q", durable=True)
    await queue.bind(exchange, "ok")
    async with delay_worker(
        broker_url, tmp_path, s, amqp, exchanges=[target], queues=[f"{target}.q"]
    ) as (_, client):
        due = now_ms() + 1500
        sent: list[tuple[str, str, bytes]] = []  # (routing key, message id, body)
        for i in range(60):  # ids unique: several windows of 16 in one batch
            sent.append(("ok", f"u{i}", b"u%d" % i))
        for i in range(6):  # one id shared, every other one unroutable
            sent.append(("ok" if i % 2 == 0 else "nowhere", "shared", b"s%d" % i))
        for i in range(40):
            sent.append(("ok", f"v{i}", b"v%d" % i))
        for routing_key, message_id, body in sent:
            await client.send(
                body, target, deliver_at_ms=due, routing_key=routing_key, message_id=message_id
            )
        routable = [body for rk, _, body in sent if rk == "ok"]
        got: list[bytes] = []
        async with queue.iterator(no_ack=True) as it:
            async for message in it:
                got.append(message.body)
                if len(got) == len(routable):
                    break
        assert got == routable, "due time, then arrival order, across windows and waves"
        dead = await dead_letters(amqp, s, 3, timeout=15)
        assert sorted(m.body for m in dead) == [b"s1", b"s3", b"s5"]
        assert {header(m, "x-dead-reason") for m in dead} == {"unroutable"}
        assert all(m.message_id == "shared" for m in dead)
        for _ in range(100):
            if (await client.counts())["total"] == 0:
                break
            await asyncio.sleep(0.05)
        assert (await client.counts())["total"] == 0


async def test_a_missing_exchange_in_a_packed_turn_sends_no_other_topic_twice(
    broker_url, amqp, tmp_path, unique
):
    """Topics due at one instant share a lane turn (LANE_PACK). The first publish to an
    exchange that does not exist makes the broker close the lane's channel; the other
    topics' publishes must not be in flight on it then (routed, their confirms lost, and
    sent again: twice). Each topic here is new to the worker, so each batch is a probe."""
    s = delay_settings(unique, lane_pack=100, lanes=1, lane_grow_ms=0)
    sinks = [await make_sink(amqp, unique, f"t{i}") for i in range(8)]
    missing = f"{unique}.t4-missing"  # sorts among the sinks' names: in the middle of the turn
    async with delay_worker(
        broker_url,
        tmp_path,
        s,
        amqp,
        exchanges=[sink.exchange for sink in sinks],
        queues=[sink.queue for sink in sinks],
    ) as (_, client):
        at = now_ms() + 1000
        for sink in sinks:
            for n in range(3):
                await client.send(
                    b"m", sink.exchange, deliver_at_ms=at, message_id=f"{sink.exchange}-{n}"
                )
        await client.send(b"x", missing, deliver_at_ms=at, message_id="missing")
        dead = await dead_letters(amqp, s, 1, timeout=15)
        assert header(dead[0], "x-dead-reason") == "exchange_not_found"
        for sink in sinks:
            await sink.wait_for(3)
        await asyncio.sleep(1.0)  # a message sent twice would arrive by now
        for sink in sinks:
            assert sorted(sink.ids()) == [f"{sink.exchange}-{n}" for n in range(3)], sink.ids()
