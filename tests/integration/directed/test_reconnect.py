"""The worker survives a cut connection: not ready while down, then consuming again."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import pytest

from bench.harness.proxy import TcpProxy
from tests.conftest import running_host
from tests.integration.directed.helpers import cleanup, directed_settings, wait_applied
from workers.directed.client import DirectedClient
from workers.directed.worker import DirectedWorker

pytestmark = pytest.mark.integration


async def test_connection_cut_reconnects_and_loses_nothing(broker_url, amqp, tmp_path, unique):
    parts = urlsplit(broker_url)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    s = directed_settings(unique)
    worker = DirectedWorker(s)
    proxied = proxy.url(parts.username or "guest", parts.password or "guest")
    try:
        async with running_host(proxied, tmp_path, [worker]) as host:
            client = await DirectedClient(amqp, s).open()
            await client.send(b"before", ["a"], message_id="before")
            await wait_applied(client, "before")
            proxy.accepting = False
            proxy.cut()
            for _ in range(100):
                if not host.readiness()[0]:
                    break
                await asyncio.sleep(0.05)
            assert host.readiness()[0] is False, (
                "readiness must drop while the broker is unreachable"
            )
            # published while the worker is disconnected: kept by the broker
            await client.send(b"during", ["a"], message_id="during")
            proxy.accepting = True
            for _ in range(300):
                if host.readiness()[0]:
                    break
                await asyncio.sleep(0.1)
            assert host.readiness()[0], host.readiness()
            # ready means restored: aio-pika's reconnect callbacks (the counter) have run
            assert host.broker.reconnects >= 1
            await wait_applied(client, "during", timeout=30)
            reply = await client.pull("a", None, max=10)
            assert [m["id"] for m in reply["messages"]] == ["before", "during"]
            await client.close()
    finally:
        await proxy.stop()
        await cleanup(broker_url, s)
