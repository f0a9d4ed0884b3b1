"""The one dead-letter path (``bridge.amqp.messages.DeadLetters``) of delay and directed, for a
message another broker user published with its own ``user_id``: RabbitMQ closes a channel
whose publish carries a ``user_id`` other than the connection's user, so a dead letter that
kept the producer's ``user_id`` would fail, be requeued and come back forever. It must arrive
at the worker's dead-letter queue with its reason, without that ``user_id``, and the worker
must go on with the next message."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import aio_pika

from tests.broker_cli import rabbitmqctl, require_cli
from tests.integration.delay import helpers as delay
from tests.integration.directed import helpers as directed


@contextlib.asynccontextmanager
async def other_user(broker_url: str, unique: str) -> AsyncIterator[tuple[str, str]]:
    """A second broker user with full permissions on the vhost: (name, its URL)."""
    require_cli(broker_url)
    user, password = f"{unique}-producer", f"pw-{uuid.uuid4().hex}"
    parts = urlsplit(broker_url)
    vhost = parts.path[1:] or "/"
    await asyncio.to_thread(rabbitmqctl, "add_user", user, password)
    try:
        await asyncio.to_thread(rabbitmqctl, "set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        host = f"{parts.hostname}:{parts.port or 5672}"
        yield user, urlunsplit((parts.scheme, f"{user}:{password}@{host}", parts.path, "", ""))
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(rabbitmqctl, "delete_user", user)


async def publish_as(url: str, exchange: str, key: str, message: aio_pika.Message) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        ex = await channel.get_exchange(exchange)
        await ex.publish(message, key)
    finally:
        await connection.close()


async def test_delay_dead_letters_a_foreign_user_id_without_it(broker_url, amqp, tmp_path, unique):
    s = delay.delay_settings(unique)
    sink = await delay.make_sink(amqp, unique, "ok")
    async with (
        other_user(broker_url, unique) as (user, url),
        delay.delay_worker(
            broker_url, tmp_path, s, amqp, exchanges=[sink.exchange], queues=[sink.queue]
        ) as (_, client),
    ):
        bad = aio_pika.Message(
            b"bad",
            headers={"x-delay": "soon", "x-target-exchange": sink.exchange},
            message_id="foreign-bad",
            user_id=user,
        )
        await publish_as(url, s.in_exchange, "rk", bad)
        await client.send(b"good", sink.exchange, delay_ms=0, message_id="after")
        dead = await delay.dead_letters(amqp, s, 1)
        assert dead[0].message_id == "foreign-bad"
        assert delay.header(dead[0], "x-dead-reason") == "invalid_delay"
        assert dead[0].user_id is None
        assert [r.message.message_id for r in await sink.wait_for(1)] == ["after"]


async def test_directed_dead_letters_a_foreign_user_id_without_it(
    broker_url, amqp, tmp_path, unique
):
    s = directed.directed_settings(unique)
    async with (
        other_user(broker_url, unique) as (user, url),
        directed.directed(broker_url, tmp_path, s, amqp) as (_, client),
    ):
        bad = aio_pika.Message(b"no targets", message_id="foreign-bad", user_id=user)
        await publish_as(url, s.requests_exchange, "", bad)
        await client.send(b"fine", ["a"], message_id="after")
        dead = await directed.dead_letters(amqp, s, 1)
        assert dead[0].message_id == "foreign-bad"
        assert dead[0].headers["x-dead-reason"]
        assert dead[0].user_id is None
        assert (await directed.wait_applied(client, "after"))["total"] == 1
