"""Two shards of `directed` as real processes behind the consistent-hash exchange.

Every target's messages reach it exactly once whichever shard owns it; each shard keeps only
its own targets; pulls reach the owning shard straight from the exchange (no forwarding), and a
pull that lands on the wrong shard is forwarded and answered; status queries add up the
shards; a bad request is dead-lettered once; a state directory refuses another shard count.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import aio_pika
import pytest

from bench.harness.broker import delete_names
from bench.harness.procs import WorkerProcess
from bridge.errors import ConfigError, NoAnswer
from bridge.ring import ensure_chx_exchange
from bridge.sharding import CHX_TYPE, Shard, shard_queue
from tests.integration.directed.helpers import directed_settings, env_for
from workers.directed.client import DirectedClient
from workers.directed.config import DirectedSettings

pytestmark = [pytest.mark.integration]

SHARDS = 2


def metric(proc: WorkerProcess, name: str) -> float:
    status, body = proc.http("/metrics")
    assert status == 200
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def admin(proc: WorkerProcess, view: str = "summary") -> dict:
    status, body = proc.http(f"/admin/directed/{view}")
    assert status == 200, body
    return json.loads(body)


def start_shard(s: DirectedSettings, i: int, tmp_path: Path, broker_url: str, count: int = SHARDS):
    env = env_for(s)
    env["BRIDGE_DIRECTED__PULL_SHARDS_EXCHANGE"] = s.pull_shards_exchange
    env["BRIDGE_DIRECTED__SHARD_COUNT"] = str(count)
    env["HOSTNAME"] = f"directed-{i}"  # the StatefulSet ordinal gives the index
    return WorkerProcess(
        ["directed"],
        broker_url=broker_url,
        state_dir=tmp_path / f"shard-{i}",
        env=env,
        log=tmp_path / f"shard-{i}.log",
    )


async def cleanup(url: str, s: DirectedSettings) -> None:
    queues = [s.dead_queue, s.control_queue, s.requests_queue, s.pull_queue]
    for i in range(SHARDS):
        queues += [
            shard_queue(s.requests_queue, i),
            shard_queue(s.pull_queue, i),
            shard_queue(s.control_queue, i),
        ]
    await delete_names(
        url,
        [
            s.requests_exchange,
            s.pull_exchange,
            s.pull_shards_exchange,
            s.control_exchange,
            s.dead_exchange,
            f"{s.pull_exchange}.wrong",
        ],
        queues,
    )


async def drain(client: DirectedClient, target: str) -> list[str]:
    got: list[str] = []
    record = None
    while True:
        try:
            reply = await client.pull(target, record, max=50, timeout=10)
        except NoAnswer:
            # What a target does when a pull gets no answer: the same pull again (the
            # cursor makes it safe). Seen once in CI: a pull published while a shard put
            # the ring back in shard order was routed nowhere.
            reply = await client.pull(target, record, max=50, timeout=10)
        assert "error" not in reply, reply
        got.extend(m["id"] for m in reply["messages"])
        record = reply["record_id"]
        if record is None:
            return got


async def test_two_shards(chx_broker, tmp_path, unique):
    broker_url = chx_broker
    s = directed_settings(unique, pull_shards_exchange=f"{unique}.directed.pull.shards")
    procs = [start_shard(s, i, tmp_path, broker_url) for i in range(SHARDS)]
    conn = await aio_pika.connect_robust(broker_url)
    try:
        for p in procs:
            p.start()
        for p in procs:
            await asyncio.to_thread(p.wait_ready)
        client = await DirectedClient(conn, s).open()
        targets = [f"cdn-{i:03d}" for i in range(40)]
        owner = {t: Shard(0, SHARDS).owner(t) for t in targets}
        assert set(owner.values()) == set(range(SHARDS)), "the targets must span both shards"
        expected: dict[str, list[str]] = {t: [] for t in targets}
        for n in range(30):
            chosen = targets[n % 7 :: 3] if n % 2 else targets[n % 5 : n % 5 + 4]
            await client.send(b"body-%d" % n, chosen, message_id=f"m{n}")
            for t in chosen:
                expected[t].append(f"m{n}")
        # one request only shard 1's targets, one a whole envelope: both apply on their owners
        only1 = [t for t in targets if owner[t] == 1][:3]
        await client.send(b"only-one", only1, message_id="only1")
        for t in only1:
            expected[t].append("only1")

        # each shard holds only its own targets (the sends are confirmed, not yet committed)
        for i, p in enumerate(procs):
            mine = sum(1 for t in targets if owner[t] == i and expected[t])
            for _ in range(100):
                if admin(p)["targets"] == mine:
                    break
                await asyncio.sleep(0.1)
            assert admin(p)["targets"] == mine

        got = {t: await drain(client, t) for t in targets}
        for t in targets:
            assert got[t] == expected[t], (t, owner[t])
        # every pull reached its owner straight from the exchange: none was forwarded
        for p in procs:
            assert metric(p, "bridge_directed_pulls_forwarded_total") == 0
        assert sum(metric(p, "bridge_directed_requests_total") for p in procs) >= 31

        # the ring out of shard order (what a broker restart does): pulls are forwarded, the
        # shards notice and put the ring back in order, and pulls go direct again
        ring_ch = await conn.channel()
        raw = await ring_ch.get_underlay_channel()
        q0 = shard_queue(s.pull_queue, 0)
        await raw.queue_unbind(queue=q0, exchange=s.pull_shards_exchange, routing_key="1")
        await raw.queue_bind(queue=q0, exchange=s.pull_shards_exchange, routing_key="1")
        await client.send(b"reordered", targets, message_id="reordered")
        for t in targets:
            assert await drain(client, t) == ["reordered"]
        forwarded = [metric(p, "bridge_directed_pulls_forwarded_total") for p in procs]
        assert sum(forwarded) > 0
        repaired = ""
        for _ in range(200):  # the first shard that forwarded puts the ring back in order
            logs = [(tmp_path / f"shard-{i}.log").read_text() for i in range(SHARDS)]
            repaired = next((t for t in logs if "does not own its target" in t), "")
            if repaired:
                break
            await asyncio.sleep(0.1)
        assert "ring put in shard order" in repaired
        for t in targets:
            expected[t].append("reordered")
        # pulls go direct again: a round of pulls with no forward at all (each shard may
        # still be finishing its own repair for a moment: rounds until one is clean)
        for attempt in range(30):
            before = [metric(p, "bridge_directed_pulls_forwarded_total") for p in procs]
            mid = f"in-order-{attempt}"
            await client.send(mid.encode(), targets, message_id=mid)
            for t in targets:
                assert await drain(client, t) == [mid]
                expected[t].append(mid)
            if [metric(p, "bridge_directed_pulls_forwarded_total") for p in procs] == before:
                forwarded = before
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("pulls are still forwarded after the ring was repaired")

        # the status query adds up both shards' parts
        status = await client.status("m1")
        m1_targets = [t for t in targets if "m1" in expected[t]]
        assert status["status"]["total"] == len(m1_targets)
        assert status["status"]["acked"] == len(m1_targets)
        assert status["status"]["state"] == "done"
        assert status["status"]["shards"]["unanswered"] == []
        stats = await client.rpc.call(s.control_exchange, "", {"op": "stats"})
        assert stats["stats"]["shards"]["answered"] == SHARDS

        # a pull that reaches the wrong shard (a ring out of shard order) is forwarded
        ch = await conn.channel()
        wrong_ex = await ch.declare_exchange(f"{s.pull_exchange}.wrong", "topic", auto_delete=True)
        target = next(t for t in targets if owner[t] == 1)
        await client.send(b"late", [target], message_id="late")
        wrong_q = await ch.get_queue(shard_queue(s.pull_queue, 0), ensure=False)
        await wrong_q.bind(wrong_ex, routing_key="#")
        reply_q = await ch.declare_queue(exclusive=True)

        async def pull_via_wrong_shard(correlation_id: str, headers: dict | None = None) -> dict:
            await wrong_ex.publish(
                aio_pika.Message(
                    json.dumps({"topic": target, "max": 5}).encode(),
                    reply_to=reply_q.name,
                    correlation_id=correlation_id,
                    headers=headers,
                ),
                routing_key=target,
            )
            async with reply_q.iterator(timeout=10) as it:
                async for msg in it:
                    await msg.ack()
                    assert msg.correlation_id == correlation_id
                    return json.loads(msg.body)
            raise AssertionError("no reply")

        reply = await pull_via_wrong_shard("fwd")
        assert [m["id"] for m in reply["messages"]] == ["late"], reply
        assert metric(procs[0], "bridge_directed_pulls_forwarded_total") == forwarded[0] + 1
        assert "pull forwarded to its owning shard" in (tmp_path / "shard-0.log").read_text()

        # a pull forwarded to a shard that does not own its target either (shards that
        # disagree on SHARD_COUNT) is answered with an error, never forwarded again
        reply = await pull_via_wrong_shard(
            "twice", {"x-forwarded-from": 1, "x-routing-key": target}
        )
        assert reply["error"]["code"] == "wrong_shard", reply
        assert "SHARD_COUNT" in reply["error"]["message"]
        assert metric(procs[0], "bridge_directed_pulls_forwarded_total") == forwarded[0] + 1

        # a malformed request is dead-lettered once, by shard 0, not by every shard
        dead_q = await ch.get_queue(s.dead_queue, ensure=False)
        ex = await ch.get_exchange(s.requests_exchange, ensure=False)
        await ex.publish(
            aio_pika.Message(b"x", headers={"x-targets": "not-a-list"}, message_id="bad"),
            routing_key="",
        )
        await client.send(b"marker", targets[:2], message_id="after-bad")
        for t in targets[:2]:
            assert "after-bad" in await drain(client, t)
        await asyncio.sleep(0.5)
        dead = []
        while (m := await dead_q.get(no_ack=True, fail=False)) is not None:
            dead.append(m)
        assert [m.headers.get("x-dead-reason") for m in dead] == ["invalid_targets"]
        assert dead[0].headers.get("x-shard") == 0
    finally:
        for p in procs:
            if p.proc is not None and p.proc.poll() is None:
                p.terminate()
        await conn.close()
        await cleanup(broker_url, s)

    # a shard's state directory refuses another shard count, and says what to do
    wrong = start_shard(s, 0, tmp_path, broker_url, count=3)
    wrong.start()
    assert wrong.proc is not None
    assert wrong.proc.wait(60) != 0
    text = (tmp_path / "shard-0.log").read_text()
    assert "shard_count=2" in text and "shard_count=3" in text
    assert "Changing the shard count" in text
    await cleanup(broker_url, s)


async def test_missing_exchange_type_is_explained(broker_url, unique):
    with pytest.raises(ConfigError, match=re.escape("rabbitmq-plugins enable")):
        await ensure_chx_exchange(broker_url, "directed", f"{unique}.x", kind="x-bridge-no-such")
    # the real type exists on the test broker (CI enables the plugin)
    await ensure_chx_exchange(broker_url, "directed", f"{unique}.chx")
    await delete_names(broker_url, [f"{unique}.chx"], [])
    assert CHX_TYPE == "x-consistent-hash"
