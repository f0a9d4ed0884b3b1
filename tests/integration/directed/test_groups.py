"""Named target groups on directed.control, durable across kill -9 in the middle of a
change; requests addressed to groups (alone or beside x-targets) reach their members once."""

from __future__ import annotations

import asyncio
import contextlib

import aio_pika
import pytest

from bridge.errors import NoAnswer
from tests.integration.directed.helpers import (
    cleanup,
    dead_letters,
    directed_process,
    directed_settings,
    wait_applied,
)
from workers.directed.client import DirectedClient

pytestmark = [pytest.mark.integration]


async def ids(client: DirectedClient, target: str) -> list[str]:
    reply = await client.pull(target, max=50)
    await client.pull(target, reply["record_id"], max=0)
    return [m["id"] for m in reply["messages"]]


async def test_groups_durable_and_resolved_at_acceptance(broker_url, tmp_path, unique, amqp):
    s = directed_settings(unique)
    proc = directed_process(broker_url, tmp_path, s)
    conn = await aio_pika.connect_robust(broker_url)
    try:
        proc.start().wait_ready()
        client = await DirectedClient(conn, s).open()
        assert (await client.group("group_set", "eu", ["e1", "e2", "e1"]))["group"] == {
            "group": "eu",
            "targets": ["e1", "e2"],
        }
        await client.group("group_add", "eu", ["e3"])
        await client.group("group_remove", "eu", ["e2"])

        change = asyncio.ensure_future(client.group("group_add", "eu", ["e4"], timeout=5))
        await asyncio.sleep(0.01)
        proc.kill9()  # in the middle of a change: made and kept, or not made at all
        with contextlib.suppress(NoAnswer):
            await change
        proc.start().wait_ready()
        await client.close()
        client = await DirectedClient(conn, s).open()
        members = (await client.group("group_get", "eu"))["group"]["targets"]
        assert members in (["e1", "e3"], ["e1", "e3", "e4"]), members
        await client.group("group_add", "eu", ["e4"])  # repeated: the same result
        assert (await client.group("group_get", "eu"))["group"]["targets"] == ["e1", "e3", "e4"]

        await client.send(b"g", [], groups=["eu"], message_id="g1")
        await client.send(b"gt", ["x1", "e1"], groups=["eu"], message_id="g2")
        await wait_applied(client, "g2")
        assert (await client.status("g2"))["status"]["total"] == 4  # e1 once
        await client.group("group_set", "eu", ["zz"])  # later changes do not touch g1, g2
        for target in ("e1", "e3", "e4"):
            assert await ids(client, target) == ["g1", "g2"]
        assert await ids(client, "x1") == ["g2"]
        assert await ids(client, "zz") == []

        await client.send(b"?", [], groups=["nope"], message_id="bad")
        (dead,) = await dead_letters(amqp, s, 1)
        assert dead.headers["x-dead-reason"] == "unknown_group"
        assert (await client.group("group_set", "eu", []))["group"]["targets"] == []
        for doc, code in (
            ({"op": "group_get", "group": "eu"}, "not_found"),
            ({"op": "group_add", "group": "eu"}, "invalid_query"),
            ({"op": "group_set", "group": 5, "targets": ["a"]}, "invalid_query"),
        ):
            assert (await client.control(doc))["error"]["code"] == code, doc
        await client.close()
        assert proc.terminate(timeout=30) == 0
    finally:
        if proc.proc and proc.proc.poll() is None:
            proc.kill9()
        await conn.close()
        await cleanup(broker_url, s)
