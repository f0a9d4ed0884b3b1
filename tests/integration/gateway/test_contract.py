"""The gateway against a real RabbitMQ and real sockets: the wire contract end to end."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from urllib.parse import urlsplit

import aio_pika
import pytest

from bench.harness.proxy import TcpProxy
from tests.conftest import get_messages, running_host
from tests.integration.gateway.helpers import (
    Gateway,
    HoldingProxy,
    cleanup,
    gateway_settings,
    publish_reply,
    queue_depth,
    running_gateway,
    small_rcvbuf_socket,
    wait_until,
)
from workers.gateway.backend import Reply, ServerEvent, echo
from workers.gateway.client import GatewayClient, GatewayError
from workers.gateway.session import OPEN
from workers.gateway.wire import FrameType, encode_data, encode_hello
from workers.gateway.worker import GatewayWorker

pytestmark = pytest.mark.integration


async def test_balanced_assignment_and_round_trips(broker_url, tmp_path, unique):
    s = gateway_settings(unique)
    async with running_gateway(broker_url, tmp_path, s) as gw:
        clients = [await gw.connect(client_id=f"c{i}") for i in range(21)]
        per_server = Counter(c.server for c in clients)
        assert set(per_server) == {"s1", "s2"}
        assert max(per_server.values()) - min(per_server.values()) <= 1, per_server
        assert len({c.session for c in clients}) == 21
        assert all(c.welcome["v"] == 1 and c.welcome["heartbeat_s"] > 0 for c in clients)

        async def talk(i: int, client: GatewayClient) -> list[bytes]:
            return [await client.request(f"m{i}-{k}".encode()) for k in range(3)]

        replies = await asyncio.gather(*(talk(i, c) for i, c in enumerate(clients)))
        for i, got in enumerate(replies):
            assert got == [f"m{i}-{k}".encode() for k in range(3)]

        snapshot = gw.admin("associations")
        assert snapshot["associations"] == 21
        assert {k: v["clients"] for k, v in snapshot["servers"].items()} == dict(per_server)

        # every message reached the server the client was told about, with the headers
        for i, client in enumerate(clients):
            events = [e for e in gw.servers[client.server].events if e.session == client.session]
            assert [e.event for e in events] == ["connect", "data", "data", "data"]
            local = client.writer.get_extra_info("sockname")
            for e in events:
                assert e.client_id == f"c{i}"
                assert e.client_addr == f"{local[0]}:{local[1]}"
                assert e.gateway == s.instance
                assert e.reply_to == s.reply_queue
            assert events[0].body == b""

        for client in clients:
            await client.bye()
        for server in gw.servers.values():
            await server.wait_events(
                lambda evs: (
                    sum(e.event == "disconnect" for e in evs)
                    == sum(e.event == "connect" for e in evs)
                )
            )
        assert gw.admin("associations")["associations"] == 0
        families = {m.name: m for m in gw.host.registry.collect()}
        assert families["bridge_gateway_accepted"].samples[0].value == 21
        assert families["bridge_gateway_frames_in"].samples[0].value == 21 * (1 + 3 + 1)


async def test_pipelined_data_keeps_order_and_client_pings(broker_url, tmp_path, unique):
    s = gateway_settings(unique)
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        client = await gw.connect()
        for i in range(300):
            client.writer.write(encode_data(b"%d" % i))
        await client.ping()
        got = [await client.recv() for _ in range(300)]
        assert got == [b"%d" % i for i in range(300)]
        events = [e for e in gw.servers["s1"].events if e.session == client.session]
        assert [e.body for e in events[1:]] == [b"%d" % i for i in range(300)]
        # larger than an AMQP frame (128 KiB): split into body frames and joined again
        big = bytes(range(256)) * 2400
        assert await client.request(big) == big
        await client.bye()


async def test_idle_client_is_pinged_and_dead_one_closed(broker_url, tmp_path, unique):
    s = gateway_settings(unique, heartbeat_s=0.3, idle_timeout_s=2.5)
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        alive = await gw.connect()
        # answers PINGs (GatewayClient does) and so outlives the idle timeout
        for _ in range(2):
            frame = await asyncio.wait_for(alive.next_frame(), 5)
            assert frame is not None and frame.type is FrameType.PING
        # keeps reading (answering PINGs) in the background until a DATA arrives
        reply = asyncio.create_task(alive.recv(timeout=None))
        dead = await gw.connect()
        # this one never answers: it is closed with ERROR idle_timeout
        last = None
        while True:
            data = await asyncio.wait_for(dead.reader.read(65536), 10)
            if not data:
                break
            for frame in dead.decoder.feed(data):
                last = frame
        assert last is not None and last.type is FrameType.ERROR
        assert b"idle_timeout" in last.payload
        await alive.send(b"still here")
        assert await asyncio.wait_for(reply, 10) == b"still here"
        dead.close()
        await alive.bye()


async def test_expiry_offline_messages_and_reregistration(broker_url, amqp, tmp_path, unique):
    s = gateway_settings(unique)
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        early = await gw.connect(client_id="early")
        assert early.server == "s1"
        await gw.start_server("s2")
        # s1 goes silent (crash-like: no deregister); what the early client sends before s1
        # expires waits in s1's queue
        await gw.servers.pop("s1").stop(deregister=False)
        await early.send(b"offline-1")
        await early.send(b"offline-2")
        depth = 0
        for _ in range(100):
            depth = await queue_depth(amqp, s.server_queue("s1"))
            if depth >= 2:
                break
            await asyncio.sleep(0.05)
        assert depth == 2
        # it expires: no new clients, and its client moves to s2 (on_server_loss: move)
        await wait_until(lambda: not gw.worker.balancer.is_alive("s1"), "s1 expired")
        newcomers = [await gw.connect() for _ in range(4)]
        assert {c.server for c in newcomers} == {"s2"}
        await wait_until(
            lambda: gw.worker.sessions[early.session].server == "s2", "early moved to s2"
        )
        assert gw.admin("associations")["servers"].get("s1", {"clients": 0})["clients"] == 0
        # s1 comes back: it registers again, consumes its offline messages and answers
        # the session, which is still connected
        back = await gw.start_server("s1")
        assert await early.recv() == b"offline-1"
        assert await early.recv() == b"offline-2"
        assert [e.body for e in back.events if e.session == early.session] == [
            b"offline-1",
            b"offline-2",
        ]
        # and takes new clients again (it has the fewest)
        later = await gw.connect()
        assert later.server == "s1"
        # a deregistered server gets no new clients either
        await gw.servers["s2"].stop()
        await wait_until(lambda: not gw.worker.balancer.is_alive("s2"), "s2 deregistered")
        assert {(await gw.connect()).server for _ in range(3)} == {"s1"}
        gw.servers["s2"] = await gw.start_server("s2")


async def test_x_close_and_undeliverable_replies(broker_url, amqp, tmp_path, unique):
    s = gateway_settings(unique)

    def handler(event: ServerEvent) -> list[Reply]:
        if event.body == b"close me":
            return [Reply(b"goodbye", close=True)]
        return echo(event)

    async with running_gateway(broker_url, tmp_path, s, ("s1",), handler=handler) as gw:
        client = await gw.connect()  # no client_id: a reply after it goes is not kept offline
        session = client.session
        await client.send(b"close me")
        assert await client.recv() == b"goodbye"
        with pytest.raises(GatewayError) as info:
            await client.recv()
        assert info.value.code == "bye"
        assert await asyncio.wait_for(client.reader.read(), 5) == b""
        await gw.servers["s1"].wait_events(
            lambda evs: any(e.event == "disconnect" and e.session == session for e in evs)
        )
        # a reply for the session that is gone is kept, with its headers and a reason
        await publish_reply(
            amqp, s, b"too late", {"x-session": session, "x-trace": "t-1", "x-close": False}
        )
        await publish_reply(amqp, s, b"no session header", {"x-trace": "t-2"})
        dead = await get_messages(amqp, s.undeliverable_queue, 2)
        assert [(m.body, m.headers["x-dead-reason"]) for m in dead] == [
            (b"too late", "session_gone"),
            (b"no session header", "missing_session"),
        ]
        assert dead[0].headers["x-session"] == session and dead[0].headers["x-trace"] == "t-1"
        families = {m.name: m for m in gw.host.registry.collect()}
        reasons = {
            sample.labels["reason"]: sample.value
            for sample in families["bridge_gateway_undeliverable"].samples
            if sample.name.endswith("_total")
        }
        assert reasons == {"session_gone": 1, "missing_session": 1}


async def test_slow_consumer_is_disconnected(broker_url, amqp, tmp_path, unique):
    s = gateway_settings(unique, outbound_buffer_bytes=64 * 1024, close_flush_s=30)
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        sock = small_rcvbuf_socket()
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        client = GatewayClient(reader, writer)
        writer.write(encode_hello())
        frame = await client.next_frame()
        assert frame is not None and frame.type is FrameType.WELCOME
        session = gw.worker.sessions[json.loads(frame.payload)["session"]]
        # the server floods replies; the client reads nothing
        chunk = b"x" * 32 * 1024
        for _ in range(2000):
            if session.state != OPEN:
                break
            await publish_reply(amqp, s, chunk, {"x-session": session.sid})
        assert session.close_reason == "slow_consumer"
        # reading now drains what was buffered, then the ERROR, then EOF
        last = await client.wait_closed()
        assert last is not None and last.type is FrameType.ERROR
        assert b"slow_consumer" in last.payload
        await wait_until(lambda: session.sid not in gw.worker.sessions, "session released")


async def test_broker_backpressure_stops_reading(broker_url, tmp_path, unique):
    parts = urlsplit(broker_url)
    proxy = await HoldingProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    s = gateway_settings(unique, publish_window=6, session_in_flight=4)
    worker = GatewayWorker(s)
    proxied = proxy.url(parts.username or "guest", parts.password or "guest")
    gw_names: list[str] = []
    try:
        async with running_host(proxied, tmp_path, [worker]) as host:
            gw = Gateway(worker, host, s, broker_url)
            await gw.start_server("s1")
            gw_names.append("s1")
            a, b = await gw.connect(), await gw.connect()
            await wait_until(lambda: worker.in_flight == 0, "connect events confirmed")
            proxy.flowing.clear()  # confirms stop coming back
            for i in range(50):
                a.writer.write(encode_data(b"a%d" % i))
                b.writer.write(encode_data(b"b%d" % i))
            sa = worker.sessions[a.session]
            sb = worker.sessions[b.session]
            await wait_until(lambda: worker.in_flight == 6, "publish window full")
            await wait_until(lambda: sa.paused and sb.paused, "both sessions stopped reading")
            assert sa.in_flight + sb.in_flight == 6
            assert sa.in_flight <= 4 and sb.in_flight <= 4
            proxy.flowing.set()
            got_a = [await a.recv() for _ in range(50)]
            got_b = [await b.recv() for _ in range(50)]
            assert got_a == [b"a%d" % i for i in range(50)]
            assert got_b == [b"b%d" % i for i in range(50)]
            await a.bye()
            await b.bye()
            await gw.servers["s1"].stop()
            gw.close_clients()
    finally:
        await proxy.stop()
        await cleanup(broker_url, s, gw_names)


async def test_broker_connection_cut_sessions_survive(broker_url, tmp_path, unique):
    parts = urlsplit(broker_url)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    s = gateway_settings(unique)
    worker = GatewayWorker(s)
    proxied = proxy.url(parts.username or "guest", parts.password or "guest")
    try:
        async with running_host(proxied, tmp_path, [worker]) as host:
            gw = Gateway(worker, host, s, broker_url)  # backends use the broker directly
            try:
                await gw.start_server("s1")
                client = await gw.connect(client_id="survivor")
                assert await client.request(b"before") == b"before"
                proxy.accepting = False
                proxy.cut()
                await wait_until(lambda: not host.readiness()[0], "not ready while cut")
                proxy.accepting = True
                await wait_until(lambda: host.readiness()[0], "ready again", timeout=30)
                # the client never noticed: same session, replies flow again
                assert await client.request(b"after") == b"after"
                assert worker.sessions[client.session].server == "s1"
                families = {m.name: m for m in host.registry.collect()}
                # the data path's own connection came back, and says so
                assert families["bridge_gateway_link_reconnects"].samples[0].value >= 1
                assert families["bridge_gateway_link_up"].samples[0].value == 1
                await client.bye()
            finally:
                for server in gw.servers.values():
                    await server.stop()
                gw.close_clients()
    finally:
        await proxy.stop()
        await cleanup(broker_url, s, ["s1"])


async def test_deleted_server_queue_is_declared_again(broker_url, amqp, tmp_path, unique):
    s = gateway_settings(unique)
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        client = await gw.connect()
        await gw.servers.pop("s1").stop(deregister=False)
        channel = await amqp.channel()
        await channel.queue_delete(s.server_queue("s1"))
        await channel.close()
        # the publish comes back unroutable; the gateway declares the queue and retries
        await client.send(b"kept")
        for _ in range(200):
            if await queue_depth(amqp, s.server_queue("s1")) == 1:
                break
            await asyncio.sleep(0.05)
        [message] = await get_messages(amqp, s.server_queue("s1"), 1)
        assert message.body == b"kept" and message.headers["x-session"] == client.session
        assert worker_session_open(gw, client.session)


def worker_session_open(gw: Gateway, session: str) -> bool:
    return gw.worker.sessions[session].state == OPEN


async def test_cli_connect_sends_lines(broker_url, tmp_path, unique):
    s = gateway_settings(unique)
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "bridge.cli", "gateway", "connect", "--port", str(gw.port)),
            *("--client-id", "from-cli", "--linger", "20"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(b"one\ntwo words\n"), 60)
        assert proc.returncode == 0, err
        assert out.decode().splitlines() == ["one", "two words"]
        assert json.loads(err.decode().splitlines()[0])["server"] == "s1"
        events = await gw.servers["s1"].wait_events(
            lambda evs: any(e.event == "disconnect" for e in evs)
        )
        assert [e.event for e in events] == ["connect", "data", "data", "disconnect"]
        assert {e.client_id for e in events} == {"from-cli"}


async def test_server_queue_with_other_arguments_is_used(broker_url, amqp, tmp_path, unique):
    s = gateway_settings(unique)
    # an operator capped this server's queue (offline messages must not grow forever)
    channel = await amqp.channel()
    await channel.declare_queue(
        s.server_queue("capped"),
        durable=True,
        arguments={"x-queue-type": "quorum", "x-max-length": 1000},
    )
    await channel.close()
    try:
        async with running_gateway(broker_url, tmp_path, s, ("plain",)) as gw:
            # a bare registration: the gateway's own declaration of the queue differs
            registry = await amqp.channel()
            exchange = await registry.get_exchange(s.servers_exchange)
            body = json.dumps({"op": "register", "server_id": "capped"}).encode()
            await exchange.publish(aio_pika.Message(body), routing_key="")
            await registry.close()
            await wait_until(lambda: gw.worker.balancer.is_alive("capped"), "capped alive")
            clients = [await gw.connect() for _ in range(2)]
            assert sorted(c.server for c in clients) == ["capped", "plain"]
            capped = next(c for c in clients if c.server == "capped")
            await capped.send(b"waits in the capped queue")
            depth = 0
            for _ in range(100):
                depth = await queue_depth(amqp, s.server_queue("capped"))
                if depth == 2:  # connect + data
                    break
                await asyncio.sleep(0.05)
            assert depth == 2
            # and the registry consumer still works after the refused declaration
            await gw.servers["plain"].stop_heartbeats()
            await gw.servers["plain"].announce("deregister")
            await wait_until(lambda: not gw.worker.balancer.is_alive("plain"), "deregistered")
    finally:
        await cleanup(broker_url, s, ["capped"])
