"""Helpers shared by the benchmarks: the broker, a worker subprocess, process and broker probes.

Every benchmark prints one JSON object on stdout and its progress on stderr, runs against
``BRIDGE_AMQP_URL`` (else the local broker), and names its exchanges and queues uniquely so
that it can share a broker with tests and other benchmarks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"
_STARTED = time.monotonic()


def broker_url() -> str:
    return os.environ.get("BRIDGE_AMQP_URL") or os.environ.get("AMQP_URL") or LOCAL_URL


def unique(prefix: str = "bench") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def progress(*parts: Any) -> None:
    print(f"[{time.monotonic() - _STARTED:7.1f}s]", *parts, file=sys.stderr, flush=True)


def emit(doc: Any) -> None:
    """The one JSON object a benchmark prints on stdout."""
    json.dump(doc, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in 0..100."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Iterable[float]) -> float:
    items = list(values)
    return statistics.median(items) if items else float("nan")


def rnd(value: float, digits: int = 2) -> float:
    return round(value, digits)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- processes -------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def runqueue_wait_seconds(pid: int) -> float:
    """Time the process's main thread spent runnable but waiting for a CPU."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, to show how much else was running."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return float(sum(values) - idle), float(sum(values))


class CpuWatch:
    """CPU use of some processes and of the machine between start() and stop()."""

    def __init__(self, pids: dict[str, int], *, no_runqueue: tuple[str, ...] = ()) -> None:
        self.pids = pids
        # processes whose main thread is not where the work happens (an Erlang VM)
        self.no_runqueue = no_runqueue
        self._start: dict[str, float] = {}
        self._wait: dict[str, float] = {}
        self._machine = (0.0, 0.0)
        self._wall = 0.0

    def start(self) -> CpuWatch:
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._wait = {name: runqueue_wait_seconds(pid) for name, pid in self.pids.items()}
        self._machine = machine_cpu()
        self._wall = time.perf_counter()
        return self

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self._wall
        busy, total = machine_cpu()
        out: dict[str, Any] = {
            f"{name}_cores": rnd((cpu_seconds(pid) - self._start[name]) / wall)
            for name, pid in self.pids.items()
        }
        # A main thread (an event loop) that waits for a CPU much of the time is starved by
        # the other processes on the machine, not slow by itself.
        for name, pid in self.pids.items():
            if name in self.no_runqueue:
                continue
            waited = runqueue_wait_seconds(pid) - self._wait[name]
            out[f"{name}_main_thread_runqueue_wait_share"] = rnd(waited / wall)
        out["machine_busy_cores"] = rnd(
            (busy - self._machine[0]) / max(total - self._machine[1], 1) * (os.cpu_count() or 1)
        )
        return out


