"""Benchmark of the ``gateway`` worker against what a RabbitMQ user would do instead.

    python -m bench.gateway             # full run (a few minutes)
    python -m bench.gateway --quick     # smoke run, well under a minute
    python -m bench.gateway --quick --against ../gw-base   # and an earlier commit's gateway

Prints one JSON object on stdout (progress on stderr). Measured in one run, on one machine:

1. ``gateway``: N clients on raw TCP, each sends a 256-byte DATA and waits for the echo,
   again and again; the path is client -> gateway (``python -m bridge.cli run gateway``,
   uvloop) -> quorum queue ``gateway.server.<id>`` -> echo backend
   (:class:`workers.gateway.backend.BackendServer`, its own process) -> the gateway's reply
   queue -> gateway -> client;
2. ``stomp``: the same clients and payloads through RabbitMQ's STOMP plugin: SEND to the
   same quorum queue with ``reply-to:/temp-queue/r``, the same echo backend answers, the
   reply arrives on the client's temporary queue -- what a RabbitMQ user would pick;
3. ``direct_tcp``: the same clients against an echo server speaking the gateway framing
   with no broker at all (the limit of the machine, the clients and the framing);
4. ``idle``: RSS of a fresh gateway process before and after 10,000 connected idle clients
   (HELLO, WELCOME, connect event published), in bytes per connection.

Messages/s and round-trip p50/p99 are measured after a warm-up, by the load generator
(this process, uvloop). Every process shares the machine's cores, so CPU use per process is
reported next to each figure. ``--profile`` records the gateway with py-spy during (1).

``--against TREE`` also runs the gateway of another checkout (a ``git worktree`` of the
commit before a change), with its own echo backend, interleaved with (1) and (2), and
reports this tree's figures against it (``against``; ratios: this tree / that one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

if __package__ in (None, ""):  # `python bench/gateway.py` works too
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    CpuWatch,
    Profiler,
    WorkerProcess,
    broker_info,
    broker_url,
    emit,
    free_port,
    median,
    percentile,
    progress,
    rnd,
    rss_bytes,
    unique,
)
from workers.gateway.protocol import (
    PONG_FRAME,
    FrameDecoder,
    FrameType,
    encode_data,
    encode_hello,
    encode_welcome,
)

PAYLOAD = b"p" * 256
STOMP_PORT = 61613


# -- load generator ---------------------------------------------------------------------


class Recorder:
    """Round trips of all clients; only those inside the measuring window count."""

    def __init__(self) -> None:
        self.measuring = False
        self.running = True
        self.rtts: list[float] = []
        self.errors = 0

    def done(self, rtt: float) -> bool:
        """Record one round trip; True if the client should send again."""
        if self.measuring:
            self.rtts.append(rtt)
        return self.running


class FramedClient(asyncio.Protocol):
    """An echo client of the gateway framing (used for the gateway and the direct server)."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.decoder = FrameDecoder(1 << 20, 0, role="client")
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sent_at = 0.0
        self.frame = encode_data(PAYLOAD)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is only alike
        self.transport = transport
        transport.write(encode_hello())

    def start(self) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(self.frame)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        for frame in self.decoder.feed(data):
            if frame.type is FrameType.DATA:
                now = time.perf_counter()
                if self.recorder.done(now - self.sent_at):
                    self.sent_at = now
                    self.transport.write(self.frame)
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
    """A minimal STOMP 1.2 echo client: SEND to the server queue, reply on a temp queue."""

    def __init__(self, recorder: Recorder, queue: str) -> None:
        self.recorder = recorder
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buf = bytearray()
        self.sent_at = 0.0
        self.frame = (
            (
                f"SEND\ndestination:/amq/queue/{queue}\nreply-to:/temp-queue/r\n"
                f"content-length:{len(PAYLOAD)}\n\n"
            ).encode()
            + PAYLOAD
            + b"\x00"
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is only alike
        self.transport = transport
        transport.write(
            b"CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\n"
            b"heart-beat:0,0\n\n\x00"
        )

    def start(self) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(self.frame)

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
            del self.buf[: end + 1]
            command = lines[0]
            if command == "MESSAGE":
                now = time.perf_counter()
                if self.recorder.done(now - self.sent_at):
                    self.sent_at = now
                    self.transport.write(self.frame)
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
    for client in clients:
        if client.transport is not None:
            client.transport.close()
    rtts = recorder.rtts
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
        "errors": recorder.errors,
        "cpu_us_per_round_trip": {**per_rt, "total": sum(per_rt.values())},
        "cpu": cpu,
    }
    progress(name, result)
    return result


