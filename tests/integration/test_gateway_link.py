"""The gateway's own AMQP connection (amqp_link.py) against the real broker: confirmed
publishes, returns, the reply consumer, a connection cut under it, a reply queue deleted
under it, a broker that stops answering."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest

from bridge.errors import PublishFailed
from tests.conftest import delete_names
from tests.proxy import TcpProxy
from workers.gateway.amqp_codec import Delivery
from workers.gateway.amqp_io import Prepared, Properties
from workers.gateway.amqp_link import AmqpLink

pytestmark = pytest.mark.integration


class Replies:
    def __init__(self) -> None:
        self.got: list[Delivery] = []
        self.changed = asyncio.Event()

    def __call__(self, delivery: Delivery) -> None:
        self.got.append(delivery)
        self.changed.set()

    async def wait(self, n: int, timeout: float = 15.0) -> list[Delivery]:
        async with asyncio.timeout(timeout):
            while len(self.got) < n:
                self.changed.clear()
                await self.changed.wait()
        return self.got


async def until(predicate: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def link_to(
    url: str, unique: str, **kw: Any
) -> AsyncIterator[tuple[AmqpLink, Replies, str, str]]:
    reply_q, server_q = f"{unique}.reply", f"{unique}.server"
    replies = Replies()
    link = AmqpLink(
        url,
        reply_q,
        replies,
        reply_queue_arguments={"x-expires": 60_000},
        heartbeat_s=kw.pop("heartbeat_s", 30),
        **kw,
    )
    async with await aio_pika.connect(url) as conn:
        ch = await conn.channel()
        await ch.declare_queue(reply_q, durable=True, arguments={"x-expires": 60_000})
        await ch.declare_queue(server_q, durable=True)
    try:
        await link.start()
        yield link, replies, reply_q, server_q
    finally:
        await link.close()


def prepared(session: str) -> Prepared:
    return Prepared(
        Properties(
            headers={"x-event": "data", "x-session": session},
            reply_to="r",
            delivery_mode=2,
        )
    )


async def drain(url: str, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    out = []
    async with await aio_pika.connect(url) as conn:
        ch = await conn.channel()
        q = await ch.get_queue(queue)
        while (m := await q.get(no_ack=True, fail=False)) is not None:
            out.append(m)
    return out


async def test_publish_confirm_return_and_consume(broker_url: str, unique: str) -> None:
    try:
        async with link_to(broker_url, unique) as (link, replies, reply_q, server_q):
            futs = [link.publish(server_q, b"m%d" % i, prepared("s1")) for i in range(200)]
            other = Properties(headers={"x-event": "connect"}, reply_to="r", delivery_mode=2)
            futs.append(link.publish(server_q, b"", other))
            await asyncio.gather(*futs)
            got = await drain(broker_url, server_q)
            assert [m.body for m in got] == [b"m%d" % i for i in range(200)] + [b""]
            assert got[0].headers == {"x-event": "data", "x-session": "s1"}
            assert got[0].reply_to == "r" and got[0].delivery_mode == 2
            assert len({m.message_id for m in got}) == len(got)  # one id per publish
            assert link.published == 201 and link.batches < 201

            # no queue by that name: returned, then confirmed -> unroutable
            with pytest.raises(PublishFailed) as info:
                await link.publish(f"{unique}.nobody", b"x", prepared("s1"))
            assert info.value.reason == "unroutable"

            # replies, with what the gateway reads of them
            async with await aio_pika.connect(broker_url) as conn:
                ch = await conn.channel()
                for i in range(50):
                    await ch.default_exchange.publish(
                        aio_pika.Message(b"r%d" % i, headers={"x-session": "s1"}),
                        routing_key=reply_q,
                    )
                await ch.default_exchange.publish(
                    aio_pika.Message(b"", headers={"x-close": True}, correlation_id="c"),
                    routing_key=reply_q,
                )
                await ch.default_exchange.publish(
                    aio_pika.Message(b"big" * 100_000, headers={"n": 7}), routing_key=reply_q
                )
            got_r = await replies.wait(52)
            assert [d.body for d in got_r[:50]] == [b"r%d" % i for i in range(50)]
            assert got_r[0].headers == {"x-session": "s1"}
            assert got_r[50].headers == {"x-close": True}
            assert got_r[50].properties().correlation_id == "c"
            assert got_r[51].body == b"big" * 100_000 and got_r[51].headers == {"n": 7}
    finally:
        await delete_names(broker_url, [], [f"{unique}.reply", f"{unique}.server"])


async def test_reconnects_after_a_cut(broker_url: str, unique: str) -> None:
    parts = urllib.parse.urlsplit(broker_url)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    url = proxy.url(parts.username or "guest", parts.password or "guest")
    try:
        async with link_to(url, unique) as (link, replies, reply_q, server_q):
            await link.publish(server_q, b"before", prepared("s"))
            # publishes in the confirm window when the connection goes: confirmed or failed
            window = [link.publish(server_q, b"w%d" % i, prepared("s")) for i in range(300)]
            await asyncio.sleep(0)
            proxy.cut()
            results = await asyncio.gather(*window, return_exceptions=True)
            for r in results:
                assert r is None or (
                    isinstance(r, PublishFailed) and r.reason == "channel_error"
                ), r
            # published while down: waits for the reconnect, then goes
            after = link.publish(server_q, b"after", prepared("s"))
            await asyncio.wait_for(after, 30)
            await until(lambda: link.consuming, "consuming again")
            assert link.reconnects >= 1 and proxy.connections >= 2
            async with await aio_pika.connect(broker_url) as conn:
                ch = await conn.channel()
                await ch.default_exchange.publish(
                    aio_pika.Message(b"reply", headers={"x-session": "s"}), routing_key=reply_q
                )
            assert (await replies.wait(1))[0].body == b"reply"
            bodies = [m.body for m in await drain(broker_url, server_q)]
            confirmed = [b"w%d" % i for i, r in enumerate(results) if r is None]
            assert bodies[0] == b"before" and bodies[-1] == b"after"
            assert set(confirmed) <= set(bodies)  # confirmed ones are all there
    finally:
        await proxy.stop()
        await delete_names(broker_url, [], [f"{unique}.reply", f"{unique}.server"])


async def test_reply_queue_deleted_is_declared_and_consumed_again(
    broker_url: str, unique: str
) -> None:
    try:
        async with link_to(broker_url, unique) as (link, replies, reply_q, server_q):
            async with await aio_pika.connect(broker_url) as conn:
                ch = await conn.channel()
                await ch.queue_delete(reply_q)
                await until(lambda: not link.consuming, "consumer cancelled")
                await until(lambda: link.consuming, "consuming again")
                await ch.default_exchange.publish(
                    aio_pika.Message(b"back", headers={"x-session": "s"}), routing_key=reply_q
                )
            assert (await replies.wait(1))[0].body == b"back"
            await link.publish(server_q, b"still", prepared("s"))  # publish channel unharmed
    finally:
        await delete_names(broker_url, [], [f"{unique}.reply", f"{unique}.server"])


async def test_exclusive_consumer_is_refused(broker_url: str, unique: str) -> None:
    try:
        async with link_to(broker_url, unique) as (link, _, reply_q, _q):
            second = AmqpLink(broker_url, reply_q, Replies())
            with pytest.raises(Exception) as info:
                await second.start()
            assert getattr(info.value, "code", None) == 403
            assert link.consuming
    finally:
        await delete_names(broker_url, [], [f"{unique}.reply", f"{unique}.server"])


async def test_silent_broker_expires_publishes_then_recovers(broker_url: str, unique: str) -> None:
    parts = urllib.parse.urlsplit(broker_url)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    url = proxy.url(parts.username or "guest", parts.password or "guest")
    try:
        async with link_to(url, unique, timeout=1.0, heartbeat_s=2) as (link, _, _r, server_q):
            proxy.stall()
            stuck = link.publish(server_q, b"x", prepared("s"))
            await asyncio.sleep(1.5)
            assert link.expire(time.monotonic()) == 1
            with pytest.raises(PublishFailed) as info:
                await stuck
            assert info.value.reason == "timeout"
            # heartbeats notice the silence; the link reconnects once bytes flow again
            await until(lambda: not link.connected, "link dropped the silent connection")
            proxy.resume()
            await asyncio.wait_for(link.publish(server_q, b"y", prepared("s")), 30)
    finally:
        await proxy.stop()
        await delete_names(broker_url, [], [f"{unique}.reply", f"{unique}.server"])


async def test_publish_channel_closed_by_broker_is_reopened(broker_url: str, unique: str) -> None:
    from pamqp.commands import Basic

    from workers.gateway import amqp_codec as codec

    try:
        async with link_to(broker_url, unique) as (link, _, _r, server_q):
            await link.publish(server_q, b"a", prepared("s"))
            # a publish to an exchange that does not exist: the broker closes channel 1 (404)
            link._write(
                codec.method_frame(Basic.Publish(exchange=f"{unique}.nope", routing_key="k"), 1)
                + codec.encode_content_pamqp(1, Properties(), b"x", 4096)
            )
            racing = link.publish(server_q, b"b", prepared("s"))
            try:
                await racing
            except PublishFailed as exc:  # unconfirmed when the channel closed
                assert exc.reason == "channel_error"
            await until(lambda: link.connected, "publish channel open again")
            await link.publish(server_q, b"c", prepared("s"))
            assert link.reconnects == 0 and link.consuming  # the connection stayed
            bodies = [m.body for m in await drain(broker_url, server_q)]
            assert bodies[0] == b"a" and bodies[-1] == b"c"
    finally:
        await delete_names(broker_url, [], [f"{unique}.reply", f"{unique}.server"])
