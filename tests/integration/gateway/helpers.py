"""Shared pieces of the gateway integration tests: unique settings, a running gateway with
in-test echo backends, raw sockets for bad input, a proxy that can hold back the broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.exceptions
import pytest

from bench.harness.broker import delete_names
from bench.harness.procs import WorkerProcess, free_port, settings_env
from tests.conftest import get_messages, running_host
from workers.gateway.backend import BackendServer, Handler, echo
from workers.gateway.client import GatewayClient
from workers.gateway.config import GatewaySettings
from workers.gateway.wire import Frame, FrameDecoder, FrameType
from workers.gateway.worker import GatewayWorker

SERVER_HEARTBEAT_S = 0.2


def gateway_settings(unique: str, **overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "servers_exchange": f"{unique}.gateway.servers",
        "server_queue_prefix": f"{unique}.gateway.server.",
        "undeliverable_queue": f"{unique}.gateway.undeliverable",
        "reply_queue_prefix": f"{unique}.gateway.reply.",
        "registry_queue_prefix": f"{unique}.gateway.registry.",
        "offline_queue_prefix": f"{unique}.gateway.offline.",
        "offline_exchange": f"{unique}.gateway.offline",
        "instance": f"{unique}-gw",
        "server_ttl_s": 1.0,
        "no_server_wait_s": 3.0,
        "tick_s": 0.05,
        "state_flush_s": 0.2,
    }
    if "listeners" in overrides:
        del values["port"]  # LISTENERS replaces PORT
    values.update(overrides)
    return GatewaySettings(**values)


# What a gateway process needs to use a test's names and port
ENV_FIELDS = (
    "host",
    "port",
    "servers_exchange",
    "server_queue_prefix",
    "undeliverable_queue",
    "reply_queue_prefix",
    "registry_queue_prefix",
    "offline_queue_prefix",
    "offline_exchange",
    "instance",
)


def env_for(settings: GatewaySettings, *extra: str) -> dict[str, str]:
    """The test's names (and the ``extra`` fields) as BRIDGE_GATEWAY__* variables, for a
    worker subprocess."""
    return settings_env("gateway", settings, (*ENV_FIELDS, *extra))


@dataclass
class Gateway:
    worker: GatewayWorker
    host: Any
    settings: GatewaySettings
    broker_url: str
    servers: dict[str, BackendServer] = field(default_factory=dict)
    clients: list[GatewayClient] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.worker.port

    async def connect(self, **kwargs: Any) -> GatewayClient:
        """A client that is closed when the test's gateway stops."""
        client = await GatewayClient.connect("127.0.0.1", self.port, **kwargs)
        self.clients.append(client)
        return client

    def close_clients(self) -> None:
        for client in self.clients:
            client.close()

    async def start_server(
        self, server_id: str, handler: Handler = echo, *, wait: bool = True
    ) -> BackendServer:
        server = BackendServer(
            self.broker_url,
            server_id,
            settings=self.settings,
            heartbeat_s=SERVER_HEARTBEAT_S,
            handler=handler,
            keep_events=True,
        )
        await server.start()
        self.servers[server_id] = server
        if wait:
            await wait_until(lambda: self.worker.balancer.is_alive(server_id), f"{server_id} alive")
        return server

    def admin(self, view: str) -> Any:
        return self.host.admin(f"gateway/{view}")

    def metric(self, name: str, **labels: str) -> float:
        return self.host.registry.get_sample_value(name, labels) or 0.0


