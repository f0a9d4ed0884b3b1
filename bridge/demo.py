"""``rabbitmq-bridge demo``: the three bundled workers in this process, each flow driven end to end
against the configured broker, then a summary table; nothing is left behind.

Every exchange and queue the demo touches has a name under one ``demo...`` prefix (the
workers' own topology through their settings classes, the delay flow's business exchanges),
and :func:`demo_names` lists them all: the demo refuses to start if any of them exists
already, and deletes exactly those afterwards, also after a failure, Ctrl-C or SIGTERM.
Worker state lives in a temporary directory that is removed at the end; the HTTP endpoint
is off and the gateway listens on a free port of 127.0.0.1.

Unlike the rest of :mod:`bridge`, this module knows the bundled workers by name: it is a tour
of them, not part of the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.exceptions
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from bridge.errors import BridgeError
from bridge.host import Host
from bridge.settings import HostSettings, redact_url
from workers.delay.client import DelayClient
from workers.delay.config import DelaySettings
from workers.delay.worker import DelayWorker
from workers.directed.client import DirectedClient, decode_messages
from workers.directed.config import DirectedSettings
from workers.directed.worker import DirectedWorker
from workers.gateway.backend import BackendServer
from workers.gateway.client import GatewayClient
from workers.gateway.config import GatewaySettings
from workers.gateway.worker import GatewayWorker

PREFIX_RE = re.compile(r"^demo[A-Za-z0-9_-]{0,40}$")

TARGETS = [f"cdn-{i}" for i in range(1, 6)]  # directed: the targets of the one message
RESEND_TARGET = TARGETS[-1]  # the target that pulls with a wrong record id
HOT_MESSAGES = 300  # delay: messages due at one instant on the hot topic ...
COLD_MESSAGES = 5  # ... and on the cold one
DUE_IN_MS = 3000  # time to publish and store them before the instant
SERVER_IDS = ("s1", "s2")  # gateway: the echo backends
FLOW_TIMEOUT_S = 25.0
READY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class DemoNames:
    """Every name the demo declares (or makes a worker declare), from the settings objects
    the workers run with."""

    prefix: str
    directed: DirectedSettings
    delay: DelaySettings
    gateway: GatewaySettings
    hot_exchange: str
    cold_exchange: str

    @property
    def hot_queue(self) -> str:
        return self.hot_exchange + ".q"

    @property
    def cold_queue(self) -> str:
        return self.cold_exchange + ".q"

    def exchanges(self) -> list[str]:
        d, y, g = self.directed, self.delay, self.gateway
        return [
            d.requests_exchange,
            d.pull_exchange,
            d.control_exchange,
            d.dead_exchange,
            y.in_exchange,
            y.control_exchange,
            y.dead_exchange,
            g.servers_exchange,
            self.hot_exchange,
            self.cold_exchange,
        ]

    def queues(self) -> list[str]:
        d, y, g = self.directed, self.delay, self.gateway
        return [
            d.requests_queue,
            d.pull_queue,
            d.control_queue,
            d.dead_queue,
            y.in_queue,
            y.control_queue,
            y.dead_queue,
            g.undeliverable_queue,
            g.reply_queue,
            g.registry_queue,
            *(g.server_queue(s) for s in SERVER_IDS),
            self.hot_queue,
            self.cold_queue,
        ]

    def all(self) -> list[tuple[str, str]]:
        return [("exchange", e) for e in self.exchanges()] + [("queue", q) for q in self.queues()]


def new_prefix() -> str:
    return "demo-" + uuid.uuid4().hex[:8]


def demo_names(prefix: str) -> DemoNames:
    """The settings the demo runs the workers with. Fields the flows depend on are set
    explicitly, so that BRIDGE_<WORKER>__* variables meant for a real deployment (gateway
    tokens, a TLS-only listener, ...) cannot break the demo."""
    if not PREFIX_RE.match(prefix):
        raise BridgeError(
            f"demo prefix {prefix!r} must start with 'demo' and use only letters, digits, - and _"
        )
    p = prefix
    directed = DirectedSettings(
        requests_exchange=f"{p}.directed.requests",
        requests_queue=f"{p}.directed.requests",
        pull_exchange=f"{p}.directed.pull",
        pull_queue=f"{p}.directed.pull",
        control_exchange=f"{p}.directed.control",
        control_queue=f"{p}.directed.control",
        dead_exchange=f"{p}.directed.dead",
        dead_queue=f"{p}.directed.dead",
        queue_limit=50,
        overflow="drop-head",
        max_batch=100,
        housekeeping_interval_s=0.2,
    )
    delay = DelaySettings(
        in_exchange=f"{p}.delay.in",
        in_queue=f"{p}.delay.in",
        dead_exchange=f"{p}.delay.dead",
        dead_queue=f"{p}.delay.dead",
        control_exchange=f"{p}.delay.control",
        control_queue=f"{p}.delay.control",
        default_target=None,
        lanes=4,
        batch=500,
        load_interval_s=0.05,
    )
    gateway = GatewaySettings(
        host="127.0.0.1",
        port=0,
        plain_listener=True,
        tls_cert=None,
        tls_key=None,
        tokens=[],
        servers_exchange=f"{p}.gateway.servers",
        server_queue_prefix=f"{p}.gateway.server.",
        undeliverable_queue=f"{p}.gateway.undeliverable",
        reply_queue_prefix=f"{p}.gateway.reply.",
        registry_queue_prefix=f"{p}.gateway.registry.",
        instance=f"{p}-gw",
        peers=False,  # one replica: no peers exchange or sticky stream to leave behind
        no_server_wait_s=5.0,
        tick_s=0.1,
        state_flush_s=0.5,
    )
    return DemoNames(
        prefix=p,
        directed=directed,
        delay=delay,
        gateway=gateway,
        hot_exchange=f"{p}.orders",
        cold_exchange=f"{p}.alerts",
    )


# -- output ------------------------------------------------------------------------------


@dataclass
class FlowResult:
    flow: str
    what: str = ""
    figures: str = ""
    ok: bool = False
    error: str | None = None


class Progress:
    """Progress lines on stdout, each with the seconds since the demo started."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, flow: str, text: str) -> None:
        print(f"[{time.monotonic() - self.started:5.1f}s] {flow:<8} {text}", flush=True)


