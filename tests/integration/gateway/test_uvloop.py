"""The gateway on uvloop, as `rabbitmq-bridge run` runs it: uvloop's transports are not
asyncio.Transport subclasses and its flow control differs, so the socket paths run here too."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.integration.gateway.helpers import (
    error_code,
    gateway_settings,
    raw_exchange,
    running_gateway,
)
from workers.gateway.wire import FrameType, encode_data

uvloop = pytest.importorskip("uvloop")

pytestmark = pytest.mark.integration


def test_round_trips_and_rejections_on_uvloop(broker_url, tmp_path, unique):
    # A plain test with its own runner: pytest-asyncio picks loops per conftest hook, which
    # would switch every test of the directory.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario(broker_url, tmp_path, unique))


async def scenario(broker_url: str, tmp_path: Any, unique: str) -> None:
    assert "uvloop" in type(asyncio.get_running_loop()).__module__
    s = gateway_settings(unique, hello_timeout_s=0.3)
    async with running_gateway(broker_url, tmp_path, s) as gw:
        clients = [await gw.connect(client_id=f"u{i}") for i in range(6)]
        assert sorted(c.server for c in clients) == ["s1"] * 3 + ["s2"] * 3
        for c in clients:
            for i in range(100):
                c.writer.write(encode_data(b"%d" % i))
        for c in clients:
            assert [await c.recv() for _ in range(100)] == [b"%d" % i for i in range(100)]
        data, _ = await raw_exchange(gw.port, b"POST /x HTTP/1.1\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 400")
        _, frames = await raw_exchange(gw.port, b"")
        assert error_code(frames) == "hello_timeout"
        for c in clients:
            await c.bye()
            assert c.closed_by is None or c.closed_by.type is FrameType.BYE


def test_other_framings_proxy_header_and_passthrough_on_uvloop(broker_url, tmp_path, unique):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(listeners_scenario(broker_url, tmp_path, unique))


async def listeners_scenario(broker_url: str, tmp_path: Any, unique: str) -> None:
    assert "uvloop" in type(asyncio.get_running_loop()).__module__

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    upstream = await asyncio.start_server(echo, "127.0.0.1", 0)
    up_port = upstream.sockets[0].getsockname()[1]
    listeners = [
        {"port": 0, "passthrough": f"127.0.0.1:{up_port}"},
        {"port": 0, "framing": "lines", "proxy_protocol": True},
        {"port": 0, "framing": "length", "length_bytes": 2},
    ]
    s = gateway_settings(unique, listeners=listeners)
    try:
        async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
            # pass-through: the transport handed from the session to the relay (set_protocol)
            r, w = await asyncio.open_connection("127.0.0.1", gw.worker.ports["frames"])
            w.write(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 200_000)
            assert await r.readexactly(200_018) == b"GET / HTTP/1.1\r\n\r\n" + b"x" * 200_000
            w.close()
            r, w = await asyncio.open_connection("127.0.0.1", gw.worker.ports["lines+proxy"])
            w.write(b"PROXY TCP4 203.0.113.1 10.0.0.1 4000 7000\r\nline\n")
            assert await r.readline() == b"line\n"
            w.close()
            r, w = await asyncio.open_connection("127.0.0.1", gw.worker.ports["length"])
            w.write(b"\x00\x03abc")
            assert await r.readexactly(5) == b"\x00\x03abc"
            w.close()
            client = await gw.connect()
            assert await client.request(b"framed") == b"framed"
            await client.bye()
            assert "203.0.113.1:4000" in {e.client_addr for e in gw.servers["s1"].events}
    finally:
        upstream.close()
        await upstream.wait_closed()
