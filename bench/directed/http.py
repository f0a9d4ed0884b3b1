"""N simulated nodes long-polling `directed`: over HTTP (keep-alive, no AMQP connection per
node) side by side with the same nodes over AMQP (one connection each), in one run.

    python -m bench.directed.http --nodes 1000

For each transport: the worker's RSS per idle long-poller, the broker's memory per node (Erlang
memory after a full GC), the time from publishing one message to all N nodes until 99 % of
them have it (median over rounds), and pulls/s at saturation (C clients pulling with
``wait_ms`` 0 in a loop: empty pulls, the cost of the pull path itself). One JSON object on
stdout; progress on stderr. Needs a local broker (rabbitmqctl) for the broker figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp

from bench.harness.broker import broker_info, broker_memory, delete_names, rabbitmqctl
from bench.harness.cpu import cpu_seconds, machine_cpu, rss_bytes
from bench.harness.procs import WorkerProcess
from bench.harness.report import broker_url, emit, progress, unique
from bench.harness.stats import median, percentile, rnd
from workers.directed.client import DirectedClient
from workers.directed.config import DirectedSettings

Puller = Callable[[str, str | None, int], Awaitable[dict[str, Any]]]


def settings_for(token: str) -> DirectedSettings:
    names = {
        f"{part}_{kind}": f"{token}.directed.{part}"
        for part in ("requests", "pull", "control", "dead")
        for kind in ("exchange", "queue")
    }
    return DirectedSettings(**names, pull_queue_type="classic")


def env_for(s: DirectedSettings) -> dict[str, str]:
    out = {
        f"BRIDGE_DIRECTED__{part.upper()}_{kind.upper()}": getattr(s, f"{part}_{kind}")
        for part in ("requests", "pull", "control", "dead")
        for kind in ("exchange", "queue")
    }
    out["BRIDGE_DIRECTED__PULL_QUEUE_TYPE"] = "classic"
    out["BRIDGE_DIRECTED__SYNCHRONOUS"] = "NORMAL"
    return out


class Fleet:
    """N nodes, each a loop: pull (long poll), note when each message arrived, acknowledge
    with the next pull."""

    def __init__(self, targets: list[str], pull: Puller, wait_ms: int) -> None:
        self.targets = targets
        self.pull = pull
        self.wait_ms = wait_ms
        self.arrived: dict[str, dict[str, float]] = {}  # message id -> target -> time
        self.waiting = 0  # pulls sent and not answered
        self.errors = 0
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, targets: list[str]) -> None:
        loop = asyncio.get_running_loop()
        self.tasks += [loop.create_task(self._node(t)) for t in targets]

    async def _node(self, target: str) -> None:
        record: str | None = None
        while True:
            self.waiting += 1
            try:
                reply = await self.pull(target, record, self.wait_ms)
            except (TimeoutError, aiohttp.ClientError, aio_pika.exceptions.AMQPError):
                self.errors += 1
                await asyncio.sleep(0.5)
                continue
            finally:
                self.waiting -= 1
            if "error" in reply:
                self.errors += 1
                await asyncio.sleep(0.5)
                continue
            now = time.perf_counter()
            for m in reply["messages"]:
                self.arrived.setdefault(m["id"], {})[target] = now
            record = reply["record_id"]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.tasks = []


class HttpNodes:
    def __init__(self, port: int, nodes: int) -> None:
        self.base = f"http://127.0.0.1:{port}/directed/v1/targets"
        # one keep-alive connection per node, as N separate machines would have
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def pull(self, target: str, record: str | None, wait_ms: int) -> dict[str, Any]:
        body = {"record_id": record, "max": 10, "wait_ms": wait_ms}
        async with self.session.post(f"{self.base}/{target}/pull", json=body) as response:
            return await response.json(content_type=None)  # type: ignore[no-any-return]

    async def close(self) -> None:
        await self.session.close()


class AmqpNodes:
    """One AMQP connection per node (as N machines would hold), direct reply-to."""

    def __init__(self, s: DirectedSettings) -> None:
        self.s = s
        self.conns: dict[str, Any] = {}
        self.exchanges: dict[str, Any] = {}
        self.futures: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.failures = 0

    async def connect(self, targets: list[str], parallel: int = 8) -> list[str]:
        """A connection per target, ``parallel`` handshakes at a time (the broker closes one
        that takes over 10 s), each tried 3 times; the targets that got one."""
        sem = asyncio.Semaphore(parallel)
        self.failures = 0

        async def one(target: str) -> None:
            async with sem:
                for attempt in range(3):
                    try:
                        await self._open(target)
                        return
                    except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
                        self.failures += 1
                        if attempt == 2:
                            progress("amqp: no connection for", target, repr(exc))
                        await asyncio.sleep(1)

        await asyncio.gather(*(one(t) for t in targets))
        return [t for t in targets if t in self.exchanges]

    async def _open(self, target: str) -> None:
        # a broker out of sockets accepts the TCP connection and never answers
        conn = await asyncio.wait_for(aio_pika.connect(broker_url()), 30)
        try:
            channel = await conn.channel(publisher_confirms=False)
            queue = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
            await queue.consume(self._reply, no_ack=True)
            exchange = await channel.get_exchange(self.s.pull_exchange, ensure=False)
        except BaseException:
            await conn.close()
            raise
        self.conns[target] = conn
        self.exchanges[target] = exchange

    async def _reply(self, message: Any) -> None:
        fut = self.futures.pop(message.correlation_id or "", None)
        if fut is not None and not fut.done():
            fut.set_result(json.loads(message.body))

    async def pull(self, target: str, record: str | None, wait_ms: int) -> dict[str, Any]:
        corr = f"{target}:{time.perf_counter_ns()}"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.futures[corr] = fut
        body = {"topic": target, "record_id": record, "max": 10, "wait_ms": wait_ms}
        await self.exchanges[target].publish(
            aio_pika.Message(
                json.dumps(body).encode(),
                reply_to="amq.rabbitmq.reply-to",
                correlation_id=corr,
                content_type="application/json",
            ),
            routing_key=target,
        )
        try:
            return await asyncio.wait_for(fut, wait_ms / 1000 + 30)
        finally:
            self.futures.pop(corr, None)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.conns.values()), return_exceptions=True)


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def settle(seconds: float = 1.0) -> None:
    await asyncio.sleep(seconds)


def parked_pulls(worker: WorkerProcess) -> float:
    """Pulls the worker found nothing for (the first pull of each idle poller: it then
    waits), from its /metrics."""
    samples = worker.metrics().get("bridge_directed_pulls_total", {})
    return samples.get((("kind", "empty"),), 0.0)


async def until_parked(worker: WorkerProcess, count: float, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (parked := parked_pulls(worker)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {parked} of {count} pulls parked in the worker")
        await asyncio.sleep(0.5)


async def fleet_group(client: DirectedClient, group: str, targets: list[str]) -> str:
    """One group for the fleet: 10,000 names in ``x-targets`` would not fit in a header frame
    (131,072 bytes), nor in one control message (``MAX_PULL_BYTES``, 64 KiB): set in parts."""
    step = 2000
    for i in range(0, len(targets), step):
        op = "group_set" if i == 0 else "group_add"
        reply = await client.group(op, group, targets[i : i + step], timeout=60)
        if "error" in reply:
            raise RuntimeError(f"{op} {group}: {reply['error']}")
    return group


async def run_transport(
    name: str,
    args: argparse.Namespace,
    worker: WorkerProcess,
    client: DirectedClient,
    pull: Puller,
    targets: list[str],
    broker_pid: int | None,
    before_nodes: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """The figures of one transport: memory per idle poller, rounds, saturation."""
    warm = targets[: max(1, len(targets) // 20)]
    fleet = Fleet(targets, pull, args.wait_ms)
    parked0 = parked_pulls(worker)
    try:
        fleet.start(warm)
        await until(lambda: fleet.waiting == len(warm), 60, f"{name}: warm-up pollers waiting")
        await until_parked(worker, parked0 + len(warm), 60)
        await settle()
        rss0 = rss_bytes(worker.pid)
        broker0 = broker_memory(broker_pid) if broker_pid else None
        progress(name, "starting", len(targets) - len(warm), "more idle pollers")
        fleet.start(targets[len(warm) :])
        await until(lambda: fleet.waiting == len(targets), 300, f"{name}: every poller waiting")
        # sent is not parked: a connection may still wait in the listen backlog
        await until_parked(worker, parked0 + len(targets), 300)
        await settle(2.0)
        rss1 = rss_bytes(worker.pid)
        broker1 = broker_memory(broker_pid) if broker_pid else None
        added = len(targets) - len(warm)
        out: dict[str, Any] = {
            "nodes": len(targets),
            "worker_rss_bytes_per_idle_poller": rnd((rss1 - rss0) / added, 0),
            "worker_rss_bytes_with_all_pollers": rss1,
        }
        if broker0 and broker1:
            out["broker_erlang_bytes_per_node"] = rnd(
                (broker1["erlang_total"] - broker0["erlang_total"]) / added, 0
            )
            out["broker_rss_bytes_per_node"] = rnd((broker1["rss"] - broker0["rss"]) / added, 0)

        rounds = []
        progress(name, "memory", out)
        group = await fleet_group(client, f"fleet-{name}", targets)
        cpu0, own0, machine0 = cpu_seconds(worker.pid), cpu_seconds(os.getpid()), machine_cpu()
        broker_cpu0 = cpu_seconds(broker_pid) if broker_pid else 0.0
        for r in range(args.rounds):
            message_id = f"{name}-r{r}"
            started = time.perf_counter()
            await client.send(b"x" * args.body_bytes, [], message_id=message_id, groups=[group])
            await until(
                lambda mid=message_id: len(fleet.arrived.get(mid, {})) >= len(targets),
                120,
                f"{name}: round {r} delivered to every node",
            )
            delays = [t - started for t in fleet.arrived[message_id].values()]
            rounds.append(
                {
                    "p50_ms": rnd(percentile(delays, 50) * 1000),
                    "p99_ms": rnd(percentile(delays, 99) * 1000),
                    "all_ms": rnd(max(delays) * 1000),
                }
            )
            progress(name, "round", r, rounds[-1])
            await asyncio.sleep(args.interval)
        out["fanout_rounds"] = rounds
        out["publish_to_99pct_ms_median"] = rnd(median(r["p99_ms"] for r in rounds))
        out["worker_cpu_s_per_round"] = rnd((cpu_seconds(worker.pid) - cpu0) / args.rounds, 3)
        # the nodes' side (this process) and the machine, to say where a round's time goes
        out["nodes_cpu_s_per_round"] = rnd((cpu_seconds(os.getpid()) - own0) / args.rounds, 3)
        if broker_pid:
            out["broker_cpu_s_per_round"] = rnd(
                (cpu_seconds(broker_pid) - broker_cpu0) / args.rounds, 3
            )
        busy, total = machine_cpu()
        out["machine_cpu_busy_during_rounds"] = rnd((busy - machine0[0]) / (total - machine0[1]), 2)
        out["errors"] = fleet.errors
    finally:
        await fleet.stop()

    # saturation: C clients pulling with wait_ms 0 as fast as replies come back
    count = 0
    stop_at = time.perf_counter() + args.saturation_seconds

    async def hammer(target: str) -> None:
        nonlocal count
        record = None
        while time.perf_counter() < stop_at:
            reply = await pull(target, record, 0)
            record = reply.get("record_id")
            count += 1

    cpu0 = cpu_seconds(worker.pid)
    t0 = time.perf_counter()
    await asyncio.gather(*(hammer(t) for t in targets[: args.saturation_clients]))
    elapsed = time.perf_counter() - t0
    out["saturation"] = {
        "clients": args.saturation_clients,
        "pulls_per_s": rnd(count / elapsed, 0),
        "worker_cpu_ms_per_pull": rnd((cpu_seconds(worker.pid) - cpu0) / count * 1000, 3),
    }
    progress(name, "saturation", out["saturation"])
    return out


def raise_files_limit() -> int:
    """The soft open-files limit raised to the hard one, for this process and the worker
    (each HTTP node is a socket on both sides, each AMQP node one here)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def broker_sockets_limit() -> int | None:
    """How many sockets ``rabbitmqctl status`` says the broker may open."""
    try:
        match = re.search(r"Sockets: \d+, limit: (\d+)", rabbitmqctl("status"))
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return None
    return int(match.group(1)) if match else None


