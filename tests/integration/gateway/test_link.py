"""The gateway's data path (its own bridge.amqp Link) against the real broker, for what is
the gateway's own: the reply queue declared again after it expired during an outage, a
reply queue held by another connection waited out, replies routed to their sessions (large,
closing, undecodable). The link itself is tested in tests/integration/amqp/test_link.py."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import pytest

from bench.harness.proxy import TcpProxy
from tests.conftest import get_messages, running_host
from tests.integration.gateway.helpers import (
    Gateway,
    cleanup,
    gateway_settings,
    publish_reply,
    queue_depth,
    running_gateway,
    wait_until,
)
from workers.gateway.client import GatewayError
from workers.gateway.worker import GatewayWorker

pytestmark = pytest.mark.integration


async def test_reply_queue_is_declared_again_after_it_expired(broker_url, amqp, tmp_path, unique):
    """An outage longer than reply_queue_expires_s: the broker deletes the unused reply
    queue; the link declares it again (same arguments) before it consumes, the session
    survives and its replies flow again."""
    parts = urlsplit(broker_url)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    s = gateway_settings(unique, reply_queue_expires_s=1.0)
    worker = GatewayWorker(s)
    proxied = proxy.url(parts.username or "guest", parts.password or "guest")
    try:
        async with running_host(proxied, tmp_path, [worker]) as host:
            gw = Gateway(worker, host, s, broker_url)  # the backend uses the broker directly
            try:
                await gw.start_server("s1")
                client = await gw.connect(client_id="patient")
                assert await client.request(b"before") == b"before"
                assert await queue_depth(amqp, s.reply_queue) == 0
                proxy.accepting = False
                proxy.cut()
                await wait_until(lambda: not host.readiness()[0], "not ready while cut")
                # not polled meanwhile: a (passive) declaration renews the queue's lease
                await asyncio.sleep(4 * s.reply_queue_expires_s)
                assert await queue_depth(amqp, s.reply_queue) == -1, "not expired"
                proxy.accepting = True
                await wait_until(lambda: host.readiness()[0], "ready again", timeout=30)
                assert await queue_depth(amqp, s.reply_queue) == 0  # declared again
                # the same session, and its replies reach it through the new queue
                assert await client.request(b"after", timeout=30) == b"after"
                assert worker.sessions[client.session].server == "s1"
                # declared with the same arguments: a declaration like the gateway's passes
                channel = await amqp.channel()
                await channel.declare_queue(
                    s.reply_queue, durable=True, arguments={"x-expires": 1000}
                )
                await channel.close()
                await client.bye()
            finally:
                for server in gw.servers.values():
                    await server.stop()
                gw.close_clients()
    finally:
        await proxy.stop()
        await cleanup(broker_url, s, ["s1"])


async def test_reply_queue_held_by_another_connection(broker_url, tmp_path, unique):
    """Someone else holds a queue of that name exclusively: the gateway says so, stays not
    ready, and consumes its replies once that connection is gone (the case of a second
    replica with the same instance is tests/integration/host/test_ownership.py)."""
    s = gateway_settings(unique)
    holder = await aio_pika.connect(broker_url)
    channel = await holder.channel()
    await channel.declare_queue(s.reply_queue, exclusive=True)
    worker = GatewayWorker(s)
    try:
        async with running_host(broker_url, tmp_path, [worker], ready=False) as host:
            await wait_until(
                lambda: "another process owns it" in host.readiness()[1]["gateway"],
                "refused",
            )
            assert not host.readiness()[0]
            assert not worker.reply_consumer.consuming
            await holder.close()  # its exclusive queue goes with it
            await wait_until(lambda: host.readiness()[0], "ready once the holder is gone", 30)
            assert worker.reply_consumer.consuming
    finally:
        if not holder.is_closed:
            await holder.close()
        await cleanup(broker_url, s, [])


@contextlib.contextmanager
def nested_headers_allowed() -> Any:
    """Let pamqp (in this test process) encode a table nested deeper than the gateway's
    decoder takes (bridge/amqp/frames/ MAX_DEPTH)."""
    import sys

    before = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        yield
    finally:
        sys.setrecursionlimit(before)


def _deep(depth: int) -> dict[str, Any]:
    value: Any = 1
    for _ in range(depth):
        value = {"k": value}
    return value


async def test_replies_are_routed_to_their_sessions(broker_url, amqp, tmp_path, unique):
    """Replies as a server publishes them: many, in order, to two sessions; one larger than
    an AMQP frame; an empty one; x-close; and one whose headers the gateway cannot decode,
    kept in gateway.undeliverable while the next replies still arrive."""
    s = gateway_settings(unique)
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        a, b = await gw.connect(client_id="a"), await gw.connect(client_id="b")
        for i in range(50):
            await publish_reply(amqp, s, b"a%d" % i, {"x-session": a.session})
            await publish_reply(amqp, s, b"b%d" % i, {"x-session": b.session})
        assert [await a.recv() for _ in range(50)] == [b"a%d" % i for i in range(50)]
        assert [await b.recv() for _ in range(50)] == [b"b%d" % i for i in range(50)]
        big = bytes(range(256)) * 1200  # 300 KiB: three body frames
        await publish_reply(amqp, s, big, {"x-session": a.session, "n": 7})
        assert await a.recv() == big
        await publish_reply(amqp, s, b"", {"x-session": a.session})
        assert await a.recv() == b""

        # headers nested deeper than the decoder takes: kept with a reason, nothing else
        # changes (the link keeps its connection, the next reply is routed)
        channel = await amqp.channel()
        with nested_headers_allowed():
            await channel.default_exchange.publish(
                aio_pika.Message(
                    b"poison",
                    headers={"x-session": a.session, "deep": _deep(200)},
                    correlation_id="c-1",
                    reply_to="nobody",
                ),
                routing_key=s.reply_queue,
            )
        await channel.close()
        await publish_reply(amqp, s, b"next", {"x-session": a.session})
        assert await a.recv() == b"next"
        (dead,) = await get_messages(amqp, s.undeliverable_queue, 1)
        assert dead.body == b"poison" and dead.correlation_id == "c-1"
        assert dead.headers["x-dead-reason"] == "invalid_headers"
        assert "nested deeper" in dead.headers["x-dead-detail"]
        assert "deep" not in dead.headers and dead.reply_to is None
        assert dead.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert gw.worker.link is not None and gw.worker.link.reconnects == 0

        # x-close as a string, with a body: the body, then BYE
        await publish_reply(amqp, s, b"bye now", {"x-session": b.session, "x-close": "true"})
        assert await b.recv() == b"bye now"
        with pytest.raises(GatewayError) as info:
            await b.recv()
        assert info.value.code == "bye"
        await a.bye()


async def test_ready_again_after_a_black_hole_longer_than_the_connect_timeout(
    broker_url, tmp_path, unique
):
    """The broker (or a load balancer in front of it) accepts connections but says nothing
    for longer than a reconnect attempt waits; once it answers, the gateway is ready again
    and the session that survived gets its replies. (A handshake that timed out used to
    leave its connection open and its waiter behind, and every later attempt's
    connection.start went to that stale waiter: the link never connected again.)"""
    parts = urlsplit(broker_url)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    s = gateway_settings(unique)
    worker = GatewayWorker(s)
    proxied = proxy.url(parts.username or "guest", parts.password or "guest")
    try:
        async with running_host(proxied, tmp_path, [worker]) as host:
            gw = Gateway(worker, host, s, broker_url)
            try:
                await gw.start_server("s1")
                client = await gw.connect(client_id="patient")
                assert await client.request(b"before") == b"before"
                assert worker.link is not None
                worker.link.connect_timeout = 2.0  # well below the broker's 10 s
                proxy.stall()
                proxy.cut()  # connections dropped; new ones accepted, and silent
                await wait_until(lambda: not host.readiness()[0], "not ready while cut")
                await asyncio.sleep(6)  # two reconnect attempts time out in the handshake
                proxy.resume()
                await wait_until(lambda: host.readiness()[0], "ready again", timeout=30)
                assert await client.request(b"after", timeout=30) == b"after"
                await client.bye()
            finally:
                for server in gw.servers.values():
                    await server.stop()
                gw.close_clients()
    finally:
        await proxy.stop()
        await cleanup(broker_url, s, ["s1"])
