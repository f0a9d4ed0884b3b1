"""The load generator: echo clients over the gateway framing and over STOMP, and their
recorder of round trips."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import struct
import subprocess
import time
from collections.abc import Callable
from typing import Any, cast

from bench.harness.cpu import CpuWatch
from bench.harness.report import broker_url, progress
from bench.harness.stats import percentile, rnd
from workers.gateway.wire import PONG_FRAME, FrameDecoder, FrameType, encode_data, encode_hello

PAYLOAD = b"p" * 256
# Every echo payload starts with two clocks (CLOCK_MONOTONIC, nanoseconds, big-endian; the
# same clock in every process of the machine): when the client sent it, and when the echo
# backend got it (the backend writes it, see processes.stamp_echo). The client splits each
# round trip into its two legs with them: client -> backend and backend -> client.
STAMP = struct.Struct(">QQ")


def stamped(payload: bytes = PAYLOAD) -> bytes:
    """``payload`` with the send clock in front (its first 16 bytes replaced)."""
    return STAMP.pack(time.monotonic_ns(), 0) + payload[STAMP.size :]


def legs(echoed: bytes, now_ns: int) -> tuple[float, float] | None:
    """The two legs of a round trip in seconds, from an echoed payload; None if the echo
    did not pass the stamping backend (the direct TCP echo server)."""
    if len(echoed) < STAMP.size:
        return None
    sent, at_backend = STAMP.unpack_from(echoed)
    if not sent or not at_backend:
        return None
    return (at_backend - sent) / 1e9, (now_ns - at_backend) / 1e9


STOMP_PORT = 61613


# -- load generator ---------------------------------------------------------------------


class Recorder:
    """Round trips of all clients; only those inside the measuring window count."""

    def __init__(self) -> None:
        self.measuring = False
        self.running = True
        self.rtts: list[float] = []
        self.to_backend: list[float] = []
        self.from_backend: list[float] = []
        self.errors = 0

    def done(self, rtt: float, echoed: bytes) -> bool:
        """Record one round trip; True if the client should send again."""
        if self.measuring:
            self.rtts.append(rtt)
            split = legs(echoed, time.monotonic_ns())
            if split is not None:
                self.to_backend.append(split[0])
                self.from_backend.append(split[1])
        return self.running


class FramedClient(asyncio.Protocol):
    """An echo client of the gateway framing (used for the gateway and the direct server)."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.decoder = FrameDecoder(1 << 20, 0, role="client")
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is only alike
        self.transport = transport
        transport.write(encode_hello())

    def start(self) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(encode_data(stamped()))

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        for frame in self.decoder.feed(data):
            if frame.type is FrameType.DATA:
                now = time.perf_counter()
                if self.recorder.done(now - self.sent_at, frame.payload):
                    self.sent_at = now
                    self.transport.write(encode_data(stamped()))
            elif frame.type is FrameType.WELCOME:
                self.ready.set_result(None)
            elif frame.type is FrameType.PING:
                self.transport.write(PONG_FRAME)
            elif frame.type is FrameType.ERROR:
                self.recorder.errors += 1
                if not self.ready.done():
                    self.ready.set_exception(RuntimeError(frame.payload.decode()))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before WELCOME"))