def summary_table(results: list[FlowResult]) -> str:
    rows = [("flow", "what happened", "figures", "result")]
    for r in results:
        figures = r.figures if r.error is None else f"{r.figures} {r.error[:80]}".strip()
        rows.append((r.flow, r.what, figures, "OK" if r.ok else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


# -- the flows ---------------------------------------------------------------------------


@dataclass
class Context:
    names: DemoNames
    gateway: GatewayWorker
    connection: AbstractRobustConnection
    url: str
    say: Progress
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


async def directed_flow(ctx: Context, result: FlowResult) -> None:
    say, n = ctx.say, ctx.names
    client = await DirectedClient(ctx.connection, n.directed).open()
    ctx.cleanups.append(client.close)
    message_id = f"{n.prefix}-purge-1"
    body = b"purge /img/logo.png"
    result.what = f"1 message to {len(TARGETS)} targets, pulled by each, 1 resend"
    say(
        "directed",
        f"publish {body.decode()!r} once to {len(TARGETS)} targets: {', '.join(TARGETS)}",
    )
    await client.send(body, TARGETS, message_id=message_id)
    status = await _wait_status(client, message_id)
    say("directed", f"status: {_status_text(status)} (content stored once)")

    records: dict[str, str] = {}
    for target in TARGETS:
        reply = await client.pull(target, None, max=10)
        got = decode_messages(reply)
        if got != [(message_id, body)] or not reply.get("record_id"):
            raise AssertionError(f"{target} pulled {reply}")
        records[target] = reply["record_id"]
        say("directed", f"{target} pulled {len(got)} message, record id {reply['record_id']}")

    for target in TARGETS[:-1]:
        reply = await client.pull(target, records[target], max=0)
        if "error" in reply:
            raise AssertionError(f"{target} ack: {reply}")
    say("directed", f"{', '.join(TARGETS[:-1])} acknowledged (pull max 0 with their record id)")
    say("directed", f"status: {_status_text((await client.status(message_id))['status'])}")

    reply = await client.pull(RESEND_TARGET, "not-the-record-id", max=10)
    resent = decode_messages(reply)
    same = reply.get("record_id") == records[RESEND_TARGET] and resent == [(message_id, body)]
    say(
        "directed",
        f"{RESEND_TARGET} pulls with a wrong record id: the same batch again, "
        f"redelivered: {str(reply.get('redelivered')).lower()}, "
        f"{'same' if same else 'DIFFERENT'} record id",
    )
    if not (reply.get("redelivered") is True and same):
        raise AssertionError(f"expected the batch resent: {reply}")
    reply = await client.pull(RESEND_TARGET, records[RESEND_TARGET], max=0)
    if "error" in reply:
        raise AssertionError(f"{RESEND_TARGET} ack: {reply}")
    say("directed", f"{RESEND_TARGET} acknowledged")
    final = (await client.status(message_id))["status"]
    say("directed", f"status: {_status_text(final)}")
    result.figures = (
        f"acked {final['acked']}/{final['total']}, pending {final['pending']}, 1 redelivery"
    )
    if not (final["acked"] == len(TARGETS) and final["pending"] == 0 and final["state"] == "done"):
        raise AssertionError(f"final status {final}")
    result.ok = True


async def _wait_status(client: DirectedClient, message_id: str) -> dict[str, Any]:
    for _ in range(200):
        reply = await client.status(message_id)
        if "status" in reply:
            return dict(reply["status"])
        await asyncio.sleep(0.05)
    raise AssertionError(f"the worker did not apply {message_id}")


def _status_text(s: dict[str, Any]) -> str:
    return f"total {s['total']}, acked {s['acked']}, pending {s['pending']}, state {s['state']}"


async def delay_flow(ctx: Context, result: FlowResult) -> None:
    say, n = ctx.say, ctx.names
    arrived: dict[str, dict[str, float]] = {n.hot_exchange: {}, n.cold_exchange: {}}
    total = HOT_MESSAGES + COLD_MESSAGES
    all_in = asyncio.Event()
    channel = await ctx.connection.channel()
    ctx.cleanups.append(channel.close)
    for exchange_name in (n.hot_exchange, n.cold_exchange):
        # auto-delete exchange + exclusive queue: gone with the demo's connection even if the
        # explicit deletion at the end never runs
        exchange = await channel.declare_exchange(
            exchange_name, aio_pika.ExchangeType.TOPIC, auto_delete=True
        )
        queue = await channel.declare_queue(exchange_name + ".q", exclusive=True)
        await queue.bind(exchange, "#")
        await queue.consume(_recorder(arrived, exchange_name, total, all_in), no_ack=True)

    client = await DelayClient(ctx.connection, n.delay).open()
    ctx.cleanups.append(client.close)
    due = _now_ms() + DUE_IN_MS
    sends = [(f"order-{i}", n.hot_exchange) for i in range(HOT_MESSAGES)]
    sends += [(f"alert-{i}", n.cold_exchange) for i in range(COLD_MESSAGES)]
    result.what = f"{total} messages due at one instant, hot and cold topic"
    say(
        "delay",
        f"publish {HOT_MESSAGES} messages to hot topic {n.hot_exchange} and {COLD_MESSAGES} "
        f"to cold topic {n.cold_exchange}, all due at {_clock(due)} (x-deliver-at)",
    )
    for start in range(0, total, 100):
        await asyncio.gather(
            *(
                client.send(b"due", exchange, deliver_at_ms=due, message_id=mid, routing_key="demo")
                for mid, exchange in sends[start : start + 100]
            )
        )
    while True:
        stored = int((await client.counts()).get("total", 0))
        if stored == total or _now_ms() >= due - 100:
            break
        await asyncio.sleep(0.05)
    early = sum(len(a) for a in arrived.values())
    say(
        "delay",
        f"stored by the worker before the instant: {stored}/{total}; delivered so far: {early}",
    )

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_in.wait(), max(due - _now_ms(), 0) / 1000 + 15)
    figures, problems = [], []
    for label, exchange_name, expected in (
        ("hot", n.hot_exchange, HOT_MESSAGES),
        ("cold", n.cold_exchange, COLD_MESSAGES),
    ):
        late = [at - due for at in arrived[exchange_name].values()]
        p50, worst = (percentile(late, 50), max(late)) if late else (0.0, 0.0)
        say(
            "delay",
            f"{label}: {len(late)}/{expected} arrived, lateness p50 {p50:.0f} ms, "
            f"max {worst:.0f} ms",
        )
        figures.append(f"{label} p50 {p50:.0f}/max {worst:.0f} ms")
        if len(late) != expected:
            problems.append(f"{label}: {expected - len(late)} missing")
        if late and min(late) < 0:
            problems.append(f"{label}: delivered {-min(late):.0f} ms EARLY")
    result.figures = ", ".join(figures)
    if problems:
        raise AssertionError("; ".join(problems))
    say("delay", "every message arrived, none before its time (lateness measured at the consumer)")
    result.ok = True


def _recorder(
    arrived: dict[str, dict[str, float]], exchange: str, total: int, all_in: asyncio.Event
) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
    """A consumer that notes when each message arrived (wall clock, like the due times)."""

    async def on_message(message: AbstractIncomingMessage) -> None:
        arrived[exchange][message.message_id or ""] = time.time() * 1000
        if sum(len(a) for a in arrived.values()) >= total:
            all_in.set()

    return on_message


def _now_ms() -> int:
    return int(time.time() * 1000)


def _clock(ms: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}"


async def gateway_flow(ctx: Context, result: FlowResult) -> None:
    say, n, worker = ctx.say, ctx.names, ctx.gateway
    result.what = "2 TCP clients through the gateway, 2 echo servers"
    for server_id in SERVER_IDS:
        server = BackendServer(ctx.url, server_id, settings=n.gateway, heartbeat_s=2.0)
        await server.start()
        ctx.cleanups.append(server.stop)
    deadline = time.monotonic() + 10
    while not all(worker.balancer.is_alive(s) for s in SERVER_IDS):
        if time.monotonic() > deadline:
            raise AssertionError(f"echo servers not registered: {worker.balancer.alive()}")
        await asyncio.sleep(0.02)
    say(
        "gateway",
        f"echo backends {' and '.join(SERVER_IDS)} registered on {n.gateway.servers_exchange}; "
        f"gateway listening on 127.0.0.1:{worker.port}",
    )
    echoed: dict[str, str] = {}
    rtts: list[float] = []
    for i in (1, 2):
        client = await GatewayClient.connect("127.0.0.1", worker.port, client_id=f"client-{i}")
        ctx.cleanups.append(_closer(client))
        say("gateway", f"client-{i} connected: WELCOME, assigned to server {client.server}")
        payload = f"hello from client-{i}".encode()
        started = time.perf_counter()
        reply = await client.request(payload)
        rtts.append((time.perf_counter() - started) * 1000)
        say(
            "gateway",
            f"client-{i} sent {payload.decode()!r}, got back {reply.decode()!r} "
            f"({rtts[-1]:.1f} ms via {n.gateway.server_queue(client.server)})",
        )
        if reply != payload:
            raise AssertionError(f"client-{i} got {reply!r}")
        echoed[f"client-{i}"] = client.server
        await client.bye()
    servers = sorted(set(echoed.values()))
    result.figures = (
        ", ".join(f"{c}->{s}" for c, s in echoed.items()) + f", round trip max {max(rtts):.0f} ms"
    )
    if servers != sorted(SERVER_IDS):
        raise AssertionError(f"both clients went to {servers}")
    say("gateway", "each client was given a different server (fewest associated clients)")
    result.ok = True


def _closer(client: GatewayClient) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        client.close()

    return close


FLOWS: tuple[tuple[str, Callable[[Context, FlowResult], Awaitable[None]]], ...] = (
    ("directed", directed_flow),
    ("delay", delay_flow),
    ("gateway", gateway_flow),
)


# -- broker housekeeping -----------------------------------------------------------------


async def _each_name(
    url: str,
    names: list[tuple[str, str]],
    op: Callable[[AbstractChannel, str, str], Awaitable[None]],
) -> list[str]:
    """Run ``op(channel, kind, name)`` for each name on a channel of its own (a failed
    declare or delete closes its channel); return the failures other than "not found"."""
    problems: list[str] = []
    conn = await aio_pika.connect(url, timeout=10)
    try:
        for kind, name in names:
            channel = await conn.channel()
            try:
                await op(channel, kind, name)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                pass
            except Exception as exc:
                problems.append(f"{kind} {name} ({type(exc).__name__})")
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()
    finally:
        await conn.close()
    return problems


async def _probe(channel: AbstractChannel, kind: str, name: str) -> None:
    if kind == "exchange":
        await channel.declare_exchange(name, passive=True)
    else:
        await channel.declare_queue(name, passive=True)
    raise FileExistsError  # found (a queue exclusive to another connection raises 405)


async def _delete(channel: AbstractChannel, kind: str, name: str) -> None:
    if kind == "exchange":
        await channel.exchange_delete(name)
    else:
        await channel.queue_delete(name)


async def existing_names(url: str, names: DemoNames) -> list[str]:
    """The demo's names that exist in the broker."""
    return await _each_name(url, names.all(), _probe)


async def delete_names(url: str, names: DemoNames) -> list[str]:
    """Delete every demo queue, then every exchange; return what could not be deleted."""
    return await _each_name(url, sorted(names.all(), key=lambda kn: kn[0] != "queue"), _delete)


# -- the run -----------------------------------------------------------------------------


async def _wait_ready(host: Host, task: asyncio.Task[None]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not host.readiness()[0]:
        if task.done():
            task.result()
            raise BridgeError("the workers stopped while starting")
        if time.monotonic() > deadline:
            raise BridgeError(
                f"workers not ready after {READY_TIMEOUT_S:.0f} s: {host.readiness()[1]}"
            )
        await asyncio.sleep(0.05)


async def run(settings: HostSettings, prefix: str, say: Progress) -> tuple[list[FlowResult], bool]:
    """Run every flow; return the results and whether the broker was left clean."""
    names = demo_names(prefix)
    url = settings.amqp_url
    in_use = await existing_names(url, names)
    if in_use:
        raise BridgeError(
            f"{len(in_use)} demo names already exist ({in_use[0]}, ...); "
            "run again with another --prefix (nothing was changed)"
        )
    results = [FlowResult(flow) for flow, _ in FLOWS]
    directed, delay, gateway = (
        DirectedWorker(names.directed),
        DelayWorker(names.delay),
        GatewayWorker(names.gateway),
    )
    host = Host(settings, [directed, delay, gateway], install_signals=False)
    host_task: asyncio.Task[None] | None = None
    connection: AbstractRobustConnection | None = None
    cleanups: list[Callable[[], Awaitable[None]]] = []
    try:
        say("demo", "starting the directed, delay and gateway workers in this process")
        started = time.monotonic()
        host_task = asyncio.get_running_loop().create_task(host.run(), name="demo-host")
        await _wait_ready(host, host_task)
        say("demo", f"workers ready in {time.monotonic() - started:.1f} s")
        connection = await aio_pika.connect_robust(url, timeout=10)
        ctx = Context(names, gateway, connection, url, say, cleanups)
        for (flow, fn), result in zip(FLOWS, results, strict=True):
            print(flush=True)
            try:
                await asyncio.wait_for(fn(ctx, result), FLOW_TIMEOUT_S)
            except TimeoutError:
                result.error = f"timed out after {FLOW_TIMEOUT_S:.0f} s"
                say(flow, f"FAILED: {result.error}")
            except Exception as exc:  # a failed flow is reported; the others still run
                result.error = f"{type(exc).__name__}: {exc}"[:200]
                say(flow, f"FAILED: {result.error}")
    finally:
        print(flush=True)
        say("demo", "stopping the workers and deleting every demo exchange and queue")
        for cleanup in reversed(cleanups):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(cleanup(), 10)
        if host_task is not None:
            host.request_stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(host_task, settings.drain_seconds * 3 + 5)
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()
        clean = await _cleanup_broker(url, names, say)
    return results, clean


async def _cleanup_broker(url: str, names: DemoNames, say: Progress) -> bool:
    try:
        problems = await delete_names(url, names)
        problems += await existing_names(url, names)
    except Exception as exc:
        problems = [f"{type(exc).__name__}: {exc}"]
    if problems:
        say("demo", f"cleanup incomplete: {'; '.join(problems)}")
        say("demo", f"delete the exchanges and queues named {names.prefix}.* by hand")
        return False
    total = len(names.exchanges()) + len(names.queues())
    say("demo", f"cleanup: the {total} demo exchanges and queues are gone from the broker")
    return True


def run_demo(base: HostSettings, prefix: str | None = None, *, verbose: bool = False) -> int:
    """The ``rabbitmq-bridge demo`` command: 0 only if every flow succeeded and the broker is clean."""
    from bridge.amqp import connect_once
    from bridge.logs import setup_logging

    setup_logging(base.log_level if verbose else "WARNING", "text")
    prefix = prefix or new_prefix()
    demo_names(prefix)  # check the prefix before anything is created
    say = Progress()
    state = Path(tempfile.mkdtemp(prefix="bridge-demo-"))
    try:
        settings = base.model_copy(
            update={"state_dir": state, "http_port": 0, "drain_seconds": 5.0}
        )
        print(
            f"rabbitmq-bridge demo against {redact_url(settings.amqp_url)}: names {prefix}.*, "
            f"state in {state}",
            flush=True,
        )

        async def main() -> tuple[list[FlowResult], bool]:
            task = asyncio.current_task()
            assert task is not None
            with contextlib.suppress(NotImplementedError, RuntimeError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
            conn = await connect_once(settings.amqp_url, timeout=5)  # fail fast, clearly
            await conn.close()
            return await run(settings, prefix, say)

        results, clean = asyncio.run(main())
    except KeyboardInterrupt:
        print("rabbitmq-bridge demo: interrupted; cleaned up", file=sys.stderr)
        return 130
    except asyncio.CancelledError:  # SIGTERM
        print("rabbitmq-bridge demo: terminated; cleaned up", file=sys.stderr)
        return 143
    finally:
        shutil.rmtree(state, ignore_errors=True)
    print(flush=True)
    print(summary_table(results), flush=True)
    ok = all(r.ok for r in results) and clean
    print(
        f"\n{'all flows OK' if ok else 'FAILED'} in {time.monotonic() - say.started:.1f} s; "
        f"state dir {state} removed",
        flush=True,
    )
    return 0 if ok else 1
