"""Offline replies (docs/gateway.md, "Offline replies"): a reply for a sticky client_id that
is not connected is kept in RabbitMQ and written to the client when it connects again,
through the same replica or another one; what overflows or expires goes to
gateway.undeliverable with its reason.

Every wait is on a condition with a generous deadline; nothing asserts how long it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from typing import Any

import pytest

from bench.harness.broker import delete_names
from tests.conftest import get_messages
from tests.integration.gateway.helpers import (
    SERVER_HEARTBEAT_S,
    Replica,
    cleanup,
    gateway_settings,
    publish_reply,
    queue_depth,
    running_gateway,
    wait_until,
)
from workers.gateway.backend import BackendServer

pytestmark = pytest.mark.integration

DEADLINE = 60.0


async def _gone(gw: Any, session: str) -> None:
    """The gateway has let the session go (its disconnect reached the server)."""
    await gw.servers["s1"].wait_events(
        lambda evs: any(e.event == "disconnect" and e.session == session for e in evs)
    )


async def test_replies_kept_while_offline_come_first_on_reconnect(
    broker_url, amqp, tmp_path, unique
):
    s = gateway_settings(unique, offline_max_messages=3000)
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        first = await gw.connect(client_id="dev-1")
        assert await first.request(b"hello") == b"hello"
        session = first.session
        await first.bye()
        await _gone(gw, session)
        queue = s.offline_queue("dev-1")
        # many: writing them takes longer than an echo's round trip
        kept = [b"kept-%d" % i for i in range(2000)]
        channel = await amqp.channel()
        for body in kept:
            await _reply(channel, s.reply_queue, body, session)
        await channel.close()
        await wait_until(
            lambda: gw.metric("bridge_gateway_offline_replies_total", event="kept") == len(kept),
            "all kept",
        )
        assert await queue_depth(amqp, queue) == len(kept)
        # a client without a client_id gets nothing of it
        other = await gw.connect()
        assert await other.request(b"x") == b"x"

        again = await gw.connect(client_id="dev-1")
        await again.send(b"live")  # its echo comes after every kept reply
        got = [await again.recv() for _ in range(len(kept) + 1)]
        assert got == [*kept, b"live"]
        assert gw.metric("bridge_gateway_offline_replies_total", event="delivered") == len(kept)
        assert await queue_depth(amqp, queue) == 0  # acknowledged once written
        # nothing went to the undeliverable queue
        assert await get_messages(amqp, s.undeliverable_queue, 1, timeout=0.5) == []
        await again.bye()
    await delete_names(broker_url, [], [queue])


async def test_overflow_and_expiry_go_to_undeliverable_with_reason(
    broker_url, amqp, tmp_path, unique
):
    s = gateway_settings(unique, offline_max_messages=2, offline_ttl_s=1.0)
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        client = await gw.connect(client_id="dev-2")
        session = client.session
        await client.bye()
        await _gone(gw, session)
        for i in range(3):
            await publish_reply(amqp, s, b"r%d" % i, {"x-session": session, "x-trace": i})
        # the third does not fit: refused by the broker, kept in gateway.undeliverable
        dead = await get_messages(amqp, s.undeliverable_queue, 1)
        assert [(m.body, m.headers["x-dead-reason"]) for m in dead] == [(b"r2", "offline_overflow")]
        assert dead[0].headers["x-session"] == session
        # the first two expire after offline_ttl_s and arrive there too, with the broker's reason
        dead = await get_messages(amqp, s.undeliverable_queue, 2, timeout=20)
        assert [(m.body, m.headers["x-dead-reason"]) for m in dead] == [
            (b"r0", "offline_expired"),
            (b"r1", "offline_expired"),
        ]
        assert {m.headers["x-first-death-reason"] for m in dead} == {"expired"}
        assert {m.headers["x-client-id"] for m in dead} == {"dev-2"}
        assert gw.metric("bridge_gateway_offline_replies_total", event="overflow") == 1
        # nothing left for the client; and no marker of its return lands anywhere
        again = await gw.connect(client_id="dev-2")
        assert await again.request(b"after") == b"after"
        await again.bye()
        assert await get_messages(amqp, s.undeliverable_queue, 1, timeout=1.5) == []
    await delete_names(broker_url, [], [s.offline_queue("dev-2")])


async def test_without_offline_replies_the_reply_is_session_gone(
    broker_url, amqp, tmp_path, unique
):
    s = gateway_settings(unique, offline_max_messages=0)
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        client = await gw.connect(client_id="dev-3")
        session = client.session
        await client.bye()
        await _gone(gw, session)
        await publish_reply(amqp, s, b"late", {"x-session": session})
        dead = await get_messages(amqp, s.undeliverable_queue, 1)
        assert [(m.body, m.headers["x-dead-reason"]) for m in dead] == [(b"late", "session_gone")]
        assert await queue_depth(amqp, s.offline_queue("dev-3")) == -1


# -- two replicas as real processes ------------------------------------------------------


async def test_offline_replies_follow_the_client_to_another_replica(
    broker_url, amqp, tmp_path, unique
):
    s = gateway_settings(unique)
    a = Replica("a", s, broker_url, tmp_path)
    b = Replica("b", s, broker_url, tmp_path)
    server = BackendServer(
        broker_url, "s1", settings=s, heartbeat_s=SERVER_HEARTBEAT_S, keep_events=True
    )
    client_id = "device/ü 7"  # not of the queue-name alphabet: its queue is named by a digest
    try:
        await asyncio.gather(a.start(), b.start())
        await server.start()
        first = await a.connect(client_id)
        assert await first.request(b"via a") == b"via a"
        session = first.session
        await first.bye()
        await server.wait_events(
            lambda evs: any(e.event == "disconnect" and e.session == session for e in evs)
        )
        # the server answers the old session after the client went: replica a keeps it
        channel = await amqp.channel()
        for i in range(3):
            await _reply(channel, a.reply_queue, b"kept-%d" % i, session)
        queue = s.offline_queue(client_id)
        assert queue.startswith(s.offline_queue_prefix + "#")
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while await queue_depth(amqp, queue) != 3:
            assert asyncio.get_running_loop().time() < deadline, "3 replies kept"
            await asyncio.sleep(0.05)

        # the client comes back through replica b: the kept replies first, then new ones
        back = await b.connect(client_id)
        await back.send(b"live")
        assert [await back.recv() for _ in range(4)] == [b"kept-0", b"kept-1", b"kept-2", b"live"]
        # a reply to the old session that comes late, while the client is on b, reaches it
        await _reply(channel, a.reply_queue, b"late", session)
        assert await back.recv() == b"late"
        assert await queue_depth(amqp, queue) == 0
        await back.bye()

        # the usual race: the client is back through b before the server's answer to its
        # old session reaches a (so b found no queue to read); a keeps it and tells b
        quick = "quick-1"
        old = await a.connect(quick)
        old_session = old.session
        await old.bye()
        await server.wait_events(
            lambda evs: any(e.event == "disconnect" and e.session == old_session for e in evs)
        )
        new = await b.connect(quick)
        assert await new.request(b"new") == b"new"
        await _reply(channel, a.reply_queue, b"answer to the old session", old_session)
        assert await new.recv() == b"answer to the old session"
        await new.bye()
        await channel.close()
    finally:
        await server.stop()
        a.proc.stop()
        b.proc.stop()
        await cleanup(broker_url, s, ["s1"])
        await delete_names(
            broker_url,
            [],
            [a.reply_queue, b.reply_queue, s.offline_queue(client_id), s.offline_queue("quick-1")],
        )


async def _reply(channel: Any, reply_queue: str, body: bytes, session: str) -> None:
    import aio_pika

    await channel.default_exchange.publish(
        aio_pika.Message(body, headers={"x-session": session}), routing_key=reply_queue
    )


async def _saved_sessions(replica: Replica) -> set[str]:
    """The sessions replica's SQLite store has saved (workers/gateway/store.py)."""
    path = replica.proc.state_dir / "gateway" / f"{replica.instance}.sqlite3"

    def read() -> set[str]:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            try:
                return {sid for (sid,) in conn.execute("SELECT sid FROM sessions")}
            except sqlite3.OperationalError:  # not created yet
                return set()

    return await asyncio.to_thread(read)


