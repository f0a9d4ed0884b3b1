"""CPU, memory and run-queue accounting of processes and of the machine, from /proc."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from bench.harness.stats import rnd

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


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a worker and its lane processes, if any)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages split between the processes sharing them."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
