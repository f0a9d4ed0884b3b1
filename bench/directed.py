"""Benchmark of the ``directed`` worker against what a RabbitMQ user would do instead.

    python -m bench.directed            # full run (10,000 targets, 200 pullers; a few minutes)
    python -m bench.directed --quick    # smoke run, well under a minute

Prints one JSON object on stdout (progress on stderr). The worker runs as a subprocess
(``python -m bridge.cli run directed``, uvloop) against ``BRIDGE_AMQP_URL`` or the local broker,
with unique exchange and queue names that are deleted afterwards. Measured in one run:

1. ``fanout``: one 1 KiB message to T targets (envelope body): time from publish until the
   status query answers (applied in memory) and until a ``max: 0`` pull answers (that reply
   waits for the group commit, so it marks "committed"), the worker's own commit histogram,
   and SQLite bytes per extra target ((size of a T-target request - size of a 1-target
   request) / (T - 1), page counts after ``wal_checkpoint(TRUNCATE)``), for first-time
   targets and for a second message to the same targets;
2. ``pull``: T targets drained by P concurrent pullers spread over several client processes,
   for a quorum and a classic pull queue, plus an echo RPC server (same client, same broker,
   same reply sizes, no state) as the ceiling of request/reply over this broker and machine;
3. ``baseline``: one quorum queue per target (B targets) behind a fanout exchange, one 1 KiB
   message published once: broker memory and disk growth, and time until every queue has it.

CPU is shared with whatever else runs on the machine, so each figure is the median of
``--repeats`` runs and the machine's busy cores are reported next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aio_pika

from bench.common import (
    CpuWatch,
    Profiler,
    WorkerProcess,
    broker_info,
    broker_memory,
    broker_url,
    disk_blocks_bytes,
    du_bytes,
    emit,
    histogram_delta,
    histogram_quantile,
    median,
    percentile,
    progress,
    rnd,
    rss_bytes,
    unique,
)
from workers.directed.client import HEADER_TARGET_LIMIT, DirectedClient
from workers.directed.config import DirectedSettings

NAME_FIELDS = (
    "requests_exchange",
    "requests_queue",
    "pull_exchange",
    "pull_queue",
    "control_exchange",
    "control_queue",
    "dead_exchange",
    "dead_queue",
)

GOAL_COMMIT_MS = 100.0
GOAL_PULLS_PER_S = 2000.0
GOAL_BYTES_PER_TARGET = 64.0


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def names_for(token: str) -> dict[str, str]:
    return {field: f"{token}.{field.replace('_', '.')}" for field in NAME_FIELDS}


def worker_env(names: dict[str, str], queue_type: str, synchronous: str) -> dict[str, str]:
    env = {f"BRIDGE_DIRECTED__{k.upper()}": v for k, v in names.items()}
    env["BRIDGE_DIRECTED__PULL_QUEUE_TYPE"] = queue_type
    env["BRIDGE_DIRECTED__SYNCHRONOUS"] = synchronous
    return env


async def delete_topology(url: str, exchanges: list[str], queues: list[str]) -> None:
    conn = await aio_pika.connect(url)
    try:
        channel = await conn.channel()
        for q in queues:
            try:
                await channel.queue_delete(q)
            except Exception:
                channel = await conn.channel()
        for e in exchanges:
            try:
                await channel.exchange_delete(e)
            except Exception:
                channel = await conn.channel()
    finally:
        await conn.close()


class Directed:
    """A worker subprocess with unique names, and a client connected to it."""

    def __init__(
        self, root: Path, queue_type: str, synchronous: str = "FULL", tree: Path | None = None
    ) -> None:
        self.token = unique("bench-directed")
        self.names = names_for(self.token)
        self.settings = DirectedSettings(**self.names, pull_queue_type=queue_type)  # type: ignore[arg-type]
        self.state = root / self.token
        self.worker = WorkerProcess(
            ["directed"],
            state_dir=self.state,
            env=worker_env(self.names, queue_type, synchronous),
            tree=tree,
        )
        self.conn: Any = None
        self.client: DirectedClient | None = None

    @property
    def db_path(self) -> Path:
        return self.state / "directed" / "directed.sqlite3"

    async def __aenter__(self) -> Directed:
        await asyncio.to_thread(self.worker.start)
        self.conn = await aio_pika.connect_robust(broker_url())
        self.client = await DirectedClient(self.conn, self.settings).open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            if self.client is not None:
                await self.client.close()
            if self.conn is not None:
                await self.conn.close()
        await asyncio.to_thread(self.worker.stop)
        n = self.names
        await delete_topology(
            broker_url(),
            [n["requests_exchange"], n["pull_exchange"], n["control_exchange"], n["dead_exchange"]],
            [n["requests_queue"], n["pull_queue"], n["control_queue"], n["dead_queue"]],
        )

    async def metrics(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.worker.metrics)

    async def send_committed(
        self, body: bytes, targets: list[str], message_id: str
    ) -> dict[str, float]:
        """Publish one request; time until confirmed, applied (status) and committed."""
        client = self.client
        assert client is not None
        t0 = time.perf_counter()
        await client.send(body, targets, message_id=message_id)
        t_confirm = time.perf_counter()
        polls = 0
        while True:
            p0 = time.perf_counter()
            reply = await client.status(message_id)
            polls += 1
            if "status" in reply:
                break
            if time.perf_counter() - t0 > 60:
                raise RuntimeError(f"request {message_id} not applied after 60 s: {reply}")
        t_applied = time.perf_counter()
        # A pull is answered only after the commit barrier that follows it, so a max=0 pull
        # sent after the status answered returns once the request's effect is on disk.
        await client.pull(targets[0], None, max=0)
        t_committed = time.perf_counter()
        return {
            "publish_confirm_ms": ms(t_confirm - t0),
            "applied_ms": ms(t_applied - t0),
            "committed_ms": ms(t_committed - t0),
            "status_polls": polls,
            "last_status_rtt_ms": ms(t_applied - p0),
        }


def db_size(path: Path) -> dict[str, Any]:
    """Checkpoint the WAL (from a second connection, which WAL mode allows) and measure."""
    conn = sqlite3.connect(path, timeout=30)
    try:
        for _ in range(50):
            busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            if not busy:
                break
            time.sleep(0.05)
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        tables = {
            name: int(size)
            for name, size in conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name")
        }
    finally:
        conn.close()
    wal = Path(str(path) + "-wal")
    return {
        "bytes": pages * page_size,
        "used_bytes": (pages - free) * page_size,
        "file_bytes": path.stat().st_size + (wal.stat().st_size if wal.exists() else 0),
        "tables": tables,
    }


# -- 1. fan-out --------------------------------------------------------------------------


async def bench_fanout(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    body = os.urandom(args.body_bytes)
    runs: dict[str, list[dict[str, Any]]] = {"first_time": [], "existing": []}
    rss_per_target: list[float] = []
    profile: dict[str, Any] | None = None
    async with Directed(root, "quorum", args.synchronous) as d:
        worker_pid = d.worker.pid
        profiler = (
            Profiler(worker_pid, root / "fanout.pyspy.txt", rate=1000) if args.profile else None
        )
        for rep in range(args.repeats):
            targets = [f"fan{rep}-{i:06d}" for i in range(args.targets)]
            single = [f"one{rep}-000000"]
            size = await asyncio.to_thread(db_size, d.db_path)
            for kind in ("first_time", "existing"):
                await d.send_committed(body, single, f"{d.token}-{kind}-{rep}-1")
                size_1 = await asyncio.to_thread(db_size, d.db_path)
                rss0 = rss_bytes(worker_pid)
                before = await d.metrics()
                timing = await d.send_committed(body, targets, f"{d.token}-{kind}-{rep}-n")
                after = await d.metrics()
                rss1 = rss_bytes(worker_pid)
                size_n = await asyncio.to_thread(db_size, d.db_path)
                if kind == "first_time":
                    rss_per_target.append((rss1 - rss0) / len(targets))
                commits = histogram_delta(before, after, "bridge_directed_commit_seconds")
                grow_1 = size_1["used_bytes"] - size["used_bytes"]
                grow_n = size_n["used_bytes"] - size_1["used_bytes"]
                tables = {
                    t: size_n["tables"].get(t, 0) - size_1["tables"].get(t, 0)
                    for t in size_n["tables"]
                    if size_n["tables"].get(t, 0) != size_1["tables"].get(t, 0)
                }
                run = {
                    **timing,
                    "worker_commits": commits["count"],
                    "worker_commit_ms": ms(commits["sum"]),
                    "bytes_1_target": grow_1,
                    "bytes_n_targets": grow_n,
                    "bytes_per_extra_target": rnd((grow_n - grow_1) / (len(targets) - 1)),
                    "table_growth_bytes": tables,
                }
                runs[kind].append(run)
                progress(f"fanout rep {rep} {kind}: {run}")
                size = size_n
        if profiler is not None:
            profile = profiler.stop()
        final = await asyncio.to_thread(db_size, d.db_path)

    def summary(items: list[dict[str, Any]]) -> dict[str, Any]:
        keys = (
            "publish_confirm_ms",
            "applied_ms",
            "committed_ms",
            "worker_commit_ms",
            "bytes_per_extra_target",
            "last_status_rtt_ms",
        )
        return {
            **{f"{k}_median": rnd(median(r[k] for r in items)) for k in keys},
            "runs": items,
        }

    names = [f"fan0-{i:06d}" for i in range(args.targets)]
    envelope = {
        "targets": names,
        "body": base64.b64encode(body).decode(),
        "content_type": None,
        "headers": {},
    }
    out: dict[str, Any] = {
        "targets": args.targets,
        "body_bytes": args.body_bytes,
        "target_name_bytes": len(names[-1]),
        "request_format": "envelope body" if args.targets > HEADER_TARGET_LIMIT else "x-targets",
        "request_bytes_on_the_wire": len(json.dumps(envelope).encode()),
        "first_time": summary(runs["first_time"]),
        "existing": summary(runs["existing"]),
        "worker_rss_growth_per_new_target_bytes": rnd(median(rss_per_target)),
        "db_final": final,
        "notes": [
            "applied_ms: publish until the status query answers (the core has the request; "
            "the worker answers status before the commit), polled back to back, so the "
            "granularity is one status round trip (last_status_rtt_ms)",
            "committed_ms: publish until a max=0 pull sent after that answers; pull replies "
            "wait for the group commit, so this is end to end until durable "
            "(synchronous=FULL)",
            "worker_commit_ms: sum of bridge_directed_commit_seconds observed during the "
            "request (the SQLite transaction on the writer thread)",
            "bytes: SQLite (page_count - freelist_count) * page_size after "
            "wal_checkpoint(TRUNCATE); per extra target = (growth of the N-target request - "
            "growth of a 1-target request) / (N - 1)",
        ],
    }
    if profile is not None:
        out["profile"] = profile
    return out


# -- 2. pulls ----------------------------------------------------------------------------


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
    conn = await aio_pika.connect_robust(url)
    client = await DirectedClient(conn, DirectedSettings(**settings)).open()
    await client.status("warm-up")
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
                    reply = await client.pull(target, record_id, max_n)
                except TimeoutError:
                    counts["timeouts"] += 1
                    continue
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
    await client.close()
    await conn.close()
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
        await delete_topology(broker_url(), [self.exchange], [self.queue])


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

_BROKER: dict[str, Any] | None = None


def broker_info_cached() -> dict[str, Any] | None:
    global _BROKER
    if _BROKER is None:
        try:
            _BROKER = broker_info()
        except Exception as exc:
            progress(f"no broker-side figures: {exc}")
            _BROKER = {}
    return _BROKER or None


async def _in_parallel(conn: Any, items: list[str], fn: Any, channels: int = 16) -> list[Any]:
    """Run ``fn(channel, item)`` over items, one channel per slice (AMQP RPCs are serial)."""
    out: list[Any] = [None] * len(items)

    async def lane(k: int) -> None:
        channel = await conn.channel(publisher_confirms=False)
        for i in range(k, len(items), channels):
            out[i] = await fn(channel, items[i])
        await channel.close()

    await asyncio.gather(*(lane(k) for k in range(min(channels, len(items)))))
    return out


async def bench_baseline(args: argparse.Namespace) -> dict[str, Any]:
    info = broker_info_cached()
    if not info:
        return {"skipped": "rabbitmqctl not available; broker-side figures need a local broker"}
    data_dir = Path(info["data_dir"])
    quorum_dir = data_dir / "quorum"
    token = unique("bench-baseline")
    n = args.baseline_targets
    queues = [f"{token}.q{i:05d}" for i in range(n)]
    exchange = f"{token}.fanout"
    body = os.urandom(args.body_bytes)

    def ra_dirs() -> set[Path]:
        return {p for p in quorum_dir.glob("*/*") if p.is_dir()}

    ours: set[Path] = set()

    def measure() -> dict[str, Any]:
        mem = broker_memory(info["pid"])
        wal = list(quorum_dir.glob("*/*.wal"))
        return {
            **mem,
            # The Ra WAL (shared by every quorum queue of the node) plus our queues' own
            # directories; other queues' directories are left out to cut the noise.
            "disk_bytes": du_bytes([*wal, *ours]),
            "data_dir_bytes": du_bytes([data_dir]),
            "data_dir_blocks_bytes": disk_blocks_bytes([data_dir]),
        }

    conn = await aio_pika.connect(broker_url())
    out: dict[str, Any] = {"targets": n, "queue_type": "quorum", "body_bytes": args.body_bytes}
    try:
        dirs0 = await asyncio.to_thread(ra_dirs)
        m0 = await asyncio.to_thread(measure)
        channel = await conn.channel(publisher_confirms=True)
        ex = await channel.declare_exchange(exchange, "fanout", durable=True)

        async def declare(ch: Any, name: str) -> None:
            q = await ch.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
            await q.bind(exchange, "")

        t0 = time.perf_counter()
        await _in_parallel(conn, queues, declare)
        out["declare_seconds"] = rnd(time.perf_counter() - t0, 2)
        progress(f"baseline: {n} quorum queues declared in {out['declare_seconds']} s")
        m1 = await asyncio.to_thread(measure)
        ours.update(await asyncio.to_thread(ra_dirs) - dirs0)
        out["queue_dirs_found"] = len(ours)
        out["queue_dirs_bytes_per_queue"] = rnd(du_bytes(ours) / max(len(ours), 1))

        async def count(ch: Any, name: str) -> int:
            q = await ch.declare_queue(name, passive=True)
            return int(q.declaration_result.message_count or 0)

        runs = []
        prev = m1
        for i in range(1, args.baseline_messages + 1):
            t0 = time.perf_counter()
            await ex.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key="",
            )
            t_confirm = time.perf_counter() - t0
            sweeps = []
            while True:
                s0 = time.perf_counter()
                counts = await _in_parallel(conn, queues, count)
                sweeps.append(time.perf_counter() - s0)
                if min(counts) >= i:
                    break
            t_all = time.perf_counter() - t0
            m = await asyncio.to_thread(measure)
            run = {
                "publish_confirm_ms": ms(t_confirm),
                "all_queues_have_it_ms": ms(t_all),
                "count_sweeps": len(sweeps),
                "count_sweep_ms": ms(median(sweeps)),
                "memory_erlang_bytes_per_target": rnd(
                    (m["erlang_total"] - prev["erlang_total"]) / n
                ),
                "memory_rss_bytes_per_target": rnd((m["rss"] - prev["rss"]) / n),
                "disk_bytes_per_target": rnd((m["disk_bytes"] - prev["disk_bytes"]) / n),
            }
            runs.append(run)
            progress(f"baseline message {i}: {run}")
            prev = m
        out.update(
            {
                "queue_memory_erlang_bytes_per_target": rnd(
                    (m1["erlang_total"] - m0["erlang_total"]) / n
                ),
                "queue_memory_rss_bytes_per_target": rnd((m1["rss"] - m0["rss"]) / n),
                "queue_disk_bytes_per_target": rnd((m1["disk_bytes"] - m0["disk_bytes"]) / n),
                "publish_confirm_ms_median": rnd(median(r["publish_confirm_ms"] for r in runs)),
                "all_queues_have_it_ms_median": rnd(
                    median(r["all_queues_have_it_ms"] for r in runs)
                ),
                "message_memory_erlang_bytes_per_target_median": rnd(
                    median(r["memory_erlang_bytes_per_target"] for r in runs)
                ),
                "message_disk_bytes_per_target_median": rnd(
                    median(r["disk_bytes_per_target"] for r in runs)
                ),
                "message_disk_bytes_per_target_min": rnd(
                    min(r["disk_bytes_per_target"] for r in runs)
                ),
                "messages": runs,
                "memory_before": m0,
                "memory_after_declare": m1,
                "notes": [
                    f"{n} quorum queues, not 10,000: 10,000 quorum queues (one Ra server "
                    "each) are too heavy for a 2-core machine shared with other work",
                    "memory: erlang:memory(total) after a full GC of every process, so "
                    "other traffic on the broker adds noise; rss is the OS view",
                    "disk: apparent size of the node's Ra WAL plus the directories of these "
                    "queues (data_dir_bytes: the whole data directory); the WAL is shared by "
                    "all quorum queues of the node, so other traffic only adds to it: the "
                    "min over messages is the least noisy figure",
                    "all_queues_have_it_ms: publish until passive declares of every queue "
                    "report the message; its granularity is one sweep over all queues "
                    "(count_sweep_ms); publish_confirm_ms is when the broker confirmed it, "
                    "which for a fanout to quorum queues means every queue committed it",
                ],
            }
        )
    finally:
        progress(f"baseline: deleting {n} queues")
        with contextlib.suppress(Exception):
            await _in_parallel(conn, queues, lambda ch, name: ch.queue_delete(name))
        with contextlib.suppress(Exception):
            ch = await conn.channel()
            await ch.exchange_delete(exchange)
        await conn.close()
    return out


# -- main --------------------------------------------------------------------------------


def goals(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fan = result.get("fanout")
    if fan:
        kinds = ("first_time", "existing")
        commit = max(fan[k]["committed_ms_median"] for k in kinds)
        worker_commit = max(fan[k]["worker_commit_ms_median"] for k in kinds)
        per_target = max(fan[k]["bytes_per_extra_target_median"] for k in kinds)
        out["commit_10k_under_100ms"] = {
            "end_to_end_committed_ms": commit,
            "worker_transaction_ms": worker_commit,
            "met_end_to_end": commit < GOAL_COMMIT_MS,
            "met_worker_transaction": worker_commit < GOAL_COMMIT_MS,
        }
        out["bytes_per_extra_target_under_64"] = {
            "worst_of_first_time_and_existing": per_target,
            "met": per_target < GOAL_BYTES_PER_TARGET,
        }
        base = result.get("baseline", {})
        if "message_disk_bytes_per_target_min" in base:
            least = base["message_disk_bytes_per_target_min"]
            out["bytes_per_extra_target_under_64"].update(
                {
                    "baseline_disk_bytes_per_target_per_message": least,
                    "baseline_at_least_content_size": least >= result["config"]["body_bytes"],
                }
            )
    if result.get("pull"):
        pulls = {q: r["pulls_per_s_median"] for q, r in result["pull"].items()}
        out["pulls_at_least_2000_per_s"] = {
            "pulls_per_s": pulls,
            "met": {q: v >= GOAL_PULLS_PER_S for q, v in pulls.items()},
        }
    return out


def comparison(fan: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    existing = fan["existing"]["bytes_per_extra_target_median"]
    return {
        "directed_bytes_per_extra_target_existing": existing,
        "directed_bytes_per_extra_target_first_time": fan["first_time"][
            "bytes_per_extra_target_median"
        ],
        "baseline_disk_bytes_per_target_per_message_min": base["message_disk_bytes_per_target_min"],
        "baseline_disk_bytes_per_target_per_message_median": base[
            "message_disk_bytes_per_target_median"
        ],
        "baseline_memory_bytes_per_target_per_message_median": base[
            "message_memory_erlang_bytes_per_target_median"
        ],
        "baseline_queue_dir_bytes_per_target": base["queue_dirs_bytes_per_queue"],
        "baseline_queue_memory_bytes_per_target": base["queue_memory_erlang_bytes_per_target"],
        "disk_ratio_baseline_to_directed_per_message": rnd(
            base["message_disk_bytes_per_target_min"] / max(existing, 1e-9), 1
        ),
        "directed_committed_ms": fan["existing"]["committed_ms_median"],
        "directed_targets": fan["targets"],
        "baseline_publish_confirm_ms": base["publish_confirm_ms_median"],
        "baseline_all_queues_have_it_ms": base["all_queues_have_it_ms_median"],
        "baseline_targets": base["targets"],
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-directed-"))
    info = broker_info_cached()
    result: dict[str, Any] = {
        "bench": "directed",
        "command": "python -m bench.directed " + " ".join(sys.argv[1:]),
        "config": {
            "targets": args.targets,
            "pullers": args.pullers,
            "pull_processes": args.pull_procs,
            "messages_per_target": args.messages,
            "pull_max": args.max,
            "body_bytes": args.body_bytes,
            "baseline_targets": args.baseline_targets,
            "repeats": args.repeats,
            "queue_types": args.queue_types,
            "phases": args.phases,
            "quick": args.quick,
            "worker": "python -m bridge.cli run directed (subprocess, uvloop, "
            f"synchronous={args.synchronous}, defaults otherwise)",
        },
        "environment": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "rabbitmq": info.get("version") if info else None,
            "loadavg_start": os.getloadavg(),
        },
    }
    try:
        if "fanout" in args.phases:
            progress(f"fan-out: 1 message to {args.targets} targets, {args.repeats} repeats")
            result["fanout"] = await bench_fanout(args, root)
        if "pull" in args.phases:
            progress(
                f"pull: {args.targets} targets, {args.pullers} pullers in {args.pull_procs} "
                f"processes, pull queues {args.queue_types}, each round next to an echo server"
            )
            result["pull"] = await bench_pulls(args, root)
        if "baseline" in args.phases:
            progress(f"baseline: {args.baseline_targets} quorum queues behind a fanout exchange")
            result["baseline"] = await bench_baseline(args)
        base = result.get("baseline", {})
        if "fanout" in result and "message_disk_bytes_per_target_min" in base:
            result["comparison"] = comparison(result["fanout"], base)
        result["goals"] = goals(result)
    finally:
        result["environment"]["loadavg_end"] = os.getloadavg()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            result["environment"]["state_dir"] = str(root)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.directed",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--targets", type=int, default=10_000, help="targets per request")
    parser.add_argument("--pullers", type=int, default=200, help="concurrent pullers in all")
    parser.add_argument("--pull-procs", type=int, default=2, help="client processes for pulls")
    parser.add_argument("--messages", type=int, default=10, help="messages per target to pull")
    parser.add_argument("--max", type=int, default=5, help="max of each pull")
    parser.add_argument("--body-bytes", type=int, default=1024)
    parser.add_argument("--baseline-targets", type=int, default=1000)
    parser.add_argument("--baseline-messages", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    parser.add_argument(
        "--queue-types", default="quorum,classic", help="pull queue types to measure"
    )
    parser.add_argument(
        "--phases", default="fanout,pull,baseline", help="which parts to run (default: all)"
    )
    parser.add_argument(
        "--synchronous",
        default="FULL",
        choices=["FULL", "NORMAL"],
        help="the worker's SQLite fsync policy (BRIDGE_DIRECTED__SYNCHRONOUS)",
    )
    parser.add_argument("--quick", action="store_true", help="small smoke run (< 30 s)")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the worker; adds top frames to the JSON"
    )
    parser.add_argument("--keep", action="store_true", help="keep the state directory")
    parser.add_argument(
        "--against",
        type=Path,
        default=None,
        help="also run the pull rounds with the worker of this checkout (e.g. a git worktree "
        "of the commit before a change), interleaved, and report the ratios",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.targets = min(args.targets, 500)
        args.pullers = min(args.pullers, 20)
        args.messages = min(args.messages, 4)
        args.max = min(args.max, 2)
        args.baseline_targets = min(args.baseline_targets, 30)
        args.baseline_messages = 1
        args.repeats = 1
    args.queue_types = [q for q in args.queue_types.split(",") if q]
    args.phases = [p for p in args.phases.split(",") if p]
    unknown = set(args.phases) - {"fanout", "pull", "baseline"}
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}: use fanout, pull, baseline")
    if args.targets < 2:
        parser.error("--targets must be at least 2")
    return args


def run() -> None:
    args = parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    emit(asyncio.run(main(args)))


if __name__ == "__main__":
    run()