async def wait_until(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def cleanup(url: str, s: GatewaySettings, server_ids: list[str]) -> None:
    await delete_names(
        url,
        [s.servers_exchange, s.peers_exchange_name, s.offline_exchange],
        [
            s.undeliverable_queue,
            s.reply_queue,
            s.sticky_stream_name,
            *(s.server_queue(i) for i in server_ids),
        ],
    )


@contextlib.asynccontextmanager
async def running_gateway(
    broker_url: str,
    state: Path,
    settings: GatewaySettings,
    servers: tuple[str, ...] = ("s1", "s2"),
    *,
    handler: Handler = echo,
    keep_names: list[str] | None = None,
) -> AsyncIterator[Gateway]:
    """A gateway in this event loop plus echo backends; names cleaned up after.

    ``keep_names`` collects server ids for a caller that cleans up itself (restart tests).
    """
    worker = GatewayWorker(settings)
    used: list[str] = list(servers)
    try:
        async with running_host(broker_url, state, [worker]) as host:
            gw = Gateway(worker, host, settings, broker_url)
            try:
                for server_id in servers:
                    await gw.start_server(server_id, handler)
                yield gw
            finally:
                gw.close_clients()
                used.extend(gw.servers)
                for server in gw.servers.values():
                    await server.stop()
    finally:
        if keep_names is not None:
            keep_names.extend(used)
        else:
            await cleanup(broker_url, settings, sorted(set(used)))


# -- raw sockets ------------------------------------------------------------------------


async def raw_exchange(
    port: int, payload: bytes, *, timeout: float = 10.0
) -> tuple[bytes, list[Frame]]:
    """Send raw bytes, read until the gateway closes; return the bytes and frames read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if payload:
            writer.write(payload)
            await writer.drain()
        data = await asyncio.wait_for(read_to_eof(reader), timeout)
    finally:
        writer.close()
    return data, frames_of(data)


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def frames_of(data: bytes) -> list[Frame]:
    try:
        return FrameDecoder(1 << 30, 0, role="client").feed(data)
    except Exception:
        return []


def error_code(frames: list[Frame]) -> str | None:
    errors = [f for f in frames if f.type is FrameType.ERROR]
    return json.loads(errors[-1].payload)["code"] if errors else None


# -- broker side -----------------------------------------------------------------------


async def publish_reply(
    amqp: Any, settings: GatewaySettings, body: bytes, headers: dict[str, Any]
) -> None:
    """Publish as a server would: default exchange, routing key = the gateway's reply queue."""
    channel = await amqp.channel()
    try:
        await channel.default_exchange.publish(
            aio_pika.Message(body, headers=headers), routing_key=settings.reply_queue
        )
    finally:
        await channel.close()


async def queue_depth(amqp: Any, queue: str) -> int:
    """Messages ready in ``queue``; -1 if it does not exist."""
    channel = await amqp.channel()
    try:
        q = await channel.declare_queue(queue, passive=True)
        return int(q.declaration_result.message_count or 0)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return -1
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


# -- TLS ---------------------------------------------------------------------------------


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 made with the openssl command (the
    ``cryptography`` package is not a dependency of this project)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


# -- a proxy that can hold back what the broker sends -----------------------------------


class HoldingProxy:
    """TCP proxy to the broker whose broker -> client direction can be held (confirms,
    deliveries), to fill the gateway's publish window on demand."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> HoldingProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def url(self, user: str, password: str) -> str:
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, held: bool) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    if held:
                        await self.flowing.wait()
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))

    async def stop(self) -> None:
        self.flowing.set()
        for w in self._writers:
            with contextlib.suppress(Exception):
                w.transport.abort()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def small_rcvbuf_socket() -> socket.socket:
    """A client socket with a tiny receive buffer, so a client that stops reading is felt
    by the gateway after kilobytes rather than megabytes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    return sock


REPLICA_DEADLINE = 60.0  # generous: the machine is shared


class Replica:
    """A gateway replica as a real process (`rabbitmq-bridge run gateway`) with the test's
    names, its own port, instance and disk, and short peer timings; ``env`` adds or
    overrides variables."""

    def __init__(
        self,
        name: str,
        s: GatewaySettings,
        broker_url: str,
        tmp: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.instance = f"{s.instance}-{name}"
        self.reply_queue = s.reply_queue_prefix + self.instance
        self.tcp_port = free_port()
        self.proc = WorkerProcess(
            ["gateway"],
            broker_url=broker_url,
            state_dir=tmp / f"state-{name}",  # its own disk: what it knows comes from peers
            env={
                **env_for(s),
                "BRIDGE_GATEWAY__PORT": str(self.tcp_port),
                "BRIDGE_GATEWAY__INSTANCE": self.instance,
                "BRIDGE_GATEWAY__SERVER_TTL_S": "2",
                "BRIDGE_GATEWAY__TICK_S": "0.1",
                "BRIDGE_GATEWAY__PEER_REPORT_S": "0.2",
                "BRIDGE_GATEWAY__PEER_DEBOUNCE_S": "0.02",
                "BRIDGE_GATEWAY__PEER_TTL_S": "1.5",
                "BRIDGE_DRAIN_SECONDS": "5",
                **(env or {}),
            },
            log=tmp / f"{name}.log",
        )

    async def start(self) -> Replica:
        self.proc.start()
        await asyncio.to_thread(self.proc.wait_ready, REPLICA_DEADLINE)
        return self

    async def admin(self, view: str) -> Any:
        status, body = await asyncio.to_thread(self.proc.http, f"/admin/gateway/{view}", 5.0)
        return json.loads(body) if status == 200 else None

    async def global_view(self) -> dict[str, int]:
        snap = await self.admin("associations")
        return {k: v for k, v in snap["global_clients"].items() if v}

    async def sticky_server(self, client_id: str) -> str | None:
        doc = await self.admin(f"sticky/{urllib.parse.quote(client_id, safe='')}")
        return None if doc is None else doc["server"]

    async def connect(self, client_id: str | None, token: str | None = None) -> GatewayClient:
        return await GatewayClient.connect(
            "127.0.0.1", self.tcp_port, client_id=client_id, token=token
        )

    async def metric(self, name: str, **labels: str) -> float:
        scrape = await asyncio.to_thread(self.proc.metrics)
        return scrape.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


async def where_it_went(amqp: Any, s: Any, client: GatewayClient) -> tuple[list[bytes], list[Any]]:
    """What ``client`` received and what landed in gateway.undeliverable, once either has
    something, and a second longer for a copy that should not come."""
    loop = asyncio.get_running_loop()
    received: list[bytes] = []
    kept: list[Any] = []
    deadline = loop.time() + 20
    settle: float | None = None
    while loop.time() < (settle or deadline):
        kept += await get_messages(amqp, s.undeliverable_queue, 1, timeout=0.1)
        try:
            received.append(await client.recv(timeout=0.1))
        except TimeoutError:
            pass
        if (received or kept) and settle is None:
            settle = loop.time() + 1.0
    return received, kept
