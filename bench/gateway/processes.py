"""The processes around the gateway under test: its settings, the echo backend and the direct TCP
echo server (``python -m bench.gateway --role ...``), and the cleanup of its names."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

from bench.gateway.clients import STAMP
from bench.harness.broker import delete_names
from bench.harness.procs import WorkerProcess
from bench.harness.report import broker_url
from workers.gateway.backend import Reply, ServerEvent
from workers.gateway.config import EVENT_DATA
from workers.gateway.wire import (
    PONG_FRAME,
    FrameDecoder,
    FrameType,
    encode_data,
    encode_welcome,
)


def gateway_env(prefix: str, port: int) -> dict[str, str]:
    return {
        "BRIDGE_GATEWAY__HOST": "127.0.0.1",
        "BRIDGE_GATEWAY__PORT": str(port),
        "BRIDGE_GATEWAY__SERVERS_EXCHANGE": f"{prefix}.servers",
        "BRIDGE_GATEWAY__SERVER_QUEUE_PREFIX": f"{prefix}.server.",
        "BRIDGE_GATEWAY__UNDELIVERABLE_QUEUE": f"{prefix}.undeliverable",
        "BRIDGE_GATEWAY__REPLY_QUEUE_PREFIX": f"{prefix}.reply.",
        "BRIDGE_GATEWAY__REGISTRY_QUEUE_PREFIX": f"{prefix}.registry.",
        "BRIDGE_GATEWAY__OFFLINE_QUEUE_PREFIX": f"{prefix}.offline.",
        "BRIDGE_GATEWAY__OFFLINE_EXCHANGE": f"{prefix}.offline",
        "BRIDGE_GATEWAY__INSTANCE": prefix,
        "BRIDGE_GATEWAY__MAX_CONNECTIONS": "20000",
        "BRIDGE_LOG_LEVEL": "WARNING",
    }


class Child:
    """``python -m bench.gateway --role ...`` that prints 'ready' once serving."""

    def __init__(self, role: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.gateway", "--role", *role],
                env={**os.environ, **env},
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=str(Path(__file__).resolve().parents[2]),
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if b"ready" not in line:
            raise RuntimeError(f"{role} did not start: {log.read_text()[-2000:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def stamp_echo(event: ServerEvent) -> list[Reply]:
    """The reference echo, with the time the message reached the backend written into the
    payload's second clock (``bench.gateway.clients.STAMP``) for the client's split of the
    round trip."""
    if event.event != EVENT_DATA:
        return []
    body = event.body
    if len(body) >= STAMP.size:
        sent, _ = STAMP.unpack_from(body)
        body = STAMP.pack(sent, time.monotonic_ns()) + body[STAMP.size :]
    return [Reply(body)]


async def role_echo_backend(server_id: str) -> None:
    """The echo backend of every path (gateway, STOMP): the reference
    :class:`~workers.gateway.backend.BackendServer`, on the project's own data path, with
    :func:`stamp_echo` as its handler."""
    from workers.gateway.backend import BackendServer
    from workers.gateway.config import GatewaySettings

    server = BackendServer(
        broker_url(),
        server_id,
        settings=GatewaySettings(),
        heartbeat_s=2.0,
        prefetch=512,
        handler=stamp_echo,
    )
    await server.start()
    print("ready", flush=True)
    await _until_signalled()
    await server.stop()


class _DirectEcho(asyncio.Protocol):
    def __init__(self) -> None:
        self.decoder = FrameDecoder(1 << 20, 4096)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is only alike
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        for frame in self.decoder.feed(data):
            if frame.type is FrameType.DATA:
                self.transport.write(encode_data(frame.payload))
            elif frame.type is FrameType.HELLO:
                self.transport.write(encode_welcome("s", "direct", 30))
            elif frame.type is FrameType.PING:
                self.transport.write(PONG_FRAME)


async def role_tcp_echo(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_DirectEcho, "127.0.0.1", port)
    print("ready", flush=True)
    await _until_signalled()
    server.close()


# -- scenarios --------------------------------------------------------------------------


async def wait_alive(gateway: WorkerProcess, server_id: str, timeout: float = 30.0) -> None:
    import json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = gateway.http("/admin/gateway/summary")
        if status == 200 and server_id in json.loads(body).get("servers_alive", []):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"server {server_id} never became alive at the gateway")


async def cleanup(prefixes: list[str], server_ids: list[str]) -> None:
    for prefix in prefixes:
        # the replicas' sticky stream and peers exchange follow the servers exchange
        await delete_names(
            broker_url(),
            [f"{prefix}.servers", f"{prefix}.servers.peers", f"{prefix}.offline"],
            [
                f"{prefix}.undeliverable",
                *(f"{prefix}.server.{s}" for s in server_ids),
                f"{prefix}.servers.sticky",
            ],
        )