async def main(args: argparse.Namespace) -> dict[str, Any]:
    token = unique("bh")
    s = settings_for(token)
    targets = [f"node-{i:05d}" for i in range(args.nodes)]
    root = Path(tempfile.mkdtemp(prefix="bench-directed-http-"))
    env = env_for(s)
    env["BRIDGE_HTTP_KEEPALIVE_S"] = "120"
    # the saturation clients pull as fast as they can: the figure is the pull path's cost,
    # not the rate limit's
    env["BRIDGE_DIRECTED__HTTP_RATE_PER_TARGET"] = "0"
    files = raise_files_limit()
    worker = WorkerProcess(["directed"], state_dir=root / "state", env=env).start().wait_ready()
    broker_pid: int | None = None
    try:
        broker_pid = broker_info()["pid"]
    except Exception as exc:  # no local broker: skip broker-side figures
        progress("no broker figures:", exc)
    conn = await aio_pika.connect_robust(broker_url())
    client = await DirectedClient(conn, s).open()
    result: dict[str, Any] = {
        "open_files_limit": files,
        "broker_sockets_limit": broker_sockets_limit(),
        "nodes": args.nodes,
        "amqp_nodes": args.amqp_nodes,
        "wait_ms": args.wait_ms,
        "rounds": args.rounds,
        "body_bytes": args.body_bytes,
    }
    try:
        http = HttpNodes(worker.port, args.nodes)
        try:
            result["http"] = await run_transport(
                "http", args, worker, client, http.pull, targets, broker_pid
            )
        finally:
            await http.close()
        amqp = AmqpNodes(s)
        amqp_targets = targets[: args.amqp_nodes]
        progress("amqp: opening", len(amqp_targets), "connections")
        try:
            # broker memory per node includes the connection: measured around connect()
            before = broker_memory(broker_pid) if broker_pid else None
            connected = await amqp.connect(amqp_targets)
            progress("amqp:", len(connected), "connections,", amqp.failures, "failed attempts")
            if len(connected) < len(amqp_targets):
                result["amqp_nodes_connected"] = len(connected)
                amqp_targets = connected
            await settle(2.0)
            after = broker_memory(broker_pid) if broker_pid else None
            result["amqp"] = await run_transport(
                "amqp", args, worker, client, amqp.pull, amqp_targets, broker_pid
            )
            if before and after:
                result["amqp"]["broker_erlang_bytes_per_connection"] = rnd(
                    (after["erlang_total"] - before["erlang_total"]) / len(amqp_targets), 0
                )
                result["amqp"]["broker_rss_bytes_per_connection"] = rnd(
                    (after["rss"] - before["rss"]) / len(amqp_targets), 0
                )
        finally:
            await amqp.close()
    finally:
        await client.close()
        await conn.close()
        worker.stop()
        await delete_names(
            broker_url(),
            [s.requests_exchange, s.pull_exchange, s.control_exchange, s.dead_exchange],
            [s.requests_queue, s.pull_queue, s.control_queue, s.dead_queue],
        )
    h, a = result["http"], result["amqp"]
    result["ratios_http_over_amqp"] = {
        "publish_to_99pct": rnd(h["publish_to_99pct_ms_median"] / a["publish_to_99pct_ms_median"]),
        "saturation_pulls_per_s": rnd(
            h["saturation"]["pulls_per_s"] / a["saturation"]["pulls_per_s"]
        ),
    }
    if "broker_rss_bytes_per_connection" in a:
        # where each node costs memory: the worker (HTTP) against the broker (AMQP)
        result["ratios_http_over_amqp"]["memory_per_node_worker_http_over_broker_amqp"] = rnd(
            h["worker_rss_bytes_per_idle_poller"] / a["broker_rss_bytes_per_connection"]
        )
    result["goals"] = {
        "worker_rss_per_idle_http_poller_under_8KiB": h["worker_rss_bytes_per_idle_poller"] < 8192,
    }
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=10_000)
    p.add_argument(
        "--amqp-nodes",
        type=int,
        default=None,
        help="nodes of the AMQP side (default --nodes): each holds a broker connection, and a "
        "broker with the default open-files limit of 1024 has only 832 sockets for everyone",
    )
    p.add_argument("--wait-ms", type=int, default=30_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between fan-outs")
    p.add_argument("--body-bytes", type=int, default=256)
    p.add_argument("--saturation-seconds", type=float, default=5.0)
    p.add_argument("--saturation-clients", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="100 nodes, 2 rounds: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.nodes, args.rounds, args.saturation_seconds = 100, 2, 2.0
        args.saturation_clients = min(args.saturation_clients, 16)
    if args.amqp_nodes is None or args.amqp_nodes > args.nodes:
        args.amqp_nodes = args.nodes
    args.saturation_clients = min(args.saturation_clients, args.amqp_nodes)
    return args


def run() -> None:
    emit(asyncio.run(main(parse_args())))


if __name__ == "__main__":
    run()
