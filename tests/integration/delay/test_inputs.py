"""Bad input against a real delay worker: the corpus in tests/corpus/delay/ and
hypothesis-generated delay headers. Every input gets its documented answer (a dead letter
with ``x-dead-reason``, an error reply, or delivery), valid messages interleaved with the
garbage arrive, and the worker stays ready with no failed handler."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.delay.helpers import delay_settings, delay_worker, make_sink
from tests.integration.directed.test_inputs import header_value
from workers.delay.wire import REJECT_REASONS

pytestmark = pytest.mark.integration

CORPUS = Path(__file__).resolve().parents[2] / "corpus" / "delay"
CONTROL_CODES = {"bad_json", "unknown_op", "invalid_request", "too_large"}


def corpus() -> list[tuple[str, dict[str, Any]]]:
    return [
        (p.stem, json.loads(p.read_text(encoding="utf-8"))) for p in sorted(CORPUS.glob("*.json"))
    ]


def body_bytes(body: Any) -> bytes:
    if isinstance(body, dict):
        return "".join(text * times for text, times in body["parts"]).encode()
    return str(body).encode()


def headers_for(doc: dict[str, Any], target: str, missing: str) -> dict[str, Any] | None:
    raw = doc.get("headers")
    if raw is None:
        return None
    out = {}
    for name, value in raw.items():
        if value == "$target":
            value = target
        elif value == "$missing":
            value = missing
        out[name] = header_value(value)
    return out


async def until(predicate: Any, timeout: float = 30.0) -> None:
    """Wait for a condition, with a deadline only (no timing assertion)."""
    for _ in range(int(timeout * 10)):
        if predicate():
            return
        await asyncio.sleep(0.1)


def handler_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_corpus_files_are_well_formed():
    cases = corpus()
    assert len(cases) >= 40
    kinds = {doc["kind"] for _, doc in cases}
    assert kinds == {"ingress", "control"}
    reasons = set()
    for name, doc in cases:
        assert doc.get("about"), name
        (expect,) = doc["expect"].items()
        assert expect[0] in {"dead_reason", "error", "reply", "delivered", "delivered_later"}
        if expect[0] == "dead_reason":
            reasons.add(expect[1])
    # every ingress reason and the send-time and control ones are produced by a real input
    assert set(REJECT_REASONS) <= reasons
    assert {"exchange_not_found", "missing_reply_to"} <= reasons


async def test_corpus_gets_documented_answers(broker_url, amqp, tmp_path, unique, caplog):
    s = delay_settings(unique)
    sink = await make_sink(amqp, unique, "target")
    missing = f"{unique}.no-such-exchange"
    async with delay_worker(
        broker_url, tmp_path, s, amqp, exchanges=[sink.exchange], queues=[sink.queue]
    ) as (worker, client):
        channel = await amqp.channel()
        in_ex = await channel.get_exchange(s.in_exchange, ensure=False)
        control_ex = await channel.get_exchange(s.control_exchange, ensure=False)
        reply_q = await channel.declare_queue(exclusive=True)
        replies: dict[str, dict[str, Any]] = {}

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            replies[message.correlation_id or ""] = json.loads(message.body)

        await reply_q.consume(on_reply, no_ack=True)
        expected_dead: dict[str, str] = {}
        delivered: set[str] = set()
        errors: dict[str, str | None] = {}
        markers: list[str] = []
        for name, doc in corpus():
            mid = f"{name}-{uuid.uuid4().hex[:6]}"
            expect = doc["expect"]
            if doc["kind"] == "ingress":
                await in_ex.publish(
                    aio_pika.Message(
                        body_bytes(doc["body"]),
                        headers=headers_for(doc, sink.exchange, missing),
                        message_id=mid,
                    ),
                    routing_key="corpus",
                )
            else:
                await control_ex.publish(
                    aio_pika.Message(
                        body_bytes(doc["body"]),
                        message_id=mid,
                        correlation_id=mid,
                        reply_to=None if doc.get("reply_to") is False else reply_q.name,
                    ),
                    routing_key="",
                )
            if "dead_reason" in expect:
                expected_dead[mid] = expect["dead_reason"]
            elif "delivered" in expect:
                delivered.add(mid)
            elif "error" in expect or "reply" in expect:
                errors[mid] = expect.get("error")
            # a valid message after every input: garbage must not hold up good traffic
            marker = f"ok-after-{name}"
            markers.append(marker)
            await client.send(b"ok", sink.exchange, delay_ms=1, message_id=marker)

        want = delivered | set(markers)
        deadline = time.monotonic() + 30
        await until(lambda: want <= set(sink.ids()))
        assert want - set(sink.ids()) == set()
        dead_q = await channel.get_queue(s.dead_queue, ensure=False)
        dead: dict[str, str] = {}
        while set(expected_dead) - set(dead) and time.monotonic() < deadline:
            message = await dead_q.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.1)
                continue
            reason = (message.headers or {}).get("x-dead-reason")
            dead[message.message_id or ""] = (
                reason.decode() if isinstance(reason, bytes) else reason
            )
        assert dead == expected_dead
        await until(lambda: not set(errors) - set(replies))
        for mid, code in errors.items():
            reply = replies[mid]
            if code is None:
                assert "error" not in reply, (mid, reply)
            else:
                assert reply.get("error", {}).get("code") == code, (mid, reply)
        # nothing invalid reached the target, and a delivered message kept its user headers
        unexpected = set(sink.ids()) - want
        assert unexpected == set(), unexpected
        for received in sink.got:
            headers = received.message.headers or {}
            assert not any(h in headers for h in ("x-delay", "x-deliver-at", "x-target-exchange"))
        counts = await client.counts()
        assert counts["total"] == 1  # the message beyond the plugin's 49.7-day limit waits
        assert worker.ready()[0]
        assert handler_failures(caplog) == []


DELAY_VALUE = st.one_of(
    st.integers(min_value=-(2**40), max_value=300),
    # finite only: a NaN or infinite header float makes RabbitMQ 3.10 close the connection
    # that reads the message back (seen here; noted as an issue), which is not the worker
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.booleans(),
    st.none(),
    st.lists(st.integers(min_value=0, max_value=9), max_size=2),
)
HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "x-delay": DELAY_VALUE,
        "x-deliver-at": DELAY_VALUE,
        "x-delay-key": st.none() | st.text(max_size=300) | st.integers(-(2**62), 2**62),
        "x-target-exchange": st.sampled_from(["$target", "", "$target"]) | st.text(max_size=20),
    },
)


@pytest.fixture
async def hypothesis_worker(broker_url, amqp, tmp_path_factory):
    unique = "h" + uuid.uuid4().hex[:10]
    s = delay_settings(unique)
    sink = await make_sink(amqp, unique, "target")
    async with delay_worker(
        broker_url,
        tmp_path_factory.mktemp("hyp"),
        s,
        amqp,
        exchanges=[sink.exchange],
        queues=[sink.queue],
    ) as (worker, client):
        yield worker, client, sink, s, amqp


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(headers=HEADERS)
async def test_generated_headers_are_delivered_or_dead_lettered(hypothesis_worker, caplog, headers):
    worker, client, sink, s, amqp = hypothesis_worker
    headers = {k: (sink.exchange if v == "$target" else v) for k, v in headers.items()}
    mid = "g-" + uuid.uuid4().hex
    channel = await amqp.channel()
    try:
        in_ex = await channel.get_exchange(s.in_exchange, ensure=False)
        await in_ex.publish(aio_pika.Message(b"g", headers=headers, message_id=mid), "gen")
        dead_q = await channel.get_queue(s.dead_queue, ensure=False)
        outcome = None
        deadline = time.monotonic() + 15
        while outcome is None and time.monotonic() < deadline:
            if mid in sink.ids():
                outcome = "delivered"
                break
            message = await dead_q.get(no_ack=True, fail=False)
            if message is not None and message.message_id == mid:
                reason = (message.headers or {}).get("x-dead-reason")
                outcome = reason.decode() if isinstance(reason, bytes) else reason
                break
            counts = await client.counts()
            if counts["total"] and counts["topics"].get(headers.get("x-target-exchange", "")):
                outcome = "stored"  # valid, due later than this test waits
                await client.cancel(message_id=mid)
                break
            await asyncio.sleep(0.05)
        allowed = {"delivered", "stored", "exchange_not_found", *REJECT_REASONS}
        assert outcome in allowed, (headers, outcome)
        assert worker.ready()[0]
        assert handler_failures(caplog) == []
    finally:
        await channel.close()


async def test_header_nested_too_deep_is_dead_lettered_and_the_connection_stays(
    broker_url, amqp, tmp_path, unique, caplog
):
    """A header table nested 2,000 levels (RabbitMQ accepts it from any client) used to make
    the frame reader raise RecursionError: the connection dropped and the broker redelivered
    the message forever. Now the data path refuses to decode it, the message is dead-lettered
    ``invalid_headers`` with its body, and the next message is delivered."""
    from tests.integration.delay.helpers import dead_letters, header
    from tests.integration.directed.test_inputs import _deep, recursion_limit

    s = delay_settings(unique)
    sink = await make_sink(amqp, unique, "target")
    async with delay_worker(
        broker_url, tmp_path, s, amqp, exchanges=[sink.exchange], queues=[sink.queue]
    ) as (worker, client):
        channel = await amqp.channel()
        in_ex = await channel.get_exchange(s.in_exchange, ensure=False)
        headers = {**_deep(2000), "x-delay": 0, "x-target-exchange": sink.exchange}
        with recursion_limit(20_000):
            await in_ex.publish(
                aio_pika.Message(b"poison body", headers=headers, message_id="poison"), "rk"
            )
        await client.send(b"after", sink.exchange, delay_ms=0, message_id="after")
        await sink.wait_for(1)
        assert sink.ids() == ["after"]
        (dead,) = await dead_letters(amqp, s, 1)
        assert dead.message_id == "poison" and dead.body == b"poison body"
        assert header(dead, "x-dead-reason") == "invalid_headers"
        assert "nested deeper" in header(dead, "x-dead-detail")
        assert worker.link is not None and worker.link.reconnects == 0
        assert worker.ready()[0]
        await channel.close()


def _double_header_properties(target: str, message_id: str = "double") -> bytes:
    """Properties with a header ``big`` of AMQP type ``d`` (a 64-bit float, as the Java and
    Go clients write a double) holding 1e300: RabbitMQ carries it, the delay worker decodes
    it, and storing it made the worker's encoder raise (floats are written as 32-bit ``f``,
    as pamqp does), so the message went back to the queue forever."""
    import struct

    from bridge.amqp import frames as F

    props = F.Properties(
        message_id=message_id,
        delivery_mode=2,
        headers={"big": 1.0, "x-delay": 0, "x-target-exchange": target},
    )
    raw = props.encode()
    old = b"\x03bigf" + struct.pack(">f", 1.0)
    new = b"\x03bigd" + struct.pack(">d", 1e300)
    assert raw.count(old) == 1
    # the headers are the first property present (no content type or encoding): the
    # table's length follows the two flag bytes
    (length,) = struct.unpack_from(">I", raw, 2)
    return raw[:2] + struct.pack(">I", length + 4) + raw[6:].replace(old, new)


async def test_a_message_whose_processing_raises_is_dead_lettered_after_bounded_attempts(
    broker_url, amqp, tmp_path, unique, monkeypatch
):
    """Poison: processing raises for this input each time; after POISON_ATTEMPTS it is
    dead-lettered ``processing_failed`` with the exception's class and message, and the topic
    goes on. No input is known to make the worker raise (every header the data path decodes
    it can write again), so the fault is put into the worker's own header encoding, for
    messages that carry a ``boom`` header only."""
    from bridge.amqp.consumer import POISON_ATTEMPTS
    from tests.integration.delay.helpers import dead_letters, header
    from workers.delay import ingress

    real = ingress.stored_properties

    def failing(properties: Any, headers: Any, message_id: str, raw: bytes) -> Any:
        if headers and "boom" in headers:
            raise ValueError("injected: cannot store this message")
        return real(properties, headers, message_id, raw)

    monkeypatch.setattr(ingress, "stored_properties", failing)
    s = delay_settings(unique)
    sink = await make_sink(amqp, unique, "target")
    async with delay_worker(
        broker_url, tmp_path, s, amqp, exchanges=[sink.exchange], queues=[sink.queue]
    ) as (worker, client):
        await client.send(
            b"poison body", sink.exchange, delay_ms=0, message_id="poison", headers={"boom": 1}
        )
        (dead,) = await dead_letters(amqp, s, 1, timeout=60)
        assert dead.message_id == "poison" and dead.body == b"poison body"
        assert dead.headers["x-dead-reason"] == "processing_failed"
        assert dead.headers["x-dead-exception"] == "ValueError"
        detail = header(dead, "x-dead-detail")
        assert f"failed {POISON_ATTEMPTS} times" in detail, detail
        assert "injected: cannot store this message" in detail
        assert dead.headers["boom"] == 1  # its own headers are carried
        await client.send(b"after", sink.exchange, delay_ms=0, message_id="after")
        await sink.wait_for(1)
        assert sink.ids() == ["after"]
        assert worker.ready()[0]
        assert await dead_letters(amqp, s, 1, timeout=0.5) == []  # given up once


async def test_a_message_for_another_shard_is_forwarded_with_its_headers_bit_for_bit(
    chx_broker, amqp, tmp_path, unique
):
    """Sharded: a keyless message that belongs to another shard is forwarded to that
    shard's queue with its headers as they came: a 64-bit float (``d``) that does not fit
    in 32 bits stays the same double (before the data path wrote ``d`` back, this header
    could not be written again and the message was dead-lettered)."""
    from bridge.amqp.link import Link
    from bridge.amqp.publisher import Publisher
    from bridge.sharding import Shard, shard_queue
    from tests.conftest import delete_names
    from tests.integration.delay.helpers import dead_letters

    broker_url = chx_broker
    s = delay_settings(
        unique, shard_count=2, shard_index=0, shards_exchange=f"{unique}.delay.in.shards"
    )
    mid = next(f"m{i}" for i in range(1000) if Shard(0, 2).owner(f"m{i}") == 1)
    try:
        async with delay_worker(broker_url, tmp_path, s, amqp) as (worker, _):
            link = Link(broker_url, name="raw producer")
            pub = Publisher(link, name="raw")
            await link.start()
            try:
                await asyncio.wait_for(
                    pub.publish(
                        "",
                        shard_queue(s.in_queue, 0),
                        b"poison body",
                        _double_header_properties(f"{unique}.target", mid),
                        message_id=mid,
                    ),
                    30,
                )
            finally:
                await link.close()
            channel = await amqp.channel()
            queue = await channel.get_queue(shard_queue(s.in_queue, 1), ensure=False)
            got = None
            for _ in range(300):
                got = await queue.get(no_ack=True, fail=False)
                if got is not None:
                    break
                await asyncio.sleep(0.1)
            await channel.close()
            assert got is not None, "not forwarded to shard 1"
            assert got.message_id == mid and got.body == b"poison body"
            assert got.headers["big"] == 1e300
            assert got.headers["x-target-exchange"] == f"{unique}.target"
            assert await dead_letters(amqp, s, 1, timeout=0.5) == []
            assert worker.ready()[0]
    finally:
        await delete_names(
            broker_url,
            [s.shards_exchange],
            [shard_queue(q, i) for q in (s.in_queue, s.control_queue) for i in range(2)],
        )
