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

from bench.harness.broker import delete_names
from bench.harness.procs import WorkerProcess
from bench.harness.report import broker_url
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


async def role_echo_backend(server_id: str) -> None:
    """The echo backend of every path (gateway, STOMP), on the project's own data path
    (:mod:`bridge.amqp`): the contract of :class:`workers.gateway.backend.BackendServer`
    (register and heartbeat on the servers exchange, consume ``<prefix>.server.<id>``,
    answer each message to its ``reply_to`` with its ``x-session`` and ``correlation_id``,
    acknowledge it once the broker confirmed the answer), without aio-pika's cost per
    message: on two cores the reference backend took about as much CPU per round trip as
    the gateway and the broker together, for every path alike."""
    import json

    from bridge.amqp.consumer import Consumer, QueueSpec
    from bridge.amqp.frames import Delivery, Properties
    from bridge.amqp.link import Link
    from bridge.amqp.publisher import Publisher
    from workers.gateway.backend import BackendServer
    from workers.gateway.config import (
        H_SESSION,
        OP_DEREGISTER,
        OP_HEARTBEAT,
        OP_REGISTER,
        GatewaySettings,
    )

    settings = GatewaySettings()
    # declarations (the servers exchange, the quorum queue) as the reference backend makes them
    declared = BackendServer(broker_url(), server_id, settings=settings)
    await declared.start()
    await declared.stop(deregister=False)
    link = Link(broker_url(), name=f"bench echo backend {server_id}")
    replies = Publisher(link, name="replies")
    consumer: Consumer | None = None

    def on_message(delivery: Delivery) -> None:
        props = delivery.properties
        session = (props.headers or {}).get(H_SESSION)
        if not props.reply_to:
            assert consumer is not None
            consumer.ack(delivery)
            return
        answer = Properties(
            headers={H_SESSION: session} if session is not None else {},
            correlation_id=props.correlation_id,
        )
        sent = replies.publish("", props.reply_to, delivery.body, answer, mandatory=False)
        sent.add_done_callback(lambda f: _settle(f, delivery))

    def _settle(f: asyncio.Future[None], delivery: Delivery) -> None:
        assert consumer is not None
        if f.cancelled() or f.exception() is not None:
            consumer.nack(delivery, requeue=True)
        else:
            consumer.ack(delivery)

    consumer = Consumer(
        link,
        QueueSpec(settings.server_queue(server_id), arguments={"x-queue-type": "quorum"}),
        on_message,
        prefetch=512,
    )
    await link.start()

    def announce(op: str) -> asyncio.Future[None]:
        body = json.dumps({"op": op, "server_id": server_id}).encode()
        props = Properties(content_type="application/json")
        return replies.publish(settings.servers_exchange, "", body, props, mandatory=False)

    await announce(OP_REGISTER)

    async def beat() -> None:
        while True:
            await asyncio.sleep(2.0)
            with contextlib.suppress(Exception):
                await announce(OP_HEARTBEAT)

    beating = asyncio.get_running_loop().create_task(beat())
    print("ready", flush=True)
    await _until_signalled()
    beating.cancel()
    with contextlib.suppress(Exception):
        await announce(OP_DEREGISTER)
    await link.close()


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
