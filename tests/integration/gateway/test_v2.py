"""Acknowledged delivery, frames protocol version 2 (docs/gateway.md, "Protocol version 2"):
each client DATA carries a sequence number, the gateway ACKs it once the broker confirmed
it, the server sees it as x-seq; what was ACKed survives a kill -9 of the gateway, and a
client that resends what was not ACKed through another replica loses nothing.

Every wait is on a condition with a generous deadline; nothing asserts how long it took.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from bench.harness.broker import delete_names
from tests.integration.gateway.helpers import (
    SERVER_HEARTBEAT_S,
    Replica,
    cleanup,
    gateway_settings,
    running_gateway,
    wait_until,
)
from workers.gateway.backend import BackendServer, ServerEvent
from workers.gateway.client import GatewayClient
from workers.gateway.wire import FrameType, encode_data

pytestmark = pytest.mark.integration

DEADLINE = 60.0


def seq(n: int) -> bytes:
    return n.to_bytes(8, "big")


async def test_v2_data_is_acked_once_confirmed_and_the_server_sees_x_seq(
    broker_url, tmp_path, unique
):
    s = gateway_settings(unique)
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        client = await gw.connect(client_id="v2-a", version=2)
        assert client.welcome["v"] == 2
        for n, body in ((7, b"seven"), (8, b""), (2**63 - 1, b"last")):
            await client.send_seq(n, body)
        got = [await client.recv() for _ in range(3)]
        assert got == [b"seven", b"", b"last"]  # the server echoes the message, not the number
        while len(client.acks) < 3:  # ACKs and echoes come in either order
            await asyncio.wait_for(client.next_frame(), 10)
        assert client.acks == [7, 8, 2**63 - 1]
        events = [e for e in gw.servers["s1"].events if e.event == "data"]
        assert [(e.body, e.headers["x-seq"], e.client_id) for e in events] == [
            (b"seven", 7, "v2-a"),
            (b"", 8, "v2-a"),
            (b"last", 2**63 - 1, "v2-a"),
        ]
        # a version 1 client is unchanged: no ACK, no x-seq, the payload as it is
        v1 = await gw.connect()
        assert v1.welcome["v"] == 1
        assert await v1.request(b"1234") == b"1234"
        last = [e for e in gw.servers["s1"].events if e.event == "data"][-1]
        assert last.body == b"1234" and "x-seq" not in last.headers
        assert v1.acks == []
        # a v2 DATA too short for its sequence number: the DATA before it is published,
        # then ERROR bad_frame
        await client.send_seq(9, b"ok")
        await client.send(b"1234567")
        with contextlib.suppress(Exception):
            while True:
                frame = await asyncio.wait_for(client.next_frame(), 10)
                if frame is None or frame.type is FrameType.ERROR:
                    break
        assert client.frames == [] and frame is not None and frame.type is FrameType.ERROR
        assert b"bad_frame" in frame.payload
        await gw.servers["s1"].wait_events(
            lambda evs: any(e.headers.get("x-seq") == 9 for e in evs)
        )


async def test_v2_acked_data_survives_kill_9_and_the_rest_is_resent_elsewhere(
    broker_url, tmp_path, unique
):
    s = gateway_settings(unique)
    a = Replica("a", s, broker_url, tmp_path)
    b = Replica("b", s, broker_url, tmp_path)
    server = BackendServer(
        broker_url, "s1", settings=s, heartbeat_s=SERVER_HEARTBEAT_S, keep_events=True
    )
    client_id = "v2-kill"
    total = 5000
    body = b"m" * 200
    try:
        await asyncio.gather(a.start(), b.start())
        await server.start()
        first = await GatewayClient.connect("127.0.0.1", a.tcp_port, client_id=client_id, version=2)
        acked: set[int] = set()

        async def read_acks(client: GatewayClient) -> None:
            with contextlib.suppress(Exception):
                while (frame := await client.next_frame()) is not None:
                    if frame.type is FrameType.ACK:
                        acked.add(int.from_bytes(frame.payload, "big"))

        reading = asyncio.get_running_loop().create_task(read_acks(first))
        sent = 0

        async def write() -> None:
            nonlocal sent
            with contextlib.suppress(ConnectionError):
                while sent < total:
                    first.writer.write(encode_data(seq(sent) + body))
                    sent += 1
                    if sent % 20 == 0:
                        await first.writer.drain()
                        await asyncio.sleep(0.002)

        writing = asyncio.get_running_loop().create_task(write())
        await wait_until(lambda: len(acked) >= 50, "50 ACKs", DEADLINE)
        a.proc.kill9()  # while DATA is still being written and confirmed
        acked_before_kill = set(acked)
        await asyncio.wait_for(reading, DEADLINE)
        writing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writing
        first.close()
        # some were written and never ACKed: the client cannot know whether they got in
        unacked = sorted(set(range(sent)) - acked_before_kill)
        assert unacked, "the kill came after the last ACK: nothing to resend"

        # the client comes back through replica b and resends what was not ACKed
        again = await GatewayClient.connect("127.0.0.1", b.tcp_port, client_id=client_id, version=2)
        reading = asyncio.get_running_loop().create_task(read_acks(again))
        for n in unacked:
            await again.send_seq(n, body)
        await wait_until(lambda: set(range(sent)) <= acked, "every message ACKed", DEADLINE)

        # the server got every message: what was ACKed before the kill among them
        def seen(evs: list[ServerEvent]) -> set[int]:
            return {
                e.headers["x-seq"] for e in evs if e.event == "data" and e.client_id == client_id
            }

        await server.wait_events(lambda evs: seen(evs) >= set(range(sent)), timeout=DEADLINE)
        data = [e for e in server.events if e.event == "data" and e.client_id == client_id]
        assert acked_before_kill <= seen(data)
        assert all(e.body == body for e in data)
        # duplicates (sent twice, got in twice) carry the same client id and sequence number
        counts: dict[int, int] = {}
        for e in data:
            counts[e.headers["x-seq"]] = counts.get(e.headers["x-seq"], 0) + 1
        assert set(counts) == set(range(sent))
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        await again.bye()
    finally:
        await server.stop()
        a.proc.stop()
        b.proc.stop()
        await cleanup(broker_url, s, ["s1"])
        await delete_names(
            broker_url,
            [],
            [a.reply_queue, b.reply_queue, s.offline_queue(client_id)],
        )
