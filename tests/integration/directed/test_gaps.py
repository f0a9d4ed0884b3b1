"""The gap signal: a target that lost queued ids (drop-head, TTL) before it got them is told
so in its next batch (`missed`, `missed_ids`) over AMQP and HTTP alike, until it acknowledges
that batch; the gap survives kill -9 at each step; the status query reports it per target."""

from __future__ import annotations

import aio_pika
import aiohttp
import pytest

from tests.integration.directed.helpers import (
    cleanup,
    directed_process,
    directed_settings,
    wait_applied,
)
from workers.directed.client import DirectedClient

pytestmark = [pytest.mark.integration]


async def test_gap_is_reported_until_acknowledged_across_kill9(broker_url, tmp_path, unique):
    s = directed_settings(unique, queue_limit=2)
    proc = directed_process(broker_url, tmp_path, s)
    conn = await aio_pika.connect_robust(broker_url)
    try:
        proc.start().wait_ready()
        client = await DirectedClient(conn, s).open()
        for i in range(1, 5):  # queue limit 2: m1 and m2 are pushed out for both targets
            await client.send(b"x%d" % i, ["node-1", "node-2"], message_id=f"m{i}")
        await wait_applied(client, "m4")
        status = await client.target_status("node-2")
        assert status["status"]["missed"] == 2 and status["status"]["missed_ids"] == ["m1", "m2"]

        proc.kill9()
        proc.start().wait_ready()  # the gap not yet handed out survives
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"http://127.0.0.1:{proc.port}/directed/v1/targets/node-1/pull", json={}
            ) as response:
                first = await response.json()
        assert first["missed"] == 2 and first["missed_ids"] == ["m1", "m2"]
        assert [m["id"] for m in first["messages"]] == ["m3", "m4"]
        again = await client.pull("node-1")  # over AMQP: the same batch, the same gap
        assert again["redelivered"] and again["missed"] == 2

        proc.kill9()
        proc.start().wait_ready()  # the gap of the unacknowledged batch survives
        again = await client.pull("node-1", "bogus")
        assert again["record_id"] == first["record_id"] and again["missed_ids"] == ["m1", "m2"]
        done = await client.pull("node-1", first["record_id"], max=5)
        assert "missed" not in done and done["record_id"] is None
        status = await client.target_status("node-1")
        assert status["status"] == {
            "target": "node-1",
            "backlog": 0,
            "unacknowledged": 0,
            "missed": 0,
            "missed_ids": [],
        }
        status = await client.target_status("node-2")
        assert status["status"]["missed"] == 2 and status["status"]["backlog"] == 2
        bad = await client.control({"op": "status", "target": 5})
        assert bad["error"]["code"] == "invalid_query"
        await client.close()
        assert proc.terminate(timeout=30) == 0
    finally:
        if proc.proc and proc.proc.poll() is None:
            proc.kill9()
        await conn.close()
        await cleanup(broker_url, s)
