"""One live connection per proven client_id across gateway replicas (issue 18; docs/gateway.md,
"Client identities"): two real replica processes with a token secret; a replica that admits
a proven client_id says so on the peers exchange, and one holding an older connection of
that id closes it with ERROR ``replaced``.

Every wait is on a condition with a generous deadline; nothing asserts how long it took.
"""

from __future__ import annotations

import asyncio

import aio_pika
import pytest

from bench.harness.broker import delete_names
from tests.integration.gateway.helpers import (
    SERVER_HEARTBEAT_S,
    Replica,
    cleanup,
    gateway_settings,
    where_it_went,
)
from tests.integration.gateway.test_identity import SECRET, token
from workers.gateway.backend import BackendServer
from workers.gateway.client import GatewayClient, GatewayError

pytestmark = pytest.mark.integration

ENV = {
    "BRIDGE_GATEWAY__CLIENT_TOKEN_SECRET": SECRET,
    "BRIDGE_GATEWAY__UNPROVEN_CLIENT_ID": "hint",  # a HELLO client_id without proof: a hint
}


async def _replaced(client: GatewayClient) -> bool:
    """True if ``client`` gets ERROR replaced within a few seconds, False if nothing comes."""
    try:
        got = await client.recv(timeout=5)
    except GatewayError as exc:
        assert exc.code == "replaced"
        return True
    except TimeoutError:
        return False
    raise AssertionError(f"unexpected message {got!r}")


async def test_a_newer_connection_through_another_replica_replaces_the_older(
    broker_url, amqp, tmp_path, unique
):
    s = gateway_settings(unique, client_token_secret=SECRET)
    a = Replica("a", s, broker_url, tmp_path, env=ENV)
    b = Replica("b", s, broker_url, tmp_path, env=ENV)
    server = BackendServer(
        broker_url, "s1", settings=s, heartbeat_s=SERVER_HEARTBEAT_S, keep_events=True
    )
    try:
        await asyncio.gather(a.start(), b.start())
        await server.start()
        old = await a.connect("alice", token("alice"))
        assert await old.request(b"via a") == b"via a"
        bob = await a.connect("bob", token("bob"))
        assert await bob.request(b"bob") == b"bob"

        new = await b.connect("alice", token("alice"))
        assert await _replaced(old), "the older connection (on a) gets ERROR replaced"
        assert await new.request(b"via b") == b"via b"
        assert await a.metric("bridge_gateway_replaced_total") == 1
        assert await a.metric("bridge_gateway_closed_total", reason="replaced") == 1
        assert await b.metric("bridge_gateway_replaced_total") == 0
        await server.wait_events(
            lambda evs: any(e.event == "disconnect" and e.session == old.session for e in evs)
        )

        # A reply to the replaced session goes where it goes with one replica (kept for
        # the offline client_id and given to its live connection, or gateway.undeliverable),
        # once: never to both connections.
        channel = await amqp.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(b"for the old one", headers={"x-session": old.session}),
            routing_key=a.reply_queue,  # the server answers through the old session's replica
        )
        await channel.close()
        to_new, kept = await where_it_went(amqp, s, new)
        assert to_new + [m.body for m in kept] == [b"for the old one"]
        assert all(m.headers["x-dead-reason"] == "session_gone" for m in kept)

        # another id on a is not affected; a hint with the same id replaces nobody
        assert await bob.request(b"bob again") == b"bob again"
        hint = await b.connect("alice")
        assert await hint.request(b"hint") == b"hint"
        assert not await _replaced(new)
        assert await new.request(b"still b") == b"still b"
        assert await b.metric("bridge_gateway_replaced_total") == 0

        # the newest wins in the other direction too: back on a, b's connection goes
        newest = await a.connect("alice", token("alice"))
        assert await _replaced(new)
        assert await newest.request(b"back on a") == b"back on a"
        assert await b.metric("bridge_gateway_replaced_total") == 1
        for client in (bob, hint, newest):
            await client.bye()
        for client in (old, new):
            client.close()

        # two at once, one on each replica: exactly one survives, whichever it is
        both = await asyncio.gather(
            a.connect("carol", token("carol")), b.connect("carol", token("carol"))
        )
        lost = await asyncio.gather(*(_replaced(c) for c in both))
        assert sorted(lost) == [False, True], "one of the two is replaced, never both or none"
        [winner] = [c for c, gone in zip(both, lost, strict=True) if not gone]
        assert await winner.request(b"carol") == b"carol"
        await winner.bye()
        for client in both:
            client.close()
    finally:
        await server.stop()
        a.proc.stop()
        b.proc.stop()
        await cleanup(broker_url, s, ["s1"])
        await delete_names(
            broker_url,
            [],
            [
                a.reply_queue,
                b.reply_queue,
                *(s.offline_queue(c) for c in ("alice", "bob", "carol")),
            ],
        )
