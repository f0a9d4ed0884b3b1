"""The client helpers keep working after their broker connection was cut."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import aio_pika
import pytest

from bench.harness.proxy import TcpProxy
from tests.integration.directed.helpers import directed, directed_settings, wait_applied
from workers.directed.client import DirectedClient

pytestmark = pytest.mark.integration


async def test_rpc_replies_flow_again_after_a_reconnect(broker_url, amqp, tmp_path, unique):
    parts = urlsplit(broker_url)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    s = directed_settings(unique)
    try:
        async with directed(broker_url, tmp_path, s, amqp) as (_, _client):
            conn = await aio_pika.connect_robust(
                proxy.url(parts.username or "guest", parts.password or "guest"),
                reconnect_interval=0.2,
            )
            client = await DirectedClient(conn, s).open()
            await client.send(b"x", ["a"], message_id="before-cut")
            await wait_applied(client, "before-cut")
            proxy.cut()
            reply = None
            for _ in range(30):
                try:
                    reply = await client.status("before-cut", timeout=1)
                    break
                except Exception:
                    await asyncio.sleep(0.1)
            assert reply is not None and reply["status"]["total"] == 1
            await client.close()
            await conn.close()
    finally:
        await proxy.stop()
