"""Recall on directed.control: a message taken back from every target that has not
acknowledged it, durable across kill -9 in the middle, idempotent, bad input refused."""

from __future__ import annotations

import asyncio
import contextlib

import aio_pika
import pytest

from bridge.errors import NoAnswer
from tests.integration.directed.helpers import (
    cleanup,
    directed_process,
    directed_settings,
    wait_applied,
)
from workers.directed.client import DirectedClient

pytestmark = [pytest.mark.integration]


async def test_recall_with_kill9_in_the_middle(broker_url, tmp_path, unique):
    s = directed_settings(unique)
    proc = directed_process(broker_url, tmp_path, s)
    conn = await aio_pika.connect_robust(broker_url)
    try:
        proc.start().wait_ready()
        client = await DirectedClient(conn, s).open()
        await client.send(b"oops", ["t1", "t2", "t3"], message_id="m1")
        await client.send(b"fine", ["t1"], message_id="m2")
        await wait_applied(client, "m2")
        batch = await client.pull("t1")  # t1 holds m1 and m2, unacknowledged
        assert [m["id"] for m in batch["messages"]] == ["m1", "m2"]
        got = await client.pull("t2")
        await client.pull("t2", got["record_id"], max=0)  # t2 acknowledged m1

        recall = asyncio.ensure_future(client.control({"op": "recall", "message_id": "m1"}, 5))
        await asyncio.sleep(0.01)
        proc.kill9()  # in the middle: the recall is either committed or never happened
        with contextlib.suppress(NoAnswer):
            await recall
        proc.start().wait_ready()
        await client.close()
        client = await DirectedClient(conn, s).open()
        status = (await client.status("m1"))["status"]
        assert status["state"] in ("active", "recalled"), status

        for _ in range(2):  # recalling again, or twice, is the same recall
            status = (await client.control({"op": "recall", "message_id": "m1"}))["status"]
            assert (status["state"], status["acked"], status["recalled"], status["pending"]) == (
                "recalled",
                1,
                2,
                0,
            )
        t3 = await client.pull("t3")  # t3 never gets it
        assert t3["messages"] == [] and "missed" not in t3
        again = await client.pull("t1")  # t1's batch names it
        assert [m["id"] for m in again["messages"]] == ["m2"] and again["recalled"] == ["m1"]
        done = await client.pull("t1", batch["record_id"], max=0)
        assert done["recalled"] == ["m1"]
        assert (await client.status("m2"))["status"]["acked"] == 1

        for doc, code in (
            ({"op": "recall"}, "invalid_query"),
            ({"op": "recall", "message_id": ""}, "invalid_query"),
            ({"op": "recall", "message_id": 7}, "invalid_query"),
            ({"op": "recall", "message_id": "nope"}, "not_found"),
        ):
            assert (await client.control(doc))["error"]["code"] == code, doc
        await client.close()
        assert proc.terminate(timeout=30) == 0
    finally:
        if proc.proc and proc.proc.poll() is None:
            proc.kill9()
        await conn.close()
        await cleanup(broker_url, s)
