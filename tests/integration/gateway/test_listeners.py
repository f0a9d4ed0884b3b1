"""Listeners for clients that already exist (BRIDGE_GATEWAY__LISTENERS): length, lines and
raw framings beside frames, over real sockets, a real broker and echo backends."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.conftest import running_host
from tests.integration.gateway.helpers import (
    Gateway,
    HoldingProxy,
    cleanup,
    error_code,
    gateway_settings,
    raw_exchange,
    read_to_eof,
    running_gateway,
    wait_until,
)
from workers.gateway.backend import Reply, ServerEvent
from workers.gateway.session import OPEN
from workers.gateway.wire import FrameDecoder, FrameType, encode_data, encode_hello
from workers.gateway.worker import GatewayWorker

LISTENERS: list[dict[str, Any]] = [
    {"port": 0, "framing": "frames"},
    {"port": 0, "framing": "length", "length_bytes": 2, "byte_order": "little"},
    {"port": 0, "framing": "length", "length_bytes": 4},
    {"port": 0, "framing": "lines"},
    {"port": 0, "framing": "raw"},
]


@contextlib.asynccontextmanager
async def gateway(
    broker_url: str, tmp_path: Path, unique: str, **kw: Any
) -> AsyncIterator[Gateway]:
    handler = kw.pop("handler", None)
    s = gateway_settings(unique, listeners=kw.pop("listeners", LISTENERS), **kw)
    extra = {"handler": handler} if handler is not None else {}
    async with running_gateway(broker_url, tmp_path, s, servers=("s1",), **extra) as gw:
        yield gw


async def open_conn(gw: Gateway, label: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", gw.worker.ports[label])


def events_of(gw: Gateway, addr: str) -> list[tuple[str, bytes]]:
    return [(e.event, e.body) for e in gw.servers["s1"].events if e.client_addr == addr]


def local_addr(writer: asyncio.StreamWriter) -> str:
    host, port = writer.get_extra_info("sockname")[:2]
    return f"{host}:{port}"


async def test_every_framing_round_trips_without_hello(broker_url, tmp_path, unique):
    async with gateway(broker_url, tmp_path, unique) as gw:
        assert set(gw.worker.ports) == {"frames", "length", "length-2", "lines", "raw"}
        assert gw.port == gw.worker.ports["frames"]
        messages = [b"one", b"", b"three \x00\xff"]

        # length, 2 bytes little-endian: two frames in one write, one cut in half
        r, w = await open_conn(gw, "length")
        prefix = struct.pack("<H", len(messages[2]))
        w.write(b"".join(struct.pack("<H", len(m)) + m for m in messages[:2]) + prefix[:1])
        await w.drain()
        w.write(prefix[1:] + messages[2][:3])
        await asyncio.sleep(0.05)
        w.write(messages[2][3:])
        got = [
            await r.readexactly(struct.unpack("<H", await r.readexactly(2))[0]) for _ in messages
        ]
        assert got == messages
        addr = local_addr(w)
        w.close()
        await wait_until(lambda: ("disconnect", b"") in events_of(gw, addr), "disconnect")
        assert events_of(gw, addr) == [
            ("connect", b""),
            *[("data", m) for m in messages],
            ("disconnect", b""),
        ]

        # length, 4 bytes big-endian
        r, w = await open_conn(gw, "length-2")
        w.write(struct.pack(">I", 5) + b"hello")
        assert await r.readexactly(9) == b"\x00\x00\x00\x05hello"
        w.close()

        # lines: CRLF accepted, the terminator is not part of the message; replies get \n
        r, w = await open_conn(gw, "lines")
        w.write(b"first\r\nsecond\n\nthi")
        await w.drain()
        w.write(b"rd\n")
        assert [await r.readline() for _ in range(4)] == [
            b"first\n",
            b"second\n",
            b"\n",
            b"third\n",
        ]
        addr = local_addr(w)
        await wait_until(lambda: len(events_of(gw, addr)) == 5, "lines at the server")
        assert [b for e, b in events_of(gw, addr) if e == "data"] == [
            b"first",
            b"second",
            b"",
            b"third",
        ]
        w.close()

        # raw: each chunk is a message, order kept
        r, w = await open_conn(gw, "raw")
        for chunk in (b"abc", b"defgh"):
            w.write(chunk)
            await w.drain()
            assert await r.readexactly(len(chunk)) == chunk
        w.close()

        # frames keeps working as it is, on the same gateway
        client = await gw.connect(client_id="framed")
        assert await client.request(b"framed") == b"framed"
        await client.bye()

        # accepted and counted like every connection
        assert gw.metric("bridge_gateway_accepted_total") >= 5


async def test_server_close_and_replies_in_each_framing(broker_url, tmp_path, unique):
    def handler(event: ServerEvent) -> list[Reply]:
        if event.event != "data":
            return []
        if event.body == b"quit":
            return [Reply(b"bye", close=True)]
        return [Reply(event.body.upper())]

    async with gateway(broker_url, tmp_path, unique, handler=handler) as gw:
        r, w = await open_conn(gw, "lines")
        w.write(b"hi\nquit\n")
        # the body of the closing reply is written, then the connection closes (no BYE bytes)
        assert await asyncio.wait_for(read_to_eof(r), 10) == b"HI\nbye\n"
        w.close()
        r, w = await open_conn(gw, "length")
        w.write(b"\x04\x00quit")
        assert await asyncio.wait_for(read_to_eof(r), 10) == b"\x03\x00bye"
        w.close()
        await wait_until(
            lambda: gw.metric("bridge_gateway_closed_total", reason="server_close") == 2,
            "closes counted",
        )


async def test_too_long_reply_for_a_one_byte_prefix_is_undeliverable(
    broker_url, tmp_path, unique, amqp
):
    def handler(event: ServerEvent) -> list[Reply]:
        return [Reply(event.body * 300)] if event.event == "data" else []

    listeners = [{"port": 0, "framing": "length", "length_bytes": 1}]
    async with gateway(broker_url, tmp_path, unique, handler=handler, listeners=listeners) as gw:
        r, w = await open_conn(gw, "length")
        w.write(b"\x01x")
        await wait_until(
            lambda: gw.metric("bridge_gateway_undeliverable_total", reason="too_large"),
            "kept as undeliverable",
        )
        # the session goes on: a reply that fits comes through
        w.write(b"\x00")
        assert await r.readexactly(1) == b"\x00"
        w.close()


async def test_limits_per_framing_close_after_what_came_before(broker_url, tmp_path, unique):
    async with gateway(broker_url, tmp_path, unique, max_frame=16, max_hello_frame=16) as gw:
        # what came before the violation is published, then the connection closes (the
        # echo of it finds the session gone), then the server gets disconnect
        cases = {
            "lines": (b"ok\n" + b"x" * 20, [b"ok"]),
            "length": (b"\x02\x00ok" + b"\x11\x00" + b"y" * 17, [b"ok"]),
            "length-2": (b"\xff\xff\xff\xff", []),
        }
        for label, (sent, published) in cases.items():
            r, w = await open_conn(gw, label)
            w.write(sent)
            assert await asyncio.wait_for(read_to_eof(r), 10) == b"", label
            addr = local_addr(w)
            w.close()
            await wait_until(lambda a=addr: ("disconnect", b"") in events_of(gw, a), "gone")
            assert [b for e, b in events_of(gw, addr) if e == "data"] == published, label
        assert gw.metric("bridge_gateway_closed_total", reason="frame_too_large") == 3
        # raw: a chunk longer than max_frame is cut, not refused
        r, w = await open_conn(gw, "raw")
        w.write(b"z" * 40)
        assert await r.readexactly(40) == b"z" * 40
        w.close()


async def test_idle_timeout_closes_every_framing(broker_url, tmp_path, unique):
    async with gateway(broker_url, tmp_path, unique, idle_timeout_s=0.5, heartbeat_s=0.2) as gw:
        conns = [await open_conn(gw, label) for label in ("length", "lines", "raw")]
        for r, _ in conns:
            # nothing written to them, no PING either: they just close
            assert await asyncio.wait_for(read_to_eof(r), 10) == b""
        for _, w in conns:
            w.close()
        assert gw.metric("bridge_gateway_closed_total", reason="idle_timeout") == 3


async def test_no_server_closes_a_stream_connection(broker_url, tmp_path, unique):
    s = gateway_settings(unique, listeners=LISTENERS, no_server_wait_s=0.2)
    async with running_gateway(broker_url, tmp_path, s, servers=()) as gw:
        r, w = await open_conn(gw, "lines")
        w.write(b"nobody\n")
        assert await asyncio.wait_for(read_to_eof(r), 10) == b""
        w.close()
        assert gw.metric("bridge_gateway_refused_total", reason="no_server") == 1


async def test_broker_backpressure_stops_reading_a_lines_client(broker_url, tmp_path, unique):
    parts = urlsplit(broker_url)
    proxy = await HoldingProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    s = gateway_settings(
        unique, listeners=[{"port": 0, "framing": "lines"}], publish_window=6, session_in_flight=4
    )
    worker = GatewayWorker(s)
    proxied = proxy.url(parts.username or "guest", parts.password or "guest")
    try:
        async with running_host(proxied, tmp_path, [worker]) as host:
            gw = Gateway(worker, host, s, broker_url)
            await gw.start_server("s1")
            r, w = await open_conn(gw, "lines")
            await wait_until(lambda: len(worker.sessions) == 1, "accepted")
            session = next(iter(worker.sessions.values()))
            await wait_until(lambda: session.state == OPEN and worker.in_flight == 0, "open")
            proxy.flowing.clear()  # confirms stop coming back
            w.write(b"".join(b"l%d\n" % i for i in range(50)))
            await wait_until(lambda: session.paused, "stopped reading")
            assert session.in_flight == 4
            proxy.flowing.set()
            got = [await r.readline() for _ in range(50)]
            assert got == [b"l%d\n" % i for i in range(50)]
            w.close()
            await gw.servers["s1"].stop()
    finally:
        await proxy.stop()
        await cleanup(broker_url, s, ["s1"])


async def test_frames_port_and_data_unchanged_by_default(broker_url, tmp_path, unique):
    """Without LISTENERS: one frames listener on PORT, as before."""
    s = gateway_settings(unique)
    async with running_gateway(broker_url, tmp_path, s, servers=("s1",)) as gw:
        assert set(gw.worker.ports) == {"tcp"}
        assert gw.worker.listen_ports() == [("BRIDGE_GATEWAY__PORT", "127.0.0.1", 0)]
        client = await gw.connect()
        client.writer.write(encode_data(b"x"))
        assert await client.recv() == b"x"
        await client.bye()


# -- PROXY protocol ----------------------------------------------------------------------

PROXIED: list[dict[str, Any]] = [
    {"port": 0, "framing": "frames", "proxy_protocol": True},
    {"port": 0, "framing": "lines", "proxy_protocol": True},
    {"port": 0, "framing": "raw", "proxy_protocol": True},
]


def v2_header(src: str, sport: int, *, local: bool = False) -> bytes:
    body = (
        bytes(int(x) for x in src.split("."))
        + bytes([10, 0, 0, 1])
        + struct.pack(">HH", sport, 7000)
    )
    return (
        b"\r\n\r\n\x00\r\nQUIT\n"
        + bytes([0x20 if local else 0x21, 0x11])
        + struct.pack(">H", len(body))
        + body
    )


async def test_proxy_protocol_v1_and_v2_give_the_client_address(broker_url, tmp_path, unique):
    async with gateway(broker_url, tmp_path, unique, listeners=PROXIED) as gw:
        # frames + v1, the header and HELLO in one write
        r, w = await open_conn(gw, "frames+proxy")
        w.write(b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 7000\r\n" + encode_hello("p1"))
        w.write(encode_data(b"via v1"))
        decoder = FrameDecoder(1 << 20, 0, role="client")
        frames: list[Any] = []
        while len(frames) < 2:
            frames += decoder.feed(await r.read(4096))
        assert [f.type for f in frames] == [FrameType.WELCOME, FrameType.DATA]
        assert frames[1].payload == b"via v1"
        w.close()

        # lines + v2, the header cut in two writes
        r, w = await open_conn(gw, "lines+proxy")
        header = v2_header("198.51.100.9", 40000)
        w.write(header[:7])
        await w.drain()
        await asyncio.sleep(0.05)
        w.write(header[7:] + b"via v2\n")
        assert await r.readline() == b"via v2\n"
        w.close()

        # raw + v2 LOCAL (the proxy's own health check): the real peer address stands
        r, w = await open_conn(gw, "raw+proxy")
        w.write(v2_header("192.0.2.1", 1, local=True) + b"local")
        assert await r.readexactly(5) == b"local"
        own = local_addr(w)
        w.close()

        await wait_until(lambda: len(gw.servers["s1"].events) >= 9, "all events")
        addrs = {(e.event, e.client_addr) for e in gw.servers["s1"].events}
        for addr in ("203.0.113.7:51000", "198.51.100.9:40000", own):
            assert {("connect", addr), ("data", addr), ("disconnect", addr)} <= addrs
        assert gw.metric("bridge_gateway_refused_total", reason="bad_proxy_header") == 0


async def test_connection_without_proxy_header_is_refused_and_counted(broker_url, tmp_path, unique):
    async with gateway(broker_url, tmp_path, unique, listeners=PROXIED, hello_timeout_s=0.5) as gw:
        # a frames client connecting directly gets an ERROR that says why
        _, frames = await raw_exchange(gw.worker.ports["frames+proxy"], encode_hello("direct"))
        assert error_code(frames) == "bad_proxy_header"
        # other framings are just closed
        for label, sent in (
            ("lines+proxy", b"hello\n"),
            ("raw+proxy", b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n"),
            ("lines+proxy", b"\r\n\r\n\x00\r\nQUIT\n\x11\x11\x00\x00"),
        ):
            data, _ = await raw_exchange(gw.worker.ports[label], sent)
            assert data == b"", label
        assert gw.metric("bridge_gateway_refused_total", reason="bad_proxy_header") == 4
        # a header that never comes: closed after hello_timeout_s
        data, _ = await raw_exchange(gw.worker.ports["lines+proxy"], b"PROXY TCP4 1.2")
        assert data == b""
        assert gw.metric("bridge_gateway_refused_total", reason="hello_timeout") == 1
        # nothing reached the server: no session was ever joined
        assert not [e for e in gw.servers["s1"].events if e.event == "connect"]


# -- pass-through ------------------------------------------------------------------------


class EchoUpstream:
    """A real TCP echo server standing for the service the traffic was meant for. It
    records what it received per connection and greets a connection that says nothing."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> EchoUpstream:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = bytearray()
        try:
            first = await asyncio.wait_for(reader.read(65536), 0.3)
        except TimeoutError:
            writer.write(b"220 upstream speaks first\r\n")
            first = await reader.read(65536)
        while first:
            got += first
            writer.write(first)
            await writer.drain()
            first = await reader.read(65536)
        self.received.append(bytes(got))
        writer.close()  # after the client's EOF

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_passthrough_relays_what_is_not_a_hello(broker_url, tmp_path, unique):
    upstream = await EchoUpstream().start()
    listeners = [{"port": 0, "passthrough": f"127.0.0.1:{upstream.port}"}]
    try:
        async with gateway(
            broker_url, tmp_path, unique, listeners=listeners, hello_timeout_s=1.0
        ) as gw:
            port = gw.port
            # an HTTP request, cut mid-method: relayed byte for byte, the answer comes back
            request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(request[:2])
            await w.drain()
            await asyncio.sleep(0.05)
            w.write(request[2:])
            assert await r.readexactly(len(request)) == request
            # a megabyte more through the same relay, then a half close
            bulk = bytes(range(256)) * 4096
            w.write(bulk)
            w.write_eof()
            assert await asyncio.wait_for(read_to_eof(r), 30) == bulk
            w.close()
            await wait_until(lambda: request + bulk in upstream.received, "upstream got all")

            # garbage that is not a frame, and a TLS ClientHello: relayed too
            for opener in (b"\xff\xff\xff\xff\x00junk", b"\x16\x03\x01\x02\x00\x01"):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(opener)
                assert await r.readexactly(len(opener)) == opener
                w.close()

            # a client that says nothing: after hello_timeout_s the upstream speaks first
            r, w = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(r.readline(), 10) == b"220 upstream speaks first\r\n"
            w.close()

            # a gateway client on the same port is served as always
            client = await gw.connect(client_id="native")
            assert await client.request(b"native") == b"native"
            await client.bye()
            # a HELLO that is broken is a gateway client's mistake, answered as such
            _, frames = await raw_exchange(port, b"\x00\x00\x00\x03\x01{]")
            assert error_code(frames) == "bad_hello"

            assert gw.metric("bridge_gateway_passthrough_total", result="relayed") == 4
            assert not [e for e in gw.servers["s1"].events if e.client_id != "native"]
    finally:
        await upstream.stop()


async def test_passthrough_to_an_upstream_that_is_down_closes(broker_url, tmp_path, unique):
    upstream = await EchoUpstream().start()
    port = upstream.port
    await upstream.stop()  # nothing listens there any more
    listeners = [{"port": 0, "passthrough": f"127.0.0.1:{port}"}]
    async with gateway(broker_url, tmp_path, unique, listeners=listeners) as gw:
        data, _ = await raw_exchange(gw.port, b"GET / HTTP/1.1\r\n\r\n")
        assert data == b""
        assert gw.metric("bridge_gateway_passthrough_total", result="upstream_failed") == 1
