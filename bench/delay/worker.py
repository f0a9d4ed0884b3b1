"""The delay worker under test (``rabbitmq-bridge run delay`` as a subprocess with its own names and state
directory), and what the parts measure around it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.harness.broker import broker_info_cached, delete_names
from bench.harness.cpu import cpu_seconds, process_tree, pss_bytes, rss_bytes
from bench.harness.procs import WorkerProcess
from bench.harness.report import broker_url
from bench.harness.stats import percentile


def pct(values: Sequence[float], q: float) -> float | None:
    return round(percentile(values, q), 2) if values else None


def summary(values: Sequence[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_ms": pct(values, 50),
        "p99_ms": pct(values, 99),
        "max_ms": round(max(values), 2) if values else None,
    }


def now_ms() -> int:
    return int(time.time() * 1000)


def machine_load() -> float:
    return round(os.getloadavg()[0], 2)


NOISE_PROBE = """
import json, sys, time
late, end = [], time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    target = time.perf_counter() + 0.01
    time.sleep(0.01)
    late.append((time.perf_counter() - target) * 1000)
late.sort()
print(json.dumps({"n": len(late), "p50_ms": round(late[len(late) // 2], 2),
                  "p99_ms": round(late[int(len(late) * 0.99)], 2), "max_ms": round(late[-1], 2)}))
"""


class NoiseProbe:
    """How late a trivial process wakes from a 10 ms sleep, measured alongside a part: the
    machine's own scheduling noise (other processes compete for the same 2 cores)."""

    def __init__(self, seconds: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", NOISE_PROBE, str(seconds)], stdout=subprocess.PIPE
        )

    def result(self) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=600)
        return json.loads(out)


def cpu_pressure() -> float | None:
    """Share of time some runnable task waited for a CPU (PSI, last 60 s), percent."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return None
    return float(line.split()[2].split("=")[1])


async def delete_worker_names(worker: Worker, topics: Sequence[str]) -> None:
    """The worker's exchanges and queues and the target topics' (``<tag>.<topic>``, and
    its queue ``<tag>.<topic>.q``)."""
    n, tag = worker.names, worker.tag
    await delete_names(
        broker_url(),
        [
            *(f"{tag}.{t}" for t in topics),
            n["in_exchange"],
            n["dead_exchange"],
            n["control_exchange"],
        ],
        [*(f"{tag}.{t}.q" for t in topics), n["in_queue"], n["dead_queue"], n["control_queue"]],
    )


async def stored(worker: Worker, total: int, timeout: float) -> float:
    """Wait until the worker stored ``total`` messages; returns when (perf_counter)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.summary().get("stored", 0) >= total:
            return time.perf_counter()
        await asyncio.sleep(0.05)  # polling the worker costs it CPU; 50 ms is precise enough
    raise RuntimeError(f"worker stored {worker.summary().get('stored')} of {total}")


# ---------------------------------------------------------------------------- parts


def broker_pid() -> int | None:
    """The local RabbitMQ node's OS pid (for CPU accounting), or None if not local."""
    info = broker_info_cached()
    pid = info["pid"] if info else None
    return pid if pid is not None and Path(f"/proc/{pid}").exists() else None


class Worker:
    """``rabbitmq-bridge run delay`` as a subprocess with its own names and state directory."""

    def __init__(
        self,
        tag: str,
        state: Path,
        tree: Path | None = None,
        parts: Path | None = None,
        **settings: Any,
    ) -> None:
        """``tree``: run another checkout's code (a git worktree of an earlier commit);
        ``parts``: run it under :mod:`bench.delay.parts`, which writes the CPU time of its
        parts to that file when it stops (this checkout's code only)."""
        self.tag = tag
        self.state = state
        self.names = {
            "in_exchange": f"{tag}.in",
            "in_queue": f"{tag}.in",
            "dead_exchange": f"{tag}.dead",
            "dead_queue": f"{tag}.dead",
            "control_exchange": f"{tag}.control",
            "control_queue": f"{tag}.control",
        }
        env = {f"BRIDGE_DELAY__{k.upper()}": str(v) for k, v in {**self.names, **settings}.items()}
        env["BRIDGE_LOG_LEVEL"] = "WARNING"
        if parts is not None:
            assert tree is None, "parts are measured in this checkout only"
            env["BENCH_PARTS_OUT"] = str(parts)
        self.process = WorkerProcess(
            ["delay"],
            state_dir=state,
            env=env,
            tree=tree,
            module="bridge.cli" if parts is None else "bench.delay.parts",
        )
        self.ready_s: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self, timeout: float = 120.0) -> Worker:
        started = time.perf_counter()
        self.process.start().wait_ready(timeout, poll=0.02)
        self.ready_s = time.perf_counter() - started
        return self

    def summary(self) -> dict[str, Any]:
        return dict(json.loads(self.process.http("/admin/delay/summary")[1]))

    def lateness_from_histogram(self, topics: Iterable[str] | None = None) -> dict[str, Any]:
        """Upper bucket bounds of p50/p99 of the worker's lateness histogram (publish - due),
        of every topic or of ``topics`` only (their series: the first topics stored)."""
        samples = self.process.metrics().get("bridge_delay_lateness_seconds_bucket", {})
        only = None if topics is None else set(topics)
        by_le: dict[float, float] = {}  # one series per topic: added up per bucket
        for labels, value in samples.items():
            label = dict(labels)
            if only is not None and label.get("topic") not in only:
                continue
            le = float(label["le"])
            by_le[le] = by_le.get(le, 0.0) + value
        buckets = sorted(by_le.items())
        total = buckets[-1][1] if buckets else 0
        out: dict[str, Any] = {"n": int(total)}
        for q in (50, 99):
            bound = next((le for le, c in buckets if total and c >= total * q / 100), None)
            out[f"p{q}_ms_at_most"] = None if bound is None else round(bound * 1000, 2)
        return out

    def rss_mb(self) -> float:
        """RSS of the worker and its lane processes, added up (shared pages counted in each)."""
        return sum(rss_bytes(p) for p in process_tree(self.pid)) / 2**20

    def memory(self) -> dict[str, Any]:
        tree = process_tree(self.pid)
        return {
            "processes": len(tree),
            "worker_rss_mb": round(self.rss_mb(), 1),
            "main_process_rss_mb": round(rss_bytes(self.pid) / 2**20, 1),
            "worker_pss_mb": round(sum(pss_bytes(p) for p in tree) / 2**20, 1),
        }

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(p) for p in process_tree(self.pid))

    def stop(self) -> None:
        self.process.stop(60)