class StompClient(asyncio.Protocol):
    """A minimal STOMP 1.2 echo client: SEND to the server queue, reply on a temp queue.

    ``confirmed``: the gateway's guarantees on this path, each SEND ``persistent:true`` with
    a ``receipt`` (the plugin then publishes with confirms and answers RECEIPT once the
    broker confirmed; the client counts them, as a gateway client would count ACKs, but
    sends its next message on the echo as on the other paths). Without it: the plugin's
    defaults, what a RabbitMQ user gets without asking (no receipt, transient)."""

    def __init__(self, recorder: Recorder, queue: str, *, confirmed: bool = False) -> None:
        self.recorder = recorder
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buf = bytearray()
        self.sent_at = 0.0
        self.receipts = 0
        extra = "persistent:true\nreceipt:r\n" if confirmed else ""
        self.head = (
            f"SEND\ndestination:/amq/queue/{queue}\nreply-to:/temp-queue/r\n{extra}"
            f"content-length:{len(PAYLOAD)}\n\n"
        ).encode()

    def send(self) -> None:
        assert self.transport is not None
        self.transport.write(self.head + stamped() + b"\x00")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is only alike
        self.transport = transport
        transport.write(
            b"CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\n"
            b"heart-beat:0,0\n\n\x00"
        )

    def start(self) -> None:
        self.sent_at = time.perf_counter()
        self.send()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        while True:
            while self.buf[:1] in (b"\n", b"\r"):  # heart-beats / EOLs between frames
                del self.buf[:1]
            head_end = self.buf.find(b"\n\n")
            if head_end < 0:
                return
            lines = bytes(self.buf[:head_end]).decode().split("\n")
            headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
            if "content-length" in headers:
                end = head_end + 2 + int(headers["content-length"])
                if len(self.buf) < end + 1:
                    return
            else:
                end = self.buf.find(b"\x00", head_end + 2)
                if end < 0:
                    return
            body = bytes(self.buf[head_end + 2 : end])
            del self.buf[: end + 1]
            command = lines[0]
            if command == "MESSAGE":
                now = time.perf_counter()
                if self.recorder.done(now - self.sent_at, body):
                    self.sent_at = now
                    self.send()
            elif command == "RECEIPT":
                self.receipts += 1
            elif command == "CONNECTED":
                self.ready.set_result(None)
            elif command == "ERROR":
                self.recorder.errors += 1
                if not self.ready.done():
                    self.ready.set_exception(RuntimeError(headers.get("message", "ERROR")))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before CONNECTED"))