# -- processes --------------------------------------------------------------------------


def gateway_env(prefix: str, port: int) -> dict[str, str]:
    return {
        "BRIDGE_GATEWAY__HOST": "127.0.0.1",
        "BRIDGE_GATEWAY__PORT": str(port),
        "BRIDGE_GATEWAY__SERVERS_EXCHANGE": f"{prefix}.servers",
        "BRIDGE_GATEWAY__SERVER_QUEUE_PREFIX": f"{prefix}.server.",
        "BRIDGE_GATEWAY__UNDELIVERABLE_QUEUE": f"{prefix}.undeliverable",
        "BRIDGE_GATEWAY__REPLY_QUEUE_PREFIX": f"{prefix}.reply.",
        "BRIDGE_GATEWAY__REGISTRY_QUEUE_PREFIX": f"{prefix}.registry.",
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
                cwd=str(Path(__file__).resolve().parents[1]),
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
    from workers.gateway.backend import BackendServer
    from workers.gateway.config import GatewaySettings

    server = BackendServer(
        broker_url(), server_id, settings=GatewaySettings(), heartbeat_s=2.0, prefetch=512
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


async def idle_memory(
    args: argparse.Namespace,
    root: Path,
    prefix: str,
    broker_pid: int,
    tree: Path | None = None,
) -> dict[str, Any]:
    """RSS of a fresh gateway before and after ``args.idle`` idle connections."""
    import json

    port = free_port()
    gateway = WorkerProcess(
        ["gateway"],
        state_dir=root / f"idle-{prefix}",
        env=gateway_env(prefix + "-idle", port),
        tree=tree,
    )
    gateway.start()
    backend = Child(
        ["echo-backend", "idle"], gateway_env(prefix + "-idle", port), root / "idle-backend.log"
    )
    try:
        await wait_alive(gateway, "idle")
        await asyncio.sleep(1.0)
        before = rss_bytes(gateway.pid)
        loop = asyncio.get_running_loop()
        recorder = Recorder()
        transports = []
        started = time.perf_counter()
        batch = 500
        for first in range(0, args.idle, batch):
            pending = []
            for _ in range(min(batch, args.idle - first)):
                transport, client = await loop.create_connection(
                    lambda: FramedClient(recorder), "127.0.0.1", port
                )
                transports.append(transport)
                pending.append(client.ready)
            await asyncio.wait_for(asyncio.gather(*pending), 60)
        connect_s = time.perf_counter() - started
        # every connect event confirmed, then let allocator and GC settle
        for _ in range(300):
            summary = json.loads(gateway.http("/admin/gateway/summary")[1])
            if summary["publish_in_flight"] == 0:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.0)
        after = rss_bytes(gateway.pid)
        connections = summary["connections"]
        for transport in transports:
            transport.close()
        await asyncio.sleep(1.0)
        result = {
            "connections": connections,
            "rss_before_mib": rnd(before / 2**20, 1),
            "rss_after_mib": rnd(after / 2**20, 1),
            "bytes_per_connection": round((after - before) / max(connections, 1)),
            "connects_per_s": rnd(args.idle / connect_s, 1),
        }
        progress(f"idle {prefix}", result)
        return result
    finally:
        backend.stop()
        gateway.stop()


async def cleanup(prefixes: list[str], server_ids: list[str]) -> None:
    import aio_pika

    conn = await aio_pika.connect(broker_url())
    try:
        for prefix in prefixes:
            for queue in [f"{prefix}.undeliverable", *(f"{prefix}.server.{s}" for s in server_ids)]:
                ch = await conn.channel()
                with contextlib.suppress(Exception):
                    await ch.queue_delete(queue)
                with contextlib.suppress(Exception):
                    await ch.close()
            # the replicas' sticky stream and peers exchange follow the servers exchange
            ch = await conn.channel()
            with contextlib.suppress(Exception):
                await ch.queue_delete(f"{prefix}.servers.sticky")
            with contextlib.suppress(Exception):
                await ch.close()
            for exchange in (f"{prefix}.servers", f"{prefix}.servers.peers"):
                ch = await conn.channel()
                with contextlib.suppress(Exception):
                    await ch.exchange_delete(exchange)
                with contextlib.suppress(Exception):
                    await ch.close()
    finally:
        await conn.close()


def stomp_reachable() -> bool:
    import socket

    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", STOMP_PORT), 2):
        return True
    return False


def enable_stomp() -> None:
    if stomp_reachable():
        return
    progress("enabling rabbitmq_stomp")
    subprocess.run(["rabbitmq-plugins", "enable", "rabbitmq_stomp"], check=True, timeout=120)
    for _ in range(100):
        if stomp_reachable():
            return
        time.sleep(0.1)
    raise RuntimeError("the STOMP plugin did not start listening on 61613")


async def main(args: argparse.Namespace) -> dict[str, Any]:
    _raise_fd_limit(args.idle + args.clients + 1000)
    root = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    prefix = unique("gwbench")
    info = broker_info()
    out: dict[str, Any] = {
        "bench": "gateway",
        "command": " ".join(["python -m bench.gateway", *args.argv]),
        "clients": args.clients,
        "payload_bytes": len(PAYLOAD),
        "seconds": args.seconds,
        "repeats": args.repeats,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "rabbitmq": info["version"],
        },
    }
    port = free_port()
    env = gateway_env(prefix, port)
    gateway = WorkerProcess(["gateway"], state_dir=root / "gw", env=env)
    backend: Child | None = None
    direct: Child | None = None
    base: WorkerProcess | None = None
    base_backend: Child | None = None
    base_port = free_port()
    base_env = gateway_env(prefix + "-base", base_port)
    try:
        gateway.start()
        backend = Child(["echo-backend", "s1"], env, root / "backend.log")
        await wait_alive(gateway, "s1")
        if args.against:
            base = WorkerProcess(
                ["gateway"], state_dir=root / "gw-base", env=base_env, tree=args.against
            )
            base.start()
            base_backend = Child(["echo-backend", "s1"], base_env, root / "backend-base.log")
            await wait_alive(base, "s1")
        if args.stomp:
            enable_stomp()
        queue = f"{prefix}.server.s1"
        runs: dict[str, list[dict[str, Any]]] = {"gateway": [], "against": [], "stomp": []}
        # Interleaved, so that a change in what else runs on the machine hits every path.
        # The gateways stay up (idle) during the other runs: one tick a second.
        for repeat in range(args.repeats):
            pids = {"gateway": gateway.pid, "backend": backend.pid, "broker": info["pid"]}
            profiler = None
            if args.profile and repeat == 0:
                profiler = Profiler(gateway.pid, root / "gateway.collapsed")
            backend_profiler = None
            if args.profile_backend and repeat == 0:
                backend_profiler = Profiler(backend.pid, root / "backend-gateway.collapsed")
            run = await echo_load("gateway", port, lambda r: FramedClient(r), args, pids)
            if profiler is not None:
                out["gateway_profile"] = profiler.stop()
            if backend_profiler is not None:
                out["backend_profile"] = {"gateway": backend_profiler.stop(30)}
            runs["gateway"].append(run)
            if base is not None and base_backend is not None:
                base_pids = {
                    "gateway": base.pid,
                    "backend": base_backend.pid,
                    "broker": info["pid"],
                }
                profiler = None
                if args.profile and repeat == 0:
                    profiler = Profiler(base.pid, root / "gateway-against.collapsed")
                runs["against"].append(
                    await echo_load(
                        "gateway (against)", base_port, lambda r: FramedClient(r), args, base_pids
                    )
                )
                if profiler is not None:
                    out["against_profile"] = profiler.stop()
            if args.stomp:
                if args.profile_backend and repeat == 0:
                    backend_profiler = Profiler(backend.pid, root / "backend-stomp.collapsed")
                runs["stomp"].append(
                    await echo_load(
                        "stomp",
                        STOMP_PORT,
                        lambda r: StompClient(r, queue),
                        args,
                        {"backend": backend.pid, "broker": info["pid"]},
                    )
                )
                if backend_profiler is not None and repeat == 0:
                    out["backend_profile"]["stomp"] = backend_profiler.stop(30)
        for name, results in runs.items():
            if results:
                out[name] = summarise(results)
        if runs["against"]:
            out["against"] = {"tree": str(args.against), **out["against"]}
        for child in (backend, base_backend):
            if child is not None:
                child.stop()
        backend = base_backend = None
        gateway.stop()
        if base is not None:
            base.stop()

        direct_port = free_port()
        direct = Child(["tcp-echo", str(direct_port)], {}, root / "direct.log")
        out["direct_tcp"] = await echo_load(
            "direct_tcp", direct_port, lambda r: FramedClient(r), args, {"echo": direct.pid}
        )
        direct.stop()
        direct = None

        if args.idle:
            out["idle"] = await idle_memory(args, root, prefix, info["pid"])
            if args.against:
                out["idle_against"] = await idle_memory(
                    args, root, prefix + "-base", info["pid"], args.against
                )
        out["publish_encoding"] = publish_encoding()
    finally:
        for child in (backend, base_backend, direct):
            if child is not None:
                child.stop()
        gateway.stop()
        if base is not None:
            base.stop()
        await cleanup(
            [prefix, prefix + "-idle", prefix + "-base", prefix + "-base-idle"], ["s1", "idle"]
        )
    out["goals"] = goals(out)
    return out


