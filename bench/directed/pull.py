"""Pulls: T targets drained by P concurrent pullers in client processes, next to an echo RPC server
(same client, same broker, same reply sizes, no state) as the ceiling of request/reply."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import multiprocessing as mp
import os
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika

from bench.directed.worker import Directed, ms
from bench.harness.broker import broker_info_cached, delete_names
from bench.harness.cpu import CpuWatch
from bench.harness.profiler import Profiler
from bench.harness.report import broker_url, progress, unique
from bench.harness.stats import histogram_delta, histogram_quantile, median, percentile, rnd
from workers.directed.config import DirectedSettings


def _puller_process(
    url: str,
    settings: dict[str, Any],
    targets: list[str],
    pullers: int,
    max_n: int,
    ready: Any,
    start: Any,
    results: Any,
) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_pullers(url, settings, targets, pullers, max_n, ready, start, results))


async def _pullers(
    url: str,
    settings: dict[str, Any],
    targets: list[str],
    pullers: int,
    max_n: int,
    ready: Any,
    start: Any,
    results: Any,
) -> None:
    """``pullers`` nodes in this process, each draining its share of ``targets`` with the
    cursor protocol (docs/wire.md), on the project's own data path (:mod:`bridge.amqp`):
    pull requests published without confirms (a request nothing routed gets no reply and
    counts as a timeout after 10 s), replies consumed no-ack from an exclusive queue of
    this process. On two cores the load generator should
    take as little CPU from the broker and the worker as it can (the aio-pika client
    helper, which also waits for a confirm of every request, cost about 0.4 ms per pull)."""
    from bridge.amqp.consumer import Consumer, QueueSpec
    from bridge.amqp.frames import Delivery, Properties
    from bridge.amqp.link import Link
    from bridge.amqp.publisher import Publisher

    s = DirectedSettings(**settings)
    reply_queue = f"bench.pull.replies.{os.getpid()}.{uuid.uuid4().hex[:6]}"
    futures: dict[str, asyncio.Future[dict[str, Any]]] = {}

    def on_reply(delivery: Delivery) -> None:
        fut = futures.pop(delivery.properties.correlation_id or "", None)
        if fut is not None and not fut.done():
            fut.set_result(json.loads(delivery.body))

    link = Link(url, name="bench pullers")
    publisher = Publisher(link, confirms=False)
    spec = QueueSpec(reply_queue, durable=False, exclusive=True, auto_delete=True)
    Consumer(link, spec, on_reply, prefetch=1000, no_ack=True, declare=True)
    await link.start()
    serial = 0

    async def pull(target: str, record_id: str | None) -> dict[str, Any]:
        nonlocal serial
        serial += 1
        corr = str(serial)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        futures[corr] = fut
        doc = {"topic": target, "record_id": record_id, "max": max_n, "wait_ms": 0}
        props = Properties(
            reply_to=reply_queue,
            correlation_id=corr,
            content_type="application/json",
            expiration="10000",
        )
        sent = publisher.publish(s.pull_exchange, target, json.dumps(doc).encode(), props)
        try:
            await sent  # without confirms: done once written (fails if the link is lost)
            return await asyncio.wait_for(fut, 10.0)
        finally:
            futures.pop(corr, None)

    ready.put(os.getpid())
    await asyncio.to_thread(start.wait)
    latencies: list[float] = []
    counts = {"pulls": 0, "messages": 0, "errors": 0, "redelivered": 0, "timeouts": 0}

    async def drain(share: list[str]) -> None:
        for target in share:
            record_id = None
            while True:
                t0 = time.perf_counter()
                try:
                    reply = await pull(target, record_id)
                except TimeoutError:
                    counts["timeouts"] += 1
                    continue
                except Exception:  # the request could not be written (link lost)
                    counts["errors"] += 1
                    break
                latencies.append(time.perf_counter() - t0)
                counts["pulls"] += 1
                if "error" in reply:
                    counts["errors"] += 1
                    break
                counts["redelivered"] += bool(reply.get("redelivered"))
                if not reply["messages"]:
                    break
                counts["messages"] += len(reply["messages"])
                record_id = reply["record_id"]

    cpu0 = time.process_time()
    t0 = time.monotonic()
    await asyncio.gather(*(drain(targets[i::pullers]) for i in range(pullers)))
    t1 = time.monotonic()
    cpu1 = time.process_time()
    await link.close()
    results.put(
        {
            "start": t0,
            "end": t1,
            "cpu_s": cpu1 - cpu0,
            "latencies": latencies,
            **counts,
        }
    )


async def run_pullers(
    args: argparse.Namespace,
    settings: dict[str, Any],
    targets: list[str],
    watch_pids: dict[str, int],
    profile_pid: int | None,
    profile_out: Path | None,
) -> dict[str, Any]:
    """Drain ``targets`` with ``args.pullers`` pullers over ``args.pull_procs`` processes."""
    ctx = mp.get_context("spawn")
    ready, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = []
    per_proc = max(1, args.pullers // args.pull_procs)
    for i in range(args.pull_procs):
        share = targets[i :: args.pull_procs]
        p = ctx.Process(
            target=_puller_process,
            args=(broker_url(), settings, share, per_proc, args.max, ready, start, results),
            daemon=True,
        )
        p.start()
        procs.append(p)
    try:
        pids = [await asyncio.to_thread(ready.get, True, 60) for _ in procs]
        watch = CpuWatch(
            {**watch_pids, **{f"client{i}": pid for i, pid in enumerate(pids)}},
            no_runqueue=("broker",),
        )
        profiler = (
            Profiler(profile_pid, profile_out)
            if profile_pid is not None and profile_out is not None
            else None
        )
        watch.start()
        start.set()
        done = [await asyncio.to_thread(results.get, True, 600) for _ in procs]
        cpu = watch.stop()
        profile = profiler.stop() if profiler is not None else None
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    wall = max(r["end"] for r in done) - min(r["start"] for r in done)
    latencies = [x for r in done for x in r["latencies"]]
    pulls = sum(r["pulls"] for r in done)
    out: dict[str, Any] = {
        "pulls": pulls,
        "messages": sum(r["messages"] for r in done),
        "seconds": rnd(wall, 3),
        "pulls_per_s": rnd(pulls / wall, 1),
        "latency_p50_ms": ms(percentile(latencies, 50)),
        "latency_p99_ms": ms(percentile(latencies, 99)),
        "errors": sum(r["errors"] for r in done),
        "timeouts": sum(r["timeouts"] for r in done),
        "redelivered": sum(r["redelivered"] for r in done),
        "client_cpu_cores_per_process": [rnd(r["cpu_s"] / wall) for r in done],
        "cpu": cpu,
        "cpu_ms_per_pull": {
            k[: -len("_cores")]: rnd(v * 1000 / (pulls / wall), 3)
            for k, v in cpu.items()
            if k.endswith("_cores")
        },
    }
    if profile is not None:
        out["profile"] = profile
    return out


class EchoServer:
    """A stateless RPC server in its own process: the same consume / reply / ack path as the
    worker's pulls, the same reply sizes and pulls per target, but no core and no SQLite."""

    def __init__(self, args: argparse.Namespace, queue_type: str) -> None:
        self.queue_type = queue_type
        token = unique("bench-echo")
        self.exchange = f"{token}.pull"
        self.queue = f"{token}.pull"
        # the clients' warm-up status query goes to the control exchange: the same one here
        self.names = {"pull_exchange": self.exchange, "control_exchange": self.exchange}
        body = base64.b64encode(os.urandom(args.body_bytes)).decode()
        self.reply = {
            "steps": math.ceil(args.messages / args.max),
            "messages": [
                {"id": f"m{i}", "body": body, "content_type": None, "headers": {}}
                for i in range(args.max)
            ],
            "queue_type": queue_type,
        }
        self.proc: Any = None
        self.pid = 0

    async def __aenter__(self) -> EchoServer:
        ctx = mp.get_context("spawn")
        ready = ctx.Queue()
        self.proc = ctx.Process(
            target=_echo_process,
            args=(broker_url(), self.exchange, self.queue, ready, self.reply),
            daemon=True,
        )
        self.proc.start()
        self.pid = await asyncio.to_thread(ready.get, True, 60)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.join(10)
        await delete_names(broker_url(), [self.exchange], [self.queue])


