"""The directed worker against a real RabbitMQ: the wire contract end to end."""

from __future__ import annotations

import asyncio
import base64
import json

import aio_pika
import pytest

from tests.integration.directed.helpers import (
    dead_letters,
    directed,
    directed_settings,
    wait_applied,
)
from workers.directed.client import decode_messages
from workers.directed.config import ENVELOPE_CONTENT_TYPE

pytestmark = pytest.mark.integration


async def test_full_flow_several_targets_pull_concurrently(broker_url, amqp, tmp_path, unique):
    s = directed_settings(unique)
    async with directed(broker_url, tmp_path, s, amqp) as (_, client):
        targets = [f"node-{i}" for i in range(5)]
        for i in range(8):
            await client.send(
                f"payload-{i}".encode(),
                targets,
                message_id=f"m{i}",
                content_type="text/plain",
                headers={"x-app": "cdn", "n": i},
            )
        await wait_applied(client, "m7")

        async def drain(target: str) -> list[tuple[str, bytes, dict]]:
            got, record = [], None
            while True:
                reply = await client.pull(target, record, max=3)
                assert "error" not in reply, reply
                assert reply["topic"] == target
                assert reply["redelivered"] is False
                for m in reply["messages"]:
                    got.append((m["id"], base64.b64decode(m["body"]), m))
                record = reply["record_id"]
                if record is None:
                    return got

        results = await asyncio.gather(*(drain(t) for t in targets))
        for got in results:
            assert [g[0] for g in got] == [f"m{i}" for i in range(8)]
            assert [g[1] for g in got] == [f"payload-{i}".encode() for i in range(8)]
            assert got[0][2]["content_type"] == "text/plain"
            assert got[3][2]["headers"] == {"x-app": "cdn", "n": 3}
        status = (await client.status("m0"))["status"]
        assert status["total"] == 5 and status["acked"] == 5 and status["pending"] == 0
        assert status["state"] == "done"


async def test_mismatching_record_id_resends_same_batch(broker_url, amqp, tmp_path, unique):
    s = directed_settings(unique)
    async with directed(broker_url, tmp_path, s, amqp) as (_, client):
        for i in range(3):
            await client.send(b"x%d" % i, ["a", "b"], message_id=f"r{i}")
        await wait_applied(client, "r2")
        first = await client.pull("a", None, max=2)
        assert [m["id"] for m in first["messages"]] == ["r0", "r1"]
        again = await client.pull("a", "not-the-record", max=2)
        assert again["redelivered"] is True
        assert again["record_id"] == first["record_id"]
        assert [m["id"] for m in again["messages"]] == ["r0", "r1"]
        null_again = await client.pull("a", None, max=5)
        assert null_again["redelivered"] is True and null_again["record_id"] == first["record_id"]
        nxt = await client.pull("a", first["record_id"], max=2)
        assert nxt["redelivered"] is False
        assert [m["id"] for m in nxt["messages"]] == ["r2"]
        assert nxt["record_id"] not in (None, first["record_id"])
        # max 0 with the matching record id acknowledges without fetching
        done = await client.pull("a", nxt["record_id"], max=0)
        assert done["record_id"] is None and done["messages"] == []
        status = (await client.status("r0"))["status"]
        assert status["acked"] == 1 and status["pending"] == 1  # b has not pulled
        assert (await client.pull("a", None, max=5))["messages"] == []


async def test_ttl_expiry_counts_and_skips(broker_url, amqp, tmp_path, unique):
    s = directed_settings(unique)
    async with directed(broker_url, tmp_path, s, amqp) as (_, client):
        await client.send(b"short", ["a", "b", "c"], message_id="short", ttl_ms=300)
        await client.send(b"long", ["a", "b", "c"], message_id="long")
        await wait_applied(client, "long")
        got = await client.pull("a", None, max=5)
        assert [m["id"] for m in got["messages"]] == ["short", "long"]
        await client.pull("a", got["record_id"], max=0)
        await asyncio.sleep(0.6)
        reply = await client.pull("b", None, max=5)
        assert [m["id"] for m in reply["messages"]] == ["long"]
        status = (await client.status("short"))["status"]
        assert status == {**status, "acked": 1, "expired": 2, "pending": 0, "state": "expired"}


async def test_overflow_drop_head(broker_url, amqp, tmp_path, unique):
    s = directed_settings(unique, queue_limit=3)
    async with directed(broker_url, tmp_path, s, amqp) as (_, client):
        for i in range(5):
            await client.send(b"o", ["t"], message_id=f"o{i}")
        await wait_applied(client, "o4")
        reply = await client.pull("t", None, max=10)
        assert [m["id"] for m in reply["messages"]] == ["o2", "o3", "o4"]
        status = (await client.status("o0"))["status"]
        assert status["dropped"] == 1 and status["pending"] == 0