def publish_encoding(count: int = 20_000) -> dict[str, Any]:
    """CPU of encoding one DATA publish, in this process, same inputs: pamqp (what aiormq
    does per message, the baseline) against bridge.amqp as the gateway uses it: the
    session's properties encoded once (``frames.Properties.encode``, kept in the session),
    the ``basic.publish`` frame cached per routing key (as the Publisher does), and
    ``frames.content_frames`` per message."""
    from aiormq.abc import ChannelFrame
    from pamqp.body import ContentBody
    from pamqp.commands import Basic
    from pamqp.header import ContentHeader

    from bridge.amqp import frames

    fields: dict[str, Any] = {
        "headers": {
            "x-event": "data",
            "x-session": "0123456789abcdef0123456789abcdef",
            "x-client-id": "",
            "x-client-addr": "127.0.0.1:40000",
            "x-gateway": "host-1234",
        },
        "reply_to": "gateway.reply.host-1234",
        "delivery_mode": 2,
    }
    rk = "gateway.server.s1"
    started = time.perf_counter()
    for _ in range(count):
        properties = Basic.Properties(**fields)
        pamqp_frames: list[Any] = [
            Basic.Publish(exchange="", routing_key=rk, mandatory=True),
            ContentHeader(properties=properties, body_size=len(PAYLOAD)),
            ContentBody(PAYLOAD),
        ]
        ChannelFrame.marshall(channel_number=1, frames=pamqp_frames)
    pamqp_s = time.perf_counter() - started
    prepared = frames.Properties(**fields).encode()
    methods: dict[tuple[str, str, bool], bytes] = {}
    started = time.perf_counter()
    for _ in range(count):
        key = ("", rk, True)
        method = methods.get(key)
        if method is None:
            method = methods[key] = frames.publish_frame(1, "", rk, True)
        b"".join((method, frames.content_frames(1, prepared, PAYLOAD, 131072)))
    prepared_s = time.perf_counter() - started
    result = {
        "publishes": count,
        "pamqp_us_per_publish": rnd(pamqp_s / count * 1e6, 1),
        "prepared_us_per_publish": rnd(prepared_s / count * 1e6, 1),
        "prepared_vs_pamqp": rnd(prepared_s / pamqp_s, 3),
    }
    progress("publish_encoding", result)
    return result


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each figure over the repeats, and every run."""
    keys = ("messages_per_s", "p50_ms", "p99_ms")
    summary: dict[str, Any] = {k: rnd(median(r[k] for r in results), 3) for k in keys}
    summary["errors"] = sum(r["errors"] for r in results)
    summary["cpu_us_per_round_trip"] = {
        k: round(median(r["cpu_us_per_round_trip"][k] for r in results))
        for k in results[0]["cpu_us_per_round_trip"]
    }
    summary["runs"] = results
    return summary


def goals(out: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    gw, stomp = out.get("gateway"), out.get("stomp")
    if gw and stomp:
        result["throughput_vs_stomp"] = rnd(gw["messages_per_s"] / stomp["messages_per_s"], 2)
        result["p99_vs_stomp"] = rnd(gw["p99_ms"] / stomp["p99_ms"], 2)
        result["throughput_at_least_stomp"] = gw["messages_per_s"] >= stomp["messages_per_s"]
        result["p99_at_most_stomp"] = gw["p99_ms"] <= stomp["p99_ms"]
        # the machine-wide work per round trip (our processes plus the broker)
        result["cpu_per_round_trip_vs_stomp"] = rnd(
            gw["cpu_us_per_round_trip"]["total"] / stomp["cpu_us_per_round_trip"]["total"], 2
        )
    base = out.get("against")
    if gw and base:
        # this tree's gateway / the other checkout's, medians of the interleaved runs
        result["vs_against"] = {
            "gateway_cpu_us_per_round_trip": rnd(
                gw["cpu_us_per_round_trip"]["gateway"] / base["cpu_us_per_round_trip"]["gateway"],
                2,
            ),
            "messages_per_s": rnd(gw["messages_per_s"] / base["messages_per_s"], 2),
            "p99_ms": rnd(gw["p99_ms"] / base["p99_ms"], 2),
            "total_cpu_us_per_round_trip": rnd(
                gw["cpu_us_per_round_trip"]["total"] / base["cpu_us_per_round_trip"]["total"], 2
            ),
        }
        result["gateway_cpu_at_most_70_us"] = gw["cpu_us_per_round_trip"]["gateway"] <= 70
    idle = out.get("idle")
    if idle:
        result["idle_kib_per_connection"] = rnd(idle["bytes_per_connection"] / 1024, 2)
        result["idle_under_30_kib"] = idle["bytes_per_connection"] < 30 * 1024
    return result


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, wanted), hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        progress(f"warning: open-file limit {target} < {wanted}; the idle figure may fall short")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--clients", type=int, help="concurrent echo clients (default 64)")
    parser.add_argument("--seconds", type=float, help="measuring window per scenario")
    parser.add_argument("--warmup", type=float, help="seconds before measuring")
    parser.add_argument("--idle", type=int, help="idle connections for the memory figure")
    parser.add_argument("--no-stomp", dest="stomp", action="store_false")
    parser.add_argument("--repeats", type=int, help="interleaved gateway/STOMP runs (median)")
    parser.add_argument("--profile", action="store_true", help="py-spy the gateway in (1)")
    parser.add_argument(
        "--profile-backend",
        action="store_true",
        help="py-spy the echo backend in the first gateway and STOMP runs",
    )
    parser.add_argument(
        "--against",
        type=Path,
        default=None,
        metavar="TREE",
        help="also run the gateway of this checkout (e.g. a git worktree of the commit "
        "before a change), interleaved, and report the ratios",
    )
    parser.add_argument(
        "--encoding-only",
        action="store_true",
        help="only the publish-encoding micro benchmark (pamqp vs bridge.amqp frames)",
    )
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    quick = args.quick
    args.clients = args.clients or (16 if quick else 64)
    args.seconds = args.seconds or (3.0 if quick else 15.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if quick else 3.0)
    args.idle = args.idle if args.idle is not None else (1000 if quick else 10_000)
    args.repeats = args.repeats or (1 if quick else 3)
    return args


def run(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _uvloop()
    if args.role:
        role, *rest = args.role
        if role == "echo-backend":
            asyncio.run(role_echo_backend(rest[0]))
        elif role == "tcp-echo":
            asyncio.run(role_tcp_echo(int(rest[0])))
        return
    if args.encoding_only:
        emit(
            {
                "bench": "gateway",
                "command": "python -m bench.gateway --encoding-only",
                "publish_encoding": publish_encoding(),
            }
        )
        return
    emit(asyncio.run(main(args)))


if __name__ == "__main__":
    run()
