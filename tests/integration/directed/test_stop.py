"""A directed worker that stops answers the AMQP pulls it received: those whose reply waits
for a group commit (sent from the commit's callback) included."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import running_host
from tests.integration.directed.helpers import cleanup, directed_settings, wait_applied
from workers.directed.client import DirectedClient
from workers.directed.worker import DirectedWorker

pytestmark = pytest.mark.integration


async def test_stop_answers_pulls_waiting_for_their_commit(broker_url, amqp, tmp_path, unique):
    # a long commit interval: the second pull's commit is due well after the stop begins
    s = directed_settings(unique, pull_commit_interval_ms=1000)
    worker = DirectedWorker(s)
    try:
        async with running_host(broker_url, tmp_path, [worker]) as host:
            client = await DirectedClient(amqp, s).open()
            try:
                await client.send(b"one", ["t"], message_id="m1")
                await client.send(b"two", ["t"], message_id="m2")
                await wait_applied(client, "m2")
                first = await client.pull("t", None, max=1)
                assert [m["id"] for m in first["messages"]] == ["m1"]
                second = asyncio.ensure_future(client.pull("t", first["record_id"], max=1))
                assert worker.pulls is not None
                while worker.pulls.in_progress == 0:
                    assert not second.done(), second.result()
                    await asyncio.sleep(0.01)
                host.request_stop()
                reply = await second
                assert "error" not in reply, reply
                assert [m["id"] for m in reply["messages"]] == ["m2"]
            finally:
                await client.close()
    finally:
        await cleanup(broker_url, s)