async def echo_load(
    name: str,
    port: int,
    factory: Callable[[Recorder], FramedClient | StompClient],
    args: argparse.Namespace,
    pids: dict[str, int],
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    recorder = Recorder()
    clients = []
    for _ in range(args.clients):
        _, client = await loop.create_connection(lambda: factory(recorder), "127.0.0.1", port)
        clients.append(client)
    await asyncio.wait_for(asyncio.gather(*(c.ready for c in clients)), 30)
    for client in clients:
        client.start()

    def close() -> None:
        for client in clients:
            if client.transport is not None:
                client.transport.close()

    return await _measure(name, f"port {port}", recorder, args, pids, close)


async def amqp_echo_load(
    name: str, queue: str, args: argparse.Namespace, pids: dict[str, int]
) -> dict[str, Any]:
    """The echo workload with no gateway and no STOMP: the clients are AMQP clients of the
    project's data path (one connection, ``args.clients`` sessions on it), publishing each
    message as the gateway does (persistent, confirmed, into the same quorum queue, with
    ``x-session`` and ``reply_to``) and taking the echoes from an exclusive queue of their
    own. The broker's share of the other paths: what is left of a round trip without the
    gateway's hop."""
    from bridge.amqp.consumer import Consumer, QueueSpec
    from bridge.amqp.frames import Delivery, Properties
    from bridge.amqp.link import Link
    from bridge.amqp.publisher import Publisher
    from workers.gateway.config import H_SESSION

    recorder = Recorder()
    reply_queue = f"{queue}.amqp-echo.{os.getpid()}"
    link = Link(broker_url(), name="bench amqp echo clients")
    publisher = Publisher(link)
    sent_at = [0.0] * args.clients
    prepared = [
        Properties(headers={H_SESSION: str(i)}, reply_to=reply_queue, delivery_mode=2).encode()
        for i in range(args.clients)
    ]

    def send(i: int) -> None:
        sent_at[i] = time.perf_counter()
        publisher.publish("", queue, stamped(), prepared[i], mandatory=False)

    def on_echo(delivery: Delivery) -> None:
        session = (delivery.properties.headers or {}).get(H_SESSION)
        i = int(session.decode() if isinstance(session, bytes) else session)
        now = time.perf_counter()
        if recorder.done(now - sent_at[i], delivery.body):
            send(i)

    spec = QueueSpec(reply_queue, durable=False, exclusive=True, auto_delete=True)
    Consumer(link, spec, on_echo, prefetch=1000, no_ack=True, declare=True)
    await asyncio.wait_for(link.start(), 30)
    for i in range(args.clients):
        send(i)
    try:
        return await _measure(name, f"queue {queue}", recorder, args, pids, lambda: None)
    finally:
        await link.close()


async def _measure(
    name: str,
    where: str,
    recorder: Recorder,
    args: argparse.Namespace,
    pids: dict[str, int],
    close: Callable[[], None],
) -> dict[str, Any]:
    """Warm up, then count the round trips of ``args.seconds`` with the CPU of ``pids``."""
    await asyncio.sleep(args.warmup)
    watch = CpuWatch({**pids, "loadgen": os.getpid()}).start()
    recorder.measuring = True
    started = time.perf_counter()
    await asyncio.sleep(args.seconds)
    recorder.measuring = False
    elapsed = time.perf_counter() - started
    cpu = watch.stop()
    recorder.running = False
    await asyncio.sleep(0.5)
    close()
    rtts = recorder.rtts
    if not rtts:
        # A path that carried nothing is a set-up error (for the STOMP paths: --stomp-port
        # names another broker's plugin than the one at BRIDGE_AMQP_URL), not a result.
        raise SystemExit(
            f"{name}: no round trip completed in {args.seconds:g} s through {where} "
            f"({recorder.errors} errors); for the STOMP paths --stomp-port must be the "
            "plugin's port on the broker at BRIDGE_AMQP_URL"
        )
    rate = len(rtts) / elapsed
    # CPU time per round trip of each of our processes: much steadier than the rates when
    # other jobs share the machine, and it says where the work goes.
    per_rt = {
        k.removesuffix("_cores"): round(v * 1e6 / max(rate, 1e-9))
        for k, v in cpu.items()
        if k.endswith("_cores") and k != "machine_busy_cores"
    }
    result = {
        "messages_per_s": rnd(len(rtts) / elapsed, 1),
        "p50_ms": rnd(percentile(rtts, 50) * 1000, 3),
        "p99_ms": rnd(percentile(rtts, 99) * 1000, 3),
        "round_trips": len(rtts),
        **legs_summary(recorder),
        "errors": recorder.errors,
        "cpu_us_per_round_trip": {**per_rt, "total": sum(per_rt.values())},
        "cpu": cpu,
    }
    progress(name, result)
    return result


def legs_summary(recorder: Recorder) -> dict[str, Any]:
    """Where a round trip's time goes: client -> echo backend (through the gateway and the
    server's queue, or the STOMP plugin and the same queue) and back, p50 and p99 each."""
    if not recorder.to_backend:
        return {}
    return {
        "legs_ms": {
            name: {
                "p50": rnd(percentile(values, 50) * 1000, 3),
                "p99": rnd(percentile(values, 99) * 1000, 3),
            }
            for name, values in (
                ("to_backend", recorder.to_backend),
                ("from_backend", recorder.from_backend),
            )
        }
    }


# -- processes --------------------------------------------------------------------------


def stomp_reachable(port: int = STOMP_PORT) -> bool:
    import socket

    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 2):
        return True
    return False


def enable_stomp(port: int = STOMP_PORT) -> None:
    if stomp_reachable(port):
        return
    if port != STOMP_PORT:
        raise RuntimeError(f"no STOMP listener on port {port} (--stomp-port)")
    progress("enabling rabbitmq_stomp")
    subprocess.run(["rabbitmq-plugins", "enable", "rabbitmq_stomp"], check=True, timeout=120)
    for _ in range(100):
        if stomp_reachable():
            return
        time.sleep(0.1)
    raise RuntimeError("the STOMP plugin did not start listening on 61613")