async def test_overflow_reject_dead_letters_whole_request(broker_url, amqp, tmp_path, unique):
    s = directed_settings(unique, queue_limit=2, overflow="reject")
    async with directed(broker_url, tmp_path, s, amqp) as (_, client):
        for i in range(2):
            await client.send(b"o", ["full", "other"], message_id=f"k{i}")
        await client.send(b"too much", ["other2", "full"], message_id="k2")
        dead = await dead_letters(amqp, s, 1)
        assert len(dead) == 1
        assert dead[0].headers["x-dead-reason"] == "queue_full"
        assert dead[0].body == b"too much" and dead[0].message_id == "k2"
        assert "error" in await client.status("k2")
        assert (await client.pull("other2", None, max=5))["messages"] == []


async def test_duplicate_message_id_applied_once(broker_url, amqp, tmp_path, unique):
    s = directed_settings(unique)
    async with directed(broker_url, tmp_path, s, amqp) as (_, client):
        await client.send(b"once", ["a", "b"], message_id="dup")
        await client.send(b"once", ["a", "b"], message_id="dup")
        await client.send(b"other", ["a"], message_id="after")
        await wait_applied(client, "after")
        reply = await client.pull("a", None, max=10)
        assert [m["id"] for m in reply["messages"]] == ["dup", "after"]
        assert (await client.status("dup"))["status"]["total"] == 2


async def test_long_poll_wakes_on_new_message(broker_url, amqp, tmp_path, unique):
    s = directed_settings(unique)
    async with directed(broker_url, tmp_path, s, amqp) as (_, client):
        loop = asyncio.get_running_loop()
        started = loop.time()
        waiting = asyncio.create_task(client.pull("lp", None, max=5, wait_ms=5000))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await client.send(b"wake", ["lp"], message_id="wake")
        reply = await waiting
        assert [m["id"] for m in reply["messages"]] == ["wake"]
        assert loop.time() - started < 5.0, "the pull should return on arrival, not at the timeout"
        empty = await client.pull("nobody", None, max=5, wait_ms=200)
        assert empty["messages"] == [] and empty["record_id"] is None


async def test_envelope_for_large_target_lists(broker_url, amqp, tmp_path, unique):
    s = directed_settings(unique)
    async with directed(broker_url, tmp_path, s, amqp) as (_, client):
        targets = [f"cdn-{i:05d}" for i in range(5000)]
        await client.send(b"big fan-out", targets, message_id="env", content_type="text/plain")
        status = await wait_applied(client, "env")
        assert status["total"] == 5000 and status["pending"] == 5000
        reply = await client.pull("cdn-04999", None, max=1)
        assert decode_messages(reply) == [("env", b"big fan-out")]
        assert reply["messages"][0]["content_type"] == "text/plain"


BAD_REQUESTS = [
    ({}, b"no targets", None, "missing_targets"),
    ({"x-targets": []}, b"empty", None, "empty_targets"),
    ({"x-targets": "a,b"}, b"string", None, "invalid_targets"),
    ({"x-targets": [1, 2]}, b"ints", None, "invalid_targets"),
    ({"x-targets": [""]}, b"blank", None, "invalid_target_name"),
    ({"x-targets": ["a"], "x-ttl-ms": -5}, b"ttl", None, "invalid_ttl"),
    ({"x-targets": ["a"], "x-ttl-ms": "soon"}, b"ttl", None, "invalid_ttl"),
    ({"x-targets": ["a"]}, b"x" * 5000, None, "oversized"),
    ({}, b"{not json", ENVELOPE_CONTENT_TYPE, "invalid_envelope"),
    (
        {},
        json.dumps({"targets": ["a"], "body": "***"}).encode(),
        ENVELOPE_CONTENT_TYPE,
        "invalid_envelope",
    ),
]


