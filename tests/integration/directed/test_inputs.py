"""Bad input against a real directed worker: the corpus in tests/corpus/directed/ and
hypothesis-generated pulls. Every input gets its documented answer (an error reply or a
dead letter with ``x-dead-reason``), valid traffic interleaved with the garbage arrives
intact and in order, and the worker neither fails a handler nor drops its connection."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import decimal
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import pamqp.encode
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.directed.helpers import (
    dead_letters,
    directed,
    directed_process,
    directed_settings,
    wait_applied,
)
from workers.directed.client import DirectedClient
from workers.directed.config import ENVELOPE_CONTENT_TYPE, H_DEAD_DETAIL, H_DEAD_REASON

pytestmark = pytest.mark.integration

CORPUS = Path(__file__).resolve().parents[2] / "corpus" / "directed"
PULL_CODES = {"bad_json", "invalid_pull", "unknown_op", "topic_mismatch", "too_large"}


def corpus() -> list[tuple[str, dict[str, Any]]]:
    return [
        (p.stem, json.loads(p.read_text(encoding="utf-8")))
        for p in sorted(CORPUS.glob("*.json"))
        if p.name != "settings.json"
    ]


def header_value(value: Any) -> Any:
    """A corpus header value as the AMQP value it stands for (see the corpus README)."""
    if isinstance(value, list):
        return [header_value(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "$bytes" in value:
        return base64.b64decode(value["$bytes"])
    if "$bytearray" in value:
        return bytearray(base64.b64decode(value["$bytearray"]))
    if "$decimal" in value:
        return decimal.Decimal(value["$decimal"])
    if "$timestamp" in value:
        return datetime.datetime.fromtimestamp(value["$timestamp"], datetime.UTC)
    if "$repeat" in value:
        return value["$repeat"] * value["times"]
    if "$targets" in value:
        return [f"{value.get('prefix', 't')}{i}" for i in range(value["$targets"])]
    if "$nest" in value:
        out: Any = 1
        for _ in range(value["$nest"]):
            out = [out] if value.get("array") else {"k": out}
        return out
    return {k: header_value(v) for k, v in value.items()}


@contextlib.contextmanager
def raw_long_strings():
    """Let pamqp encode ``bytes`` header values as AMQP long strings, byte for byte.

    Other clients (Java, Go) send long strings that are not UTF-8; pamqp only encodes str.
    """
    original = pamqp.encode.encode_table_value

    def encode(value: Any) -> bytes:
        if isinstance(value, bytes):
            return b"S" + len(value).to_bytes(4, "big") + value
        return original(value)

    pamqp.encode.encode_table_value = encode  # type: ignore[assignment]
    try:
        yield
    finally:
        pamqp.encode.encode_table_value = original  # type: ignore[assignment]


def body_bytes(body: Any) -> bytes:
    if isinstance(body, str):
        return body.encode("utf-8", "surrogatepass")
    if "base64" in body:
        return base64.b64decode(body["base64"])
    return b"".join(text.encode() * times for text, times in body["parts"])


def delivered_body(case: dict[str, Any]) -> bytes:
    """What a target receives: the body, or for an envelope the content inside it."""
    raw = body_bytes(case["body"])
    if case.get("properties", {}).get("content_type") == ENVELOPE_CONTENT_TYPE:
        return base64.b64decode(json.loads(raw)["body"])
    return raw


def test_corpus_files_are_well_formed():
    cases = corpus()
    assert len(cases) >= 100
    for name, case in cases:
        assert case["kind"] in ("request", "pull", "control"), name
        assert name.startswith(case["kind"] + "-"), name
        assert case["about"], name
        assert len(case["expect"]) == 1 and set(case["expect"]) <= {
            "dead_reason",
            "error",
            "reply",
            "accepted",
        }, name
        body_bytes(case["body"])
        header_value(case.get("headers"))


def handler_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    bad = ("handler failed", "broker connection lost", "Traceback")
    return [r.getMessage() for r in caplog.records if any(b in r.getMessage() for b in bad)]


async def test_corpus_gets_documented_answers(broker_url, amqp, tmp_path, unique, caplog):
    caplog.set_level(logging.WARNING)
    limits = json.loads((CORPUS / "settings.json").read_text())
    s = directed_settings(unique, **limits)
    cases = corpus()
    async with directed(broker_url, tmp_path, s, amqp) as (worker, client):
        channel = await amqp.channel(publisher_confirms=True)
        exchanges = {
            "request": await channel.get_exchange(s.requests_exchange),
            "pull": await channel.get_exchange(s.pull_exchange),
            "control": await channel.get_exchange(s.control_exchange),
        }
        replies: dict[str, dict[str, Any]] = {}
        steady: list[str] = []
        for i, (name, case) in enumerate(cases):
            kind, body = case["kind"], body_bytes(case["body"])
            key = case.get("routing_key", "a")
            props = case.get("properties", {})
            if kind == "request" or case.get("reply_to") is False:
                message = aio_pika.Message(
                    body,
                    headers=header_value(case.get("headers")),
                    content_type=props.get("content_type"),
                    message_id=props.get("message_id", name),
                    correlation_id=name,  # dead letters keep it: this is how they are matched
                )
                with raw_long_strings():
                    await exchanges[kind].publish(message, key if kind != "request" else "")
            else:
                exchange = s.pull_exchange if kind == "pull" else s.control_exchange
                replies[name] = await client.rpc.call(exchange, key, body, 10)
            # valid traffic between every two garbage inputs
            steady.append(f"steady-{i}")
            await client.send(b"steady %d" % i, ["steady"], message_id=steady[-1])

        expected_dead = {
            n: c["expect"]["dead_reason"] for n, c in cases if "dead_reason" in c["expect"]
        }
        dead = await dead_letters(amqp, s, len(expected_dead), timeout=20)
        got_dead = {m.correlation_id: m.headers.get("x-dead-reason") for m in dead}
        assert got_dead == expected_dead
        assert all(m.headers.get("x-dead-detail") for m in dead)

        for name, case in cases:
            expect = case["expect"]
            if "error" in expect:
                assert replies[name].get("error", {}).get("code") == expect["error"], (
                    name,
                    replies[name],
                )
                assert replies[name]["error"]["message"], name
            elif "reply" in expect:
                assert "error" not in replies[name], (name, replies[name])
            elif "accepted" in expect:
                status = await wait_applied(client, name)
                assert status["total"] == len(expect["accepted"]), (name, status)
                for target in expect["accepted"]:
                    reply = await client.pull(target, None, max=10)
                    assert [m["id"] for m in reply["messages"]] == [name], (name, target, reply)
                    sent = reply["messages"][0]
                    assert base64.b64decode(sent["body"]) == delivered_body(case), name
                    await client.pull(target, reply["record_id"], max=0)

        assert await drain(client, "steady") == steady
        assert worker.ready() == (True, "consuming")
        assert handler_failures(caplog) == []
        await channel.close()


async def drain(client: DirectedClient, target: str) -> list[str]:
    got: list[str] = []
    record = None
    while True:
        reply = await client.pull(target, record, max=100)
        assert "error" not in reply, reply
        got += [m["id"] for m in reply["messages"]]
        record = reply["record_id"]
        if record is None:
            return got


# Text with lone surrogates (st.text() leaves them out) and JSON values of every type.
WILD_TEXT = st.text(
    st.one_of(st.characters(), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)),
    max_size=8,
)
JSON_VALUE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | WILD_TEXT,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(WILD_TEXT, c, max_size=3),
    max_leaves=10,
)
PULL_DOC = st.one_of(
    JSON_VALUE,
    st.fixed_dictionaries(
        {},
        optional={
            "op": st.sampled_from(["pull", "status", ""]) | JSON_VALUE,
            "topic": st.sampled_from(["h1", "h2"]) | JSON_VALUE,
            "record_id": st.none() | WILD_TEXT | JSON_VALUE,
            "max": st.integers(min_value=-5, max_value=10**20) | JSON_VALUE,
            "wait_ms": st.integers(min_value=-5, max_value=50) | JSON_VALUE,
        },
    ),
)


@pytest.fixture
async def hypothesis_worker(broker_url, amqp, tmp_path_factory):
    unique = "h" + uuid.uuid4().hex[:10]
    s = directed_settings(unique, max_wait_ms=50)
    async with directed(broker_url, tmp_path_factory.mktemp("hyp"), s, amqp) as (worker, client):
        yield worker, client


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(doc=PULL_DOC, routing_key=st.sampled_from(["h1", "h2", "x"]))
async def test_generated_pulls_are_answered(hypothesis_worker, caplog, doc, routing_key):
    worker, client = hypothesis_worker
    body = json.dumps(doc).encode()
    reply = await client.raw_pull(body, routing_key)
    if "error" in reply:
        assert reply["error"]["code"] in PULL_CODES, (doc, reply)
    else:
        assert set(reply) == {"topic", "record_id", "redelivered", "messages"}, (doc, reply)
    assert worker.ready()[0]
    assert handler_failures(caplog) == []


async def test_valid_traffic_survives_generated_garbage(broker_url, amqp, tmp_path, unique):
    """Garbage pulls and valid request/pull cycles at the same time, on the same targets."""
    s = directed_settings(unique)
    async with directed(broker_url, tmp_path, s, amqp) as (_, client):
        garbage = [json.dumps(d).encode() for d in _examples(300)]

        async def spray() -> None:
            for body in garbage:
                await client.raw_pull(body, "v1")

        async def valid() -> list[str]:
            sent = []
            for i in range(40):
                sent.append(f"v{i}")
                await client.send(b"v", ["v1"], message_id=sent[-1])
            return sent

        sent, _ = await asyncio.gather(valid(), spray())
        await wait_applied(client, sent[-1])
        # garbage cannot acknowledge anything: a well-formed pull with a wrong record id
        # only causes a resend, and everything else is refused before the cursor moves
        assert await drain(client, "v1") == sent


def _examples(n: int) -> list[Any]:
    """Deterministic garbage pull documents for a target (no hypothesis engine needed)."""
    import random

    rng = random.Random(6)
    values: list[Any] = [
        None,
        True,
        -1,
        1.5,
        float("nan"),
        "",
        "\ud800",
        "\u202e",
        [],
        {},
        [[[]]],
        10**20,
        "v1",
    ]
    docs: list[Any] = []
    for _ in range(n):
        doc: dict[str, Any] = {}
        for field in ("op", "topic", "record_id", "max", "wait_ms"):
            if rng.random() < 0.7:
                doc[field] = rng.choice(values)
        docs.append(doc if rng.random() < 0.9 else rng.choice(values))
    return docs


@contextlib.contextmanager
def raw_table_keys():
    """Let pamqp encode ``bytes`` keys of the header table byte for byte (not UTF-8)."""
    from pamqp import common

    original = pamqp.encode.METHODS["table"]

    def table(value: dict[Any, Any]) -> bytes:
        out = b""
        for key, item in value.items():
            raw = key if isinstance(key, bytes) else key.encode()
            out += bytes([len(raw)]) + raw + pamqp.encode.encode_table_value(item)
        return common.Struct.integer.pack(len(out)) + out

    pamqp.encode.METHODS["table"] = table
    try:
        yield
    finally:
        pamqp.encode.METHODS["table"] = original


@contextlib.contextmanager
def recursion_limit(limit: int):
    """Room for pamqp to encode a very deep header in this process (the worker has not)."""
    import sys

    before = sys.getrecursionlimit()
    sys.setrecursionlimit(limit)
    try:
        yield
    finally:
        sys.setrecursionlimit(before)


def _deep(depth: int) -> dict[str, Any]:
    value: Any = 1
    for _ in range(depth):
        value = {"k": value}
    return {"x-targets": ["a"], "deep": value}


POISON = [
    pytest.param(raw_table_keys, {"x-targets": ["a"], b"\xff\xfe": 1}, id="key-not-utf8"),
    # deeper than the data path decodes (bridge/amqp/frames/ MAX_DEPTH): dead-lettered
    pytest.param(lambda: recursion_limit(20_000), _deep(2000), id="nested-2000"),
]


@pytest.mark.parametrize(("encoder", "headers"), POISON)
async def test_header_the_decoder_chokes_on_does_not_drop_the_connection(
    broker_url, amqp, tmp_path, unique, encoder, headers
):
    """A header RabbitMQ accepts from other clients but pamqp cannot decode strictly must
    reach the worker (and get an answer) instead of dropping its connection in a loop."""
    from tests.integration.directed.helpers import cleanup

    s = directed_settings(unique)
    proc = directed_process(broker_url, tmp_path, s)
    try:
        proc.start().wait_ready()
        client = await DirectedClient(amqp, s).open()
        channel = await amqp.channel()
        exchange = await channel.get_exchange(s.requests_exchange)
        with encoder():
            await exchange.publish(aio_pika.Message(b"x", headers=headers, message_id="poison"), "")
        await client.send(b"after", ["a"], message_id="after")
        applied = False
        for _ in range(50):
            if "connection lost" in proc.log.read_text():
                break
            with contextlib.suppress(TimeoutError):
                applied = "status" in await client.status("after", 0.5)
            if applied:
                break
        log = proc.log.read_text()
        assert applied and "connection lost" not in log and "link lost" not in log, log[-1500:]
        if "deep" in headers:
            (dead,) = await dead_letters(amqp, s, 1)
            assert dead.message_id == "poison"
            assert dead.headers[H_DEAD_REASON] == "invalid_headers"
            assert "nested deeper" in dead.headers[H_DEAD_DETAIL]
            assert "deep" not in dead.headers  # the original headers could not be kept
        await channel.close()
        await client.close()
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.kill9()
        await cleanup(broker_url, s)