async def pull_round(
    args: argparse.Namespace, root: Path, d: Directed, queue_type: str, r: int
) -> dict[str, Any]:
    """Seed ``args.messages`` messages to every target, then drain them all."""
    assert d.client is not None
    info = broker_info_cached()
    body = os.urandom(args.body_bytes)
    targets = [f"pull{r}-{i:06d}" for i in range(args.targets)]
    seed0 = time.perf_counter()
    ids = [f"{d.token}-seed-{r}-{k}" for k in range(args.messages)]
    for mid in ids[:-1]:
        await d.client.send(body, targets, message_id=mid)
    await d.send_committed(body, targets, ids[-1])
    seed_s = time.perf_counter() - seed0
    before = await d.metrics()
    profile_out = root / f"pull-{queue_type}-{r}.pyspy.txt" if args.profile and r == 0 else None
    result = await run_pullers(
        args,
        {**d.names, "pull_queue_type": queue_type},
        targets,
        {"worker": d.worker.pid, **({"broker": info["pid"]} if info else {})},
        d.worker.pid if profile_out else None,
        profile_out,
    )
    after = await d.metrics()
    hist = histogram_delta(before, after, "bridge_directed_pull_seconds")
    commits = histogram_delta(before, after, "bridge_directed_commit_seconds")
    kinds = {
        dict(k).get("kind", ""): v - before.get("bridge_directed_pulls_total", {}).get(k, 0)
        for k, v in after.get("bridge_directed_pulls_total", {}).items()
    }
    statuses = [await d.client.status(mid) for mid in ids]
    result.update(
        {
            "seed_seconds": rnd(seed_s, 2),
            "worker_pull_p50_ms": ms(histogram_quantile(hist, 0.5)),
            "worker_pull_p99_ms": ms(histogram_quantile(hist, 0.99)),
            "worker_commits": commits["count"],
            "worker_commit_mean_ms": ms(commits["sum"] / max(commits["count"], 1)),
            "worker_commit_busy_share": rnd(commits["sum"] / result["seconds"]),
            "pulls_per_commit": rnd(result["pulls"] / max(commits["count"], 1)),
            "pull_kinds": {k: v for k, v in kinds.items() if v},
            "all_acknowledged": all(
                s.get("status", {}).get("acked") == len(targets) for s in statuses
            ),
        }
    )
    progress(
        f"pull {queue_type} round {r}: {result['pulls_per_s']} pulls/s "
        f"p50 {result['latency_p50_ms']} ms p99 {result['latency_p99_ms']} ms "
        f"cpu {result['cpu']} cpu ms/pull {result['cpu_ms_per_pull']}"
    )
    return result


