"""Everything that is not a well-behaved client gets the answer the contract promises:
HTTP gets an HTTP 400 text, anything else an ERROR frame, and the connection closes."""

from __future__ import annotations

import asyncio
import json
import ssl

import pytest

from tests.integration.gateway.helpers import (
    error_code,
    gateway_settings,
    raw_exchange,
    running_gateway,
    self_signed_cert,
)
from workers.gateway.client import GatewayClient, GatewayError
from workers.gateway.wire import FrameType, encode, encode_data, encode_hello

pytestmark = pytest.mark.integration

# The first bytes of a real TLS 1.2/1.3 ClientHello record.
TLS_CLIENT_HELLO = bytes.fromhex("160301020001") + b"\x00" * 80


def refused(gw, reason: str) -> float:
    families = {m.name: m for m in gw.host.registry.collect()}
    return sum(
        s.value
        for s in families["bridge_gateway_refused"].samples
        if s.name.endswith("_total") and s.labels["reason"] == reason
    )


async def test_bad_inputs_are_answered(broker_url, tmp_path, unique):
    s = gateway_settings(
        unique,
        hello_timeout_s=0.3,
        max_hello_frame=64,
        max_frame=1000,
        max_connections=3,
        no_server_wait_s=0.2,
        tokens="secret-a, secret-b",
    )
    async with running_gateway(broker_url, tmp_path, s, servers=()) as gw:
        good = {"token": "secret-b"}

        # no server registered: a short wait, then ERROR no_server
        with pytest.raises(GatewayError) as info:
            await gw.connect(**good)
        assert info.value.code == "no_server"
        await gw.start_server("s1")

        # an HTTP request gets a plain-text HTTP 400 and the connection closes
        data, _ = await raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert b"HELLO" in data.split(b"\r\n\r\n", 1)[1]

        cases = {
            "tls_not_supported": TLS_CLIENT_HELLO,
            "frame_too_large": b"\xde\xad\xbe\xef garbage that is not a frame",
            "bad_type": b"\x00\x00\x00\x03\x09hi",
            "bad_frame": b"\x00\x00\x00\x00",
            "not_hello": encode_data(b"data before hello"),
            "bad_hello": encode(FrameType.HELLO, b"{not json"),
        }
        for code, payload in cases.items():
            data, frames = await raw_exchange(gw.port, payload)
            assert error_code(frames) == code, (code, data)

        # HELLO larger than max_hello_frame (64) though well under max_frame
        big_hello = encode(FrameType.HELLO, json.dumps({"v": 1, "pad": "x" * 100}).encode())
        _, frames = await raw_exchange(gw.port, big_hello)
        assert error_code(frames) == "frame_too_large"

        # no HELLO at all within hello_timeout_s
        _, frames = await raw_exchange(gw.port, b"")
        assert error_code(frames) == "hello_timeout"

        # tokens: missing or wrong -> unauthorized; a listed one is welcome
        for kwargs in ({}, {"token": "secret-c"}, {"token": "secret-a "}):
            with pytest.raises(GatewayError) as info:
                await gw.connect(**kwargs)
            assert info.value.code == "unauthorized"
        client = await gw.connect(token="secret-a")

        # after HELLO the larger max_frame applies, and is enforced too
        assert await client.request(b"y" * 1000) == b"y" * 1000
        client.writer.write(encode_data(b"z" * 1001))
        last = await client.wait_closed()
        assert last is not None and last.type is FrameType.ERROR
        assert json.loads(last.payload)["code"] == "frame_too_large"

        # max_connections (3): the fourth is refused with busy
        await asyncio.sleep(0)  # let the gateway see the last close
        for _ in range(100):
            if not gw.worker.sessions:
                break
            await asyncio.sleep(0.02)
        held = [await gw.connect(**good) for _ in range(3)]
        with pytest.raises(GatewayError) as info:
            await gw.connect(**good)
        assert info.value.code == "busy"
        for c in held:
            await c.bye()

        # a HELLO cannot name a queue or a server: extra keys are ignored
        client = await gw.connect(**good)
        assert client.server == "s1"
        await client.bye()
        sneaky_hello = encode(
            FrameType.HELLO,
            json.dumps({"v": 1, "token": "secret-a", "server": "evil", "queue": "x"}).encode(),
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(sneaky_hello)
        sneaky = GatewayClient(reader, writer)
        frame = await sneaky.next_frame()
        assert frame is not None and frame.type is FrameType.WELCOME
        assert json.loads(frame.payload)["server"] == "s1"
        await sneaky.bye()

        for reason in (
            "no_server",
            "http_not_supported",
            "hello_timeout",
            "unauthorized",
            "busy",
            *cases,
        ):
            assert refused(gw, reason) >= 1, reason


async def test_tls_listener(broker_url, tmp_path, unique):
    cert, key = self_signed_cert(tmp_path)
    s = gateway_settings(unique, tls_cert=cert, tls_key=key, tls_port=0)
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        context = ssl.create_default_context(cafile=str(cert))
        client = await GatewayClient.connect(
            "127.0.0.1", gw.worker.ports["tls"], ssl_context=context, client_id="tls-1"
        )
        gw.clients.append(client)
        assert client.server == "s1"
        assert await client.request(b"over tls") == b"over tls"
        events = await gw.servers["s1"].wait_events(
            lambda evs: any(e.body == b"over tls" for e in evs)
        )
        assert events[-1].client_id == "tls-1"
        await client.bye()
        # the plain port still speaks plain framing and refuses a TLS handshake
        _, frames = await raw_exchange(gw.port, TLS_CLIENT_HELLO)
        assert error_code(frames) == "tls_not_supported"
        # and HELLO on the TLS port works only over TLS
        data, frames = await raw_exchange(gw.worker.ports["tls"], encode_hello())
        assert not any(f.type is FrameType.WELCOME for f in frames), data