async def test_malformed_requests_are_dead_lettered_with_reason(broker_url, amqp, tmp_path, unique):
    s = directed_settings(unique, max_body_bytes=4096, max_targets=3)
    async with directed(broker_url, tmp_path, s, amqp) as (worker, client):
        channel = await amqp.channel()
        exchange = await channel.get_exchange(s.requests_exchange)
        cases = [
            *BAD_REQUESTS,
            ({"x-targets": ["a", "b", "c", "d"]}, b"many", None, "too_many_targets"),
        ]
        for i, (headers, body, ctype, _) in enumerate(cases):
            await exchange.publish(
                aio_pika.Message(body, headers=headers, content_type=ctype, message_id=f"bad{i}"),
                "",
            )
        await client.send(b"fine", ["a"], message_id="good")  # valid traffic is unaffected
        dead = await dead_letters(amqp, s, len(cases))
        reasons = {m.message_id: m.headers["x-dead-reason"] for m in dead}
        assert reasons == {f"bad{i}": c[3] for i, c in enumerate(cases)}
        assert all(m.headers.get("x-dead-detail") for m in dead)
        assert (await wait_applied(client, "good"))["total"] == 1
        rejected = worker.metrics.requests.labels("rejected")._value.get()
        dead = {r: worker.metrics.dead_letters.labels(r)._value.get() for r in reasons.values()}
        assert rejected == len(cases) and sum(dead.values()) == len(cases)
        await channel.close()


BAD_PULLS = [
    (b"{not json", "a", "bad_json"),
    (b"[1, 2]", "a", "invalid_pull"),
    (b"{}", "a", "invalid_pull"),
    (json.dumps({"topic": 5}).encode(), "a", "invalid_pull"),
    (json.dumps({"topic": "a", "max": -1}).encode(), "a", "invalid_pull"),
    (json.dumps({"topic": "a", "max": "5"}).encode(), "a", "invalid_pull"),
    (json.dumps({"topic": "a", "max": True}).encode(), "a", "invalid_pull"),
    (json.dumps({"topic": "a", "wait_ms": 1.5}).encode(), "a", "invalid_pull"),
    (json.dumps({"topic": "a", "record_id": 7}).encode(), "a", "invalid_pull"),
    (json.dumps({"op": "explode", "topic": "a"}).encode(), "a", "unknown_op"),
    (json.dumps({"topic": "b"}).encode(), "a", "topic_mismatch"),
    (b"[" * 100_000, "a", "too_large"),
    (b"[" * 10_000, "a", "bad_json"),
]


async def test_malformed_pulls_get_error_replies(broker_url, amqp, tmp_path, unique):
    s = directed_settings(unique)
    async with directed(broker_url, tmp_path, s, amqp) as (_, client):
        for body, key, code in BAD_PULLS:
            reply = await client.raw_pull(body, key)
            assert reply.get("error", {}).get("code") == code, (body[:40], reply)
            assert reply["error"]["message"]
        # huge max is capped, not refused
        await client.send(b"m", ["a"], message_id="cap")
        await wait_applied(client, "cap")
        reply = await client.pull("a", None, max=10**9)
        assert [m["id"] for m in reply["messages"]] == ["cap"]
        # a pull without reply_to cannot be answered: it is dead-lettered with the reason
        channel = await amqp.channel()
        exchange = await channel.get_exchange(s.pull_exchange)
        await exchange.publish(aio_pika.Message(b'{"topic": "a"}', message_id="noreply"), "a")
        dead = await dead_letters(amqp, s, 1)
        assert dead[0].headers["x-dead-reason"] == "missing_reply_to"
        await channel.close()


async def test_control_queries(broker_url, amqp, tmp_path, unique):
    s = directed_settings(unique)
    async with directed(broker_url, tmp_path, s, amqp) as (_, client):
        assert (await client.status("never"))["error"]["code"] == "not_found"
        assert (await client.control({"op": "nope"}))["error"]["code"] == "unknown_op"
        assert (await client.control({"op": "status"}))["error"]["code"] == "invalid_query"
        await client.send(b"s", ["a", "b", "c"], message_id="st")
        status = await wait_applied(client, "st")
        assert status == {
            **status,
            "total": 3,
            "acked": 0,
            "pending": 3,
            "expired": 0,
            "state": "active",
        }
        stats = (await client.control({"op": "stats"}))["stats"]
        assert stats["messages"] == 1 and stats["targets"] == 3


async def test_pulls_beyond_the_inflight_cap_get_overloaded(broker_url, amqp, tmp_path, unique):
    s = directed_settings(unique, max_inflight_pulls=2)
    async with directed(broker_url, tmp_path, s, amqp) as (_, client):
        waiting = [
            asyncio.create_task(client.pull(f"w{i}", None, max=1, wait_ms=3000)) for i in range(3)
        ]
        await asyncio.sleep(0.5)
        over = await client.pull("late", None, max=1)
        assert over["error"]["code"] == "overloaded"
        await client.send(b"x", ["w0", "w1", "w2"], message_id="wake-all")
        replies = await asyncio.gather(*waiting)
        assert sum(1 for r in replies if r.get("messages")) >= 2