async def echo_round(args: argparse.Namespace, echo: EchoServer, r: int) -> dict[str, Any]:
    info = broker_info_cached()
    targets = [f"echo{r}-{i:06d}" for i in range(args.targets)]
    result = await run_pullers(
        args,
        echo.names,
        targets,
        {"echo_server": echo.pid, **({"broker": info["pid"]} if info else {})},
        None,
        None,
    )
    progress(
        f"echo {echo.queue_type} round {r}: {result['pulls_per_s']} rpc/s "
        f"p50 {result['latency_p50_ms']} ms cpu {result['cpu']} "
        f"cpu ms/rpc {result['cpu_ms_per_pull']}"
    )
    return result


async def bench_pulls(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Worker and echo rounds interleaved, so both see the same background load; with
    ``--against TREE`` also the worker of that checkout (an earlier commit), interleaved."""
    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {
        q: {"worker": [], "echo": [], "against": []} for q in args.queue_types
    }
    async with contextlib.AsyncExitStack() as stack:
        workers = {
            q: await stack.enter_async_context(Directed(root, q, args.synchronous))
            for q in args.queue_types
        }
        against = {
            q: await stack.enter_async_context(
                Directed(root, q, args.synchronous, tree=args.against)
            )
            for q in (args.queue_types if args.against else ())
        }
        echoes = {q: await stack.enter_async_context(EchoServer(args, q)) for q in args.queue_types}
        for r in range(args.repeats):
            for q in args.queue_types:
                rounds[q]["worker"].append(await pull_round(args, root, workers[q], q, r))
                if q in against:
                    progress(f"  (the same round against {args.against})")
                    rounds[q]["against"].append(await pull_round(args, root, against[q], q, r))
                rounds[q]["echo"].append(await echo_round(args, echoes[q], r))
    out: dict[str, Any] = {}
    for q in args.queue_types:
        w, e, a = rounds[q]["worker"], rounds[q]["echo"], rounds[q]["against"]
        out[q] = {
            **summarise_rounds(w),
            "ratio_to_echo_rpc_median": rnd(
                median(x["pulls_per_s"] / y["pulls_per_s"] for x, y in zip(w, e, strict=True))
            ),
            "echo_rpc_baseline": summarise_rounds(e),
        }
        if a:
            out[q]["against"] = {
                "tree": str(args.against),
                **summarise_rounds(a),
                "ratio_pulls_per_s_median": rnd(
                    median(x["pulls_per_s"] / y["pulls_per_s"] for x, y in zip(w, a, strict=True))
                ),
                "ratio_worker_cpu_per_pull_median": rnd(
                    median(
                        x["cpu_ms_per_pull"].get("worker", 0.0)
                        / max(y["cpu_ms_per_pull"].get("worker", 0.0), 1e-9)
                        for x, y in zip(w, a, strict=True)
                    )
                ),
            }
    return out


def summarise_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("pulls_per_s", "latency_p50_ms", "latency_p99_ms")
    cpu_keys = sorted({k for r in rounds for k in r["cpu_ms_per_pull"]})
    return {
        **{f"{k}_median": rnd(median(r[k] for r in rounds)) for k in keys},
        "cpu_ms_per_pull_median": {
            k: rnd(median(r["cpu_ms_per_pull"].get(k, 0.0) for r in rounds), 3) for k in cpu_keys
        },
        "rounds": rounds,
    }


def _echo_process(url: str, exchange: str, queue: str, ready: Any, reply: dict[str, Any]) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_echo(url, exchange, queue, ready, reply))


async def _echo(url: str, exchange: str, queue: str, ready: Any, reply: dict[str, Any]) -> None:
    conn = await aio_pika.connect_robust(url)
    channel = await conn.channel(publisher_confirms=False)
    await channel.set_qos(prefetch_count=1024)
    ex = await channel.declare_exchange(exchange, "topic", durable=True)
    q = await channel.declare_queue(
        queue, durable=True, arguments={"x-queue-type": reply["queue_type"]}
    )
    await q.bind(ex, "#")
    replies = await conn.channel(publisher_confirms=False)
    steps = reply["steps"]
    full = json.dumps(reply["messages"]).encode()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        doc = json.loads(message.body)
        step = int((doc.get("record_id") or "e0")[1:])
        out = {
            "topic": doc.get("topic"),
            "record_id": f"e{step + 1}" if step < steps else None,
            "redelivered": False,
            "messages": json.loads(full) if step < steps else [],
        }
        await replies.default_exchange.publish(
            aio_pika.Message(
                json.dumps(out, separators=(",", ":")).encode(),
                correlation_id=message.correlation_id,
                content_type="application/json",
            ),
            routing_key=message.reply_to or "",
            mandatory=False,  # as the worker's replies: a gone requester is not an error
        )
        await message.ack()

    await q.consume(on_message)
    ready.put(os.getpid())
    await asyncio.Future()  # until terminated


# -- 3. baseline: one quorum queue per target ---------------------------------------------