class WorkerProcess:
    """``python -m bridge.cli run <workers>`` as a subprocess (uvloop, its own CPU core)."""

    def __init__(
        self,
        workers: list[str],
        *,
        state_dir: Path,
        env: dict[str, str],
        tree: Path | None = None,
    ) -> None:
        """``tree``: run the code of another checkout (a git worktree of an earlier commit,
        for a side-by-side comparison in the same run) instead of this one's."""
        self.workers = workers
        self.tree = tree
        self.state_dir = state_dir
        self.port = free_port()
        self.log = state_dir / "worker.log"
        self.env = {
            **os.environ,
            "BRIDGE_AMQP_URL": broker_url(),
            "BRIDGE_STATE_DIR": str(state_dir),
            "BRIDGE_HTTP_PORT": str(self.port),
            "BRIDGE_HTTP_HOST": "127.0.0.1",
            "BRIDGE_LOG_FORMAT": "text",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            env = self.env
            if self.tree is not None:
                env = {**env, "PYTHONPATH": str(self.tree)}
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge.cli", "run", *self.workers],
                env=env,
                cwd=self.tree,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited: {self.log.read_text()[-2000:]}")
            try:
                if self.http("/readyz")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"worker not ready after {timeout}s: {self.log.read_text()[-2000:]}")

    def http(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.port}{path}", timeout=timeout
            ) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def metrics(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        """Samples of /metrics by name, keyed by their sorted labels."""
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        text = self.http("/metrics")[1].decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = tuple(sorted(sample.labels.items()))
                out.setdefault(sample.name, {})[key] = sample.value
        return out

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def histogram_delta(
    before: dict[str, dict[tuple[tuple[str, str], ...], float]],
    after: dict[str, dict[tuple[tuple[str, str], ...], float]],
    name: str,
) -> dict[str, Any]:
    """Count, sum and bucket counts of a (label-less) histogram between two scrapes."""

    def one(sample: str, scrape: dict[str, dict[tuple[tuple[str, str], ...], float]]) -> float:
        return sum(scrape.get(sample, {}).values())

    buckets: list[tuple[float, float]] = []
    for labels, value in after.get(f"{name}_bucket", {}).items():
        le = float(dict(labels)["le"])
        buckets.append((le, value - before.get(f"{name}_bucket", {}).get(labels, 0.0)))
    buckets.sort()
    return {
        "count": one(f"{name}_count", after) - one(f"{name}_count", before),
        "sum": one(f"{name}_sum", after) - one(f"{name}_sum", before),
        "buckets": buckets,
    }


def histogram_quantile(delta: dict[str, Any], q: float) -> float:
    """Prometheus-style quantile (linear within the bucket) from :func:`histogram_delta`."""
    count = delta["count"]
    if count <= 0:
        return float("nan")
    rank = q * count
    lower, below = 0.0, 0.0
    for le, cumulative in delta["buckets"]:
        if cumulative >= rank:
            if le == float("inf"):
                return lower
            inside = cumulative - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, cumulative
    return lower


# -- RabbitMQ --------------------------------------------------------------------------


def rabbitmqctl(*args: str, timeout: float = 60.0) -> str:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        raise RuntimeError("rabbitmqctl not found (broker-side figures need a local broker)")
    done = subprocess.run([ctl, *args], capture_output=True, text=True, timeout=timeout, check=True)
    return done.stdout


def broker_info() -> dict[str, Any]:
    """Pid, data directory and version of the local RabbitMQ node."""
    out = rabbitmqctl(
        "eval",
        'io:format("~s~n~s~n~s~n", [os:getpid(), rabbit_mnesia:dir(), rabbit:base_product_version()]).',
    )
    pid, data_dir, version = out.strip().splitlines()[:3]
    return {"pid": int(pid), "data_dir": data_dir, "version": version}


def broker_memory(pid: int, *, collect: bool = True) -> dict[str, int]:
    """Erlang-allocated memory of the node (after a full GC when ``collect``) and its RSS."""
    gc = "[erlang:garbage_collect(P) || P <- erlang:processes()], " if collect else ""
    out = rabbitmqctl(
        "eval",
        gc + 'io:format("~w~n", [[erlang:memory(K) || K <- [total, processes, ets, binary]]]).',
    )
    total, processes, ets, binary = (int(v) for v in re.findall(r"\d+", out.splitlines()[0]))
    return {
        "erlang_total": total,
        "processes": processes,
        "ets": ets,
        "binary": binary,
        "rss": rss_bytes(pid),
    }


def du_bytes(paths: Iterable[Path]) -> int:
    """Apparent size of the files under ``paths`` (like ``du -sb``)."""
    total = 0
    for root in paths:
        if root.is_file():
            total += root.stat().st_size
            continue
        for dirpath, _, files in os.walk(root):
            for name in files:
                try:
                    total += (Path(dirpath) / name).stat().st_size
                except FileNotFoundError:
                    pass
    return total


def disk_blocks_bytes(paths: Iterable[Path]) -> int:
    """Allocated size (blocks) of the files under ``paths`` (like ``du -s``)."""
    total = 0
    for root in paths:
        for dirpath, _, files in os.walk(root):
            for name in files:
                try:
                    total += (Path(dirpath) / name).stat().st_blocks * 512
                except FileNotFoundError:
                    pass
    return total


# -- profiles --------------------------------------------------------------------------


FLAGS = ("--nolineno", "--threads")


class Profiler:
    """``py-spy record`` of a process into collapsed stacks, summarised as top frames."""

    def __init__(self, pid: int, out: Path, *, rate: int = 200) -> None:
        self.out = out
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.proc = subprocess.Popen(
            [exe, "record", "-p", str(pid), "-o", str(out), "-f", "raw", "-r", str(rate), *FLAGS],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self, top: int = 15) -> dict[str, Any]:
        self.proc.send_signal(2)  # SIGINT: py-spy writes the file and exits
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return summarise_collapsed(self.out, top)


def summarise_collapsed(path: Path, top: int = 15) -> dict[str, Any]:
    """Top frames by self and by inclusive samples from a collapsed-stack file."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    if not path.exists():
        return {"samples": 0}
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short_frame(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count

    def ranked(table: dict[str, int]) -> list[tuple[str, float]]:
        best = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [(frame, rnd(100 * n / max(total, 1), 1)) for frame, n in best]

    return {
        "samples": total,
        "file": str(path),
        "top_self_pct": ranked(own),
        "top_inclusive_pct": ranked(inclusive),
    }


def _short_frame(frame: str) -> str:
    # "func (path/to/module.py:123)" -> "func (module.py:123)"
    match = re.match(r"(.*) \((.*?)(:\d+)?\)$", frame.strip())
    if not match:
        return frame.strip()
    name, path, line = match.groups()
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{name} ({short}{line or ''})"