async def test_replies_for_sessions_of_a_killed_replica_are_kept_when_it_comes_back(
    broker_url, amqp, tmp_path, unique
):
    s = gateway_settings(unique)
    flush = {"BRIDGE_GATEWAY__STATE_FLUSH_S": "0.2"}
    a = Replica("a", s, broker_url, tmp_path, env=flush)
    b = Replica("b", s, broker_url, tmp_path, env=flush)
    server = BackendServer(
        broker_url, "s1", settings=s, heartbeat_s=SERVER_HEARTBEAT_S, keep_events=True
    )
    client_id = "killed-1"
    queue = s.offline_queue(client_id)
    try:
        await asyncio.gather(a.start(), b.start())
        await server.start()
        owned = await a.connect(client_id)
        assert await owned.request(b"hi") == b"hi"
        anonymous = await a.connect(None)  # no client_id: nobody to keep its replies for
        assert await anonymous.request(b"hi") == b"hi"
        session, other = owned.session, anonymous.session
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while session not in await _saved_sessions(a):
            assert asyncio.get_running_loop().time() < deadline, "the session saved"
            await asyncio.sleep(0.05)
        assert other not in await _saved_sessions(a)

        a.proc.kill9()
        owned.close()
        anonymous.close()
        # the server answers both sessions while their replica is down: a's reply queue
        # keeps the answers until the same instance comes back
        channel = await amqp.channel()
        await _reply(channel, a.reply_queue, b"for the client", session)
        await _reply(channel, a.reply_queue, b"for nobody", other)
        await a.start()  # same instance, same state directory
        while await queue_depth(amqp, queue) != 1:
            assert asyncio.get_running_loop().time() < deadline, "the reply kept"
            await asyncio.sleep(0.05)
        dead = await get_messages(amqp, s.undeliverable_queue, 1)
        assert [(m.body, m.headers["x-dead-reason"], m.headers["x-session"]) for m in dead] == [
            (b"for nobody", "session_gone", other)
        ]

        # the client comes back through the other replica and gets it first
        back = await b.connect(client_id)
        await back.send(b"live")
        assert [await back.recv() for _ in range(2)] == [b"for the client", b"live"]
        await back.bye()
        await channel.close()
    finally:
        await server.stop()
        a.proc.stop()
        b.proc.stop()
        await cleanup(broker_url, s, ["s1"])
        await delete_names(broker_url, [], [a.reply_queue, b.reply_queue, queue])
