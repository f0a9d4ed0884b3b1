"""The directed HTTP pull API on a real socket, beside the AMQP pull: one cursor, one pull path.

``POST /directed/v1/targets/{target}/pull``: bearer tokens per target (401/403), the AMQP
pull's body and reply, error replies with 200, 413/429 refusals, long polls, and on sharded
workers any replica answering for any target.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from bench.harness.procs import free_port
from bridge.sharding import Shard, shard_queue
from tests.conftest import delete_names, running_host
from tests.integration.directed.helpers import cleanup, directed_settings, wait_applied
from workers.directed.client import DirectedClient, decode_messages
from workers.directed.config import BINARY_REPLY_CONTENT_TYPE, DirectedSettings
from workers.directed.replies import decode_binary_reply
from workers.directed.worker import DirectedWorker

pytestmark = pytest.mark.integration

TOKENS = {
    "node-1": "secret-one",
    "node-2": "sha256:" + hashlib.sha256(b"secret-two").hexdigest(),
    "*": "shared-secret",
}


def url(port: int, target: str) -> str:
    return f"http://127.0.0.1:{port}/directed/v1/targets/{target}/pull"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextlib.asynccontextmanager
async def http_directed(
    broker_url: str, state: Any, settings: DirectedSettings, amqp: Any
) -> AsyncIterator[tuple[int, DirectedClient, aiohttp.ClientSession]]:
    port = free_port()
    try:
        async with running_host(broker_url, state, [DirectedWorker(settings)], http_port=port):
            client = await DirectedClient(amqp, settings).open()
            try:
                async with aiohttp.ClientSession() as http:
                    yield port, client, http
            finally:
                await client.close()
    finally:
        await cleanup(broker_url, settings)


async def post(
    http: aiohttp.ClientSession, port: int, target: str, body: Any, token: str | None
) -> tuple[int, Any, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(
        url(port, target), data=data, headers=bearer(token) if token else {}
    ) as response:
        return response.status, await response.json(content_type=None), response.headers


async def test_http_pull_authentication_cursor_and_errors(broker_url, tmp_path, unique, amqp):
    s = directed_settings(unique, http_tokens=TOKENS, max_pull_bytes=256)
    async with http_directed(broker_url, tmp_path, s, amqp) as (port, client, http):
        await client.send(b"hello", ["node-1", "node-2", "node-3"], message_id="m1")
        await wait_applied(client, "m1")

        status, doc, headers = await post(http, port, "node-1", {}, None)
        assert status == 401 and doc["error"]["code"] == "unauthorized"
        assert headers["WWW-Authenticate"].startswith("Bearer")
        status, doc, _ = await post(http, port, "node-1", {}, "wrong")
        assert status == 401
        # node-2's token (stored hashed) does not open node-1's queue
        status, doc, _ = await post(http, port, "node-1", {}, "secret-two")
        assert status == 403 and doc["error"]["code"] == "forbidden"

        status, doc, _ = await post(http, port, "node-1", {"max": 5}, "secret-one")
        assert status == 200 and decode_messages(doc) == [("m1", b"hello")]
        assert doc["topic"] == "node-1" and doc["redelivered"] is False
        record = doc["record_id"]
        # the same cursor over AMQP: no record id -> the batch again; with it -> acknowledged
        again = await client.pull("node-1")
        assert again["record_id"] == record and again["redelivered"] is True
        status, doc, _ = await post(
            http, port, "node-1", {"record_id": record, "max": 0}, "secret-one"
        )
        assert (status, doc["record_id"], doc["messages"]) == (200, None, [])
        assert (await client.status("m1"))["status"]["acked"] == 1

        # hashed token of node-2, shared token of node-3
        status, doc, _ = await post(http, port, "node-2", {"topic": "node-2"}, "secret-two")
        assert status == 200 and [m["id"] for m in doc["messages"]] == ["m1"]
        status, doc, _ = await post(http, port, "node-3", {}, "shared-secret")
        assert status == 200 and [m["id"] for m in doc["messages"]] == ["m1"]
        # the same batch again, bodies unencoded
        binary = {**bearer("shared-secret"), "Accept": BINARY_REPLY_CONTENT_TYPE}
        async with http.post(url(port, "node-3"), json={}, headers=binary) as response:
            assert response.headers["Content-Type"] == BINARY_REPLY_CONTENT_TYPE
            raw = await response.read()
        again = decode_binary_reply(raw)
        assert again["record_id"] == doc["record_id"] and again["redelivered"] is True
        assert [(m["id"], m["body"]) for m in again["messages"]] == [("m1", b"hello")]
        assert b"hello" in raw and base64.b64encode(b"hello") not in raw

        # error replies are the AMQP pull's, with 200
        for body, code in (
            ({"topic": "node-2"}, "topic_mismatch"),
            ({"max": -1}, "invalid_pull"),
            ({"op": "recall"}, "unknown_op"),
            (b"not json", "bad_json"),
            (b"[1]", "invalid_pull"),
        ):
            status, doc, _ = await post(http, port, "node-1", body, "secret-one")
            assert (status, doc["error"]["code"]) == (200, code), body
        status, doc, _ = await post(http, port, "node-1", b"{" + b" " * 300 + b"}", "secret-one")
        assert (status, doc["error"]["code"]) == (413, "too_large")
        async with http.get(url(port, "node-1"), headers=bearer("secret-one")) as response:
            assert response.status == 405
        async with http.post(f"http://127.0.0.1:{port}/directed/v1/nope") as response:
            assert response.status == 404

        status, body = await _metrics(http, port)
        assert 'bridge_directed_http_pulls_total{status="401"} 2.0' in body
        assert 'bridge_directed_http_pulls_total{status="413"} 1.0' in body


async def _metrics(http: aiohttp.ClientSession, port: int) -> tuple[int, str]:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
        return response.status, await response.text()


async def test_http_long_poll_and_overload(broker_url, tmp_path, unique, amqp, caplog):
    caplog.set_level(logging.WARNING, logger="bridge.directed")
    s = directed_settings(unique, max_inflight_pulls=1)
    async with http_directed(broker_url, tmp_path, s, amqp) as (port, client, http):
        # no tokens: no authentication, and one warning at start saying so
        warnings = [r for r in caplog.records if "no authentication" in r.getMessage()]
        assert len(warnings) == 1
        poll = asyncio.ensure_future(post(http, port, "edge-1", {"wait_ms": 20_000}, None))
        for _ in range(200):  # until the long poll is waiting in the worker
            status, body = await _metrics(http, port)
            if 'bridge_directed_pulls_total{kind="empty"} 1.0' in body:
                break
            await asyncio.sleep(0.05)
        # one pull in progress and MAX_INFLIGHT_PULLS=1: the next one is refused with 429
        status, doc, _ = await post(http, port, "edge-2", {}, None)
        assert (status, doc["error"]["code"]) == (429, "overloaded")
        assert not poll.done()
        await client.send(b"wake", ["edge-1"], message_id="w1")
        status, doc, _ = await poll
        assert status == 200 and decode_messages(doc) == [("w1", b"wake")]


async def test_any_shard_answers_http_pulls_for_any_target(chx_broker, tmp_path, unique, amqp):
    base = directed_settings(
        unique, pull_shards_exchange=f"{unique}.directed.pull.shards", shard_count=2
    )
    shards = [base.model_copy(update={"shard_index": i}) for i in range(2)]
    ports = [free_port(), free_port()]
    targets = [f"cdn-{i}" for i in range(12)]
    owner = {t: Shard(0, 2).owner(t) for t in targets}
    assert set(owner.values()) == {0, 1}
    try:
        async with (
            running_host(
                chx_broker, tmp_path / "s0", [DirectedWorker(shards[0])], http_port=ports[0]
            ),
            running_host(
                chx_broker, tmp_path / "s1", [DirectedWorker(shards[1])], http_port=ports[1]
            ),
            aiohttp.ClientSession() as http,
        ):
            client = await DirectedClient(amqp, base).open()
            await client.send(b"all", targets, message_id="a1")
            await wait_applied(client, "a1")
            # who has not acknowledged, paged across both shards in name order
            seen, cursor = [], None
            while True:
                query = {"op": "pending_targets", "message_id": "a1", "cursor": cursor}
                page = (await client.control({**query, "limit": 5}))["pending_targets"]
                assert len(page["targets"]) <= 5
                seen += page["targets"]
                if (cursor := page["cursor"]) is None:
                    break
            assert seen == sorted(targets)
            for t in targets:
                for port in ports:  # both replicas, the owner and the other one
                    status, doc, _ = await post(http, port, t, {}, None)
                    assert status == 200 and [m["id"] for m in doc["messages"]] == ["a1"], doc
                    record = doc["record_id"]
                status, doc, _ = await post(http, ports[0], t, {"record_id": record}, None)
                assert (status, doc["record_id"], doc["messages"]) == (200, None, [])
            assert (await client.status("a1"))["status"]["acked"] == len(targets)
            # a recall reaches both shards
            await client.send(b"oops", targets, message_id="a2")
            await wait_applied(client, "a2")
            recalled = (await client.control({"op": "recall", "message_id": "a2"}))["status"]
            assert (recalled["state"], recalled["recalled"]) == ("recalled", len(targets))
            for t in targets[:3]:
                status, doc, _ = await post(http, ports[1], t, {}, None)
                assert status == 200 and doc["messages"] == [], doc
            # a group change reaches both shards; each resolves the request for its targets
            await client.group("group_set", "fleet", targets)
            await client.send(b"grp", [], groups=["fleet"], message_id="a4")
            await wait_applied(client, "a4")
            assert (await client.status("a4"))["status"]["total"] == len(targets)
            await client.control({"op": "recall", "message_id": "a4"})
            # binary replies from the owner and through a relay
            await client.send(b"raw", targets, message_id="a3")
            await wait_applied(client, "a3")
            accept = {"Accept": BINARY_REPLY_CONTENT_TYPE}
            for t in targets:
                async with http.post(url(ports[0], t), json={}, headers=accept) as response:
                    reply = decode_binary_reply(await response.read())
                assert [(m["id"], m["body"]) for m in reply["messages"]] == [("a3", b"raw")]
            await client.close()
            for port in ports:
                status, body = await _metrics(http, port)
                relayed = [
                    line
                    for line in body.splitlines()
                    if line.startswith("bridge_directed_http_relayed_total ")
                ]
                assert relayed and float(relayed[0].split()[1]) > 0
    finally:
        s = base
        queues = [s.dead_queue, s.control_queue, s.requests_queue, s.pull_queue]
        for i in range(2):
            queues += [shard_queue(q, i) for q in (s.requests_queue, s.pull_queue, s.control_queue)]
        await delete_names(
            chx_broker,
            [
                s.requests_exchange,
                s.pull_exchange,
                s.pull_shards_exchange,
                s.control_exchange,
                s.dead_exchange,
            ],
            queues,
        )


async def test_http_rate_limit_per_target(broker_url, tmp_path, unique, amqp):
    s = directed_settings(
        unique, http_tokens=TOKENS, http_rate_per_target=2, http_rate_burst=2, max_pull_bytes=256
    )
    async with http_directed(broker_url, tmp_path, s, amqp) as (port, _, http):
        for _ in range(2):  # the burst
            status, doc, _ = await post(http, port, "node-1", {"wait_ms": 0}, "secret-one")
            assert status == 200 and doc["messages"] == []
        status, doc, headers = await post(http, port, "node-1", {"wait_ms": 0}, "secret-one")
        assert (status, doc["error"]["code"], headers["Retry-After"]) == (429, "overloaded", "1")
        assert "HTTP_RATE_PER_TARGET" in doc["error"]["message"]
        # per target: another one is not held back
        status, _, _ = await post(http, port, "node-3", {"wait_ms": 0}, "shared-secret")
        assert status == 200
        # authentication comes first: a wrong token neither passes nor spends node-1's budget
        status, doc, _ = await post(http, port, "node-1", {"wait_ms": 0}, "wrong")
        assert (status, doc["error"]["code"]) == (401, "unauthorized")
        # a chunked body (no Content-Length) over MAX_PULL_BYTES is refused as a long one is
        status, doc, _ = await post_chunked(http, port, "node-3", b" " * 300, "shared-secret")
        assert (status, doc["error"]["code"]) == (413, "too_large")
        await asyncio.sleep(0.6)  # 2 a second: one pull's worth of budget is back
        status, doc, _ = await post(http, port, "node-1", {"wait_ms": 0}, "secret-one")
        assert status == 200 and "messages" in doc
        _, body = await _metrics(http, port)
        assert 'bridge_directed_http_pulls_total{status="429"} 1.0' in body


async def post_chunked(
    http: aiohttp.ClientSession, port: int, target: str, body: bytes, token: str
) -> tuple[int, Any, Any]:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 100):
            yield body[i : i + 100]

    async with http.post(url(port, target), data=chunks(), headers=bearer(token)) as response:
        return response.status, await response.json(content_type=None), response.headers


async def test_message_accepted_while_a_pull_commits_is_not_missed(
    broker_url, tmp_path, unique, amqp
):
    """A pull that found nothing commits its acknowledgement before it waits; a message for
    its target accepted during that commit must not be left for the end of ``wait_ms``."""
    s = directed_settings(unique)
    worker = DirectedWorker(s)
    port = free_port()
    try:
        async with running_host(broker_url, tmp_path, [worker], http_port=port):
            client = await DirectedClient(amqp, s).open()
            commit = worker.ledger.committed
            sent = False

            async def commit_then_send() -> None:
                nonlocal sent
                await commit()
                if not sent:  # the pull's commit: the message arrives now, before the wait
                    sent = True
                    await client.send(b"late", ["edge-1"], message_id="late")
                    await wait_applied(client, "late")

            worker.ledger.committed = commit_then_send  # type: ignore[method-assign]
            try:
                async with aiohttp.ClientSession() as http:
                    pull = post(http, port, "edge-1", {"wait_ms": 30_000}, None)
                    status, doc, _ = await asyncio.wait_for(pull, 15)
                assert status == 200 and decode_messages(doc) == [("late", b"late")]
            finally:
                await client.close()
    finally:
        await cleanup(broker_url, s)
