"""What a worker's scenario module gets (:class:`Harness`), and the processes it drives."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.chaos.ledger import Ledger
from bench.harness.broker import rabbitmqctl, require_same_node
from bench.harness.cpu import rss_bytes
from bench.harness.procs import WorkerProcess
from bench.harness.report import broker_url, progress


async def run_scenarios(
    h: Harness, scenarios: dict[str, Callable[[Harness], Awaitable[None]]]
) -> None:
    """Run a worker's scenarios in order: skipped ones marked, a failing one reported as a
    failure of that worker (the others still run), each one's duration recorded."""
    for name, scenario in scenarios.items():
        if name in h.skip:
            h.scenario(name)["skipped"] = "--skip"
            continue
        h.progress(f"scenario {name}")
        started = time.monotonic()
        try:
            await scenario(h)
        except Exception as exc:
            h.fail(f"{name}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
        h.scenario(name)["elapsed_s"] = round(time.monotonic() - started, 1)


async def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """A GET to the worker's HTTP endpoint; (0, b"") when nothing answers."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, TimeoutError):
        return 0, b""
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), timeout)
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), body
    except (OSError, TimeoutError, IndexError, ValueError):
        return 0, b""
    finally:
        writer.close()


class ChaosProcess:
    """A :class:`~bench.harness.procs.WorkerProcess` that the suite kills and restarts, awaited
    without blocking the event loop, its RSS sampled while it runs."""

    def __init__(self, workers: list[str], *, env: dict[str, str], workdir: Path, name: str):
        self.name = name
        self.worker = WorkerProcess(
            workers, state_dir=workdir / f"{name}.state", env=env, log=workdir / f"{name}.log"
        )
        self.worker.state_dir.mkdir(parents=True, exist_ok=True)
        self.max_rss = 0

    @property
    def port(self) -> int:
        return self.worker.port

    @property
    def log(self) -> Path:
        return self.worker.log

    @property
    def pid(self) -> int:
        return self.worker.pid

    @property
    def alive(self) -> bool:
        return self.worker.alive

    @property
    def starts(self) -> int:
        return self.worker.starts

    def launch(self) -> None:
        self.worker.start()

    async def start(self, timeout: float = 60.0) -> float:
        """Launch and wait for /readyz; returns the seconds it took."""
        started = time.monotonic()
        self.launch()
        await self.wait_ready(timeout)
        return time.monotonic() - started

    async def ready(self) -> bool:
        return (await http_get(self.port, "/readyz", 1.0))[0] == 200

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"{self.name} exited: {self.worker.log_tail(2000)}")
            if await self.ready():
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout}s: {self.worker.log_tail(2000)}")

    def kill9(self) -> None:
        self.worker.kill9()

    async def stop(self, timeout: float = 30.0) -> int | None:
        return await asyncio.to_thread(self.worker.stop, timeout)

    def sample_rss(self) -> None:
        if self.alive:
            with contextlib.suppress(OSError, ValueError):
                self.max_rss = max(self.max_rss, rss_bytes(self.pid))

    def log_count(self, text: str) -> int:
        return self.worker.log_count(text)


@dataclass
class Readiness:
    """/readyz of one process, polled every 100 ms until :meth:`stop`."""

    proc: ChaosProcess
    transitions: list[tuple[float, bool]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def start(self) -> Readiness:
        self._task = asyncio.get_running_loop().create_task(self._poll())
        return self

    async def _poll(self) -> None:
        t0 = time.monotonic()
        last: bool | None = None
        while True:
            now = await self.proc.ready()
            if now != last:
                self.transitions.append((round(time.monotonic() - t0, 2), now))
                last = now
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def went_down(self) -> bool:
        return any(not up for _, up in self.transitions[1:])

    @property
    def came_back(self) -> bool:
        return bool(self.transitions) and self.transitions[-1][1]

    @property
    def not_ready_s(self) -> float:
        total, down_at = 0.0, None
        for t, up in self.transitions:
            if not up and down_at is None:
                down_at = t
            elif up and down_at is not None:
                total, down_at = total + t - down_at, None
        return round(total, 2)

    @property
    def recoveries(self) -> int:
        """Times it went not-ready and came back (in one process: not a restart)."""
        pairs = zip(self.transitions, self.transitions[1:], strict=False)
        return sum(1 for a, b in pairs if b[1] and not a[1])

    def since(self, index: int) -> list[tuple[float, bool]]:
        return self.transitions[index:]


class Harness:
    """What a worker's scenario module gets (see the module docstring)."""

    def __init__(self, name: str, args: argparse.Namespace, root: Path) -> None:
        self.name = name
        self.seed: int = args.seed
        self.rng = random.Random(f"{args.seed}:{name}")
        self.quick: bool = args.quick
        self.kills: int = args.kills
        self.overload_seconds: float = args.overload_seconds
        self.skip: set[str] = set(args.skip)
        self.broker_url = broker_url()
        self.workdir = root / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger()
        self.kills_done = 0
        self.kill_times: list[float] = []
        self.processes: list[ChaosProcess] = []
        self.scenarios: dict[str, dict[str, Any]] = {}
        self.failures: list[str] = []
        self._proxies: list[Any] = []
        self._cleanups: list[Callable[[], Awaitable[Any]]] = []
        self._sampler: asyncio.Task[None] | None = None
        self._watches: list[Readiness] = []

    def progress(self, *parts: Any) -> None:
        progress(f"[{self.name}]", *parts)

    def unique(self, prefix: str = "chaos") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:8]}"

    def scenario(self, name: str) -> dict[str, Any]:
        return self.scenarios.setdefault(name, {})

    def fail(self, text: str) -> None:
        self.progress("FAIL", text)
        self.failures.append(text)

    def check(self, condition: bool, text: str) -> bool:
        if not condition:
            self.fail(text)
        return condition

    def on_cleanup(self, fn: Callable[[], Awaitable[Any]]) -> None:
        self._cleanups.append(fn)

    def process(
        self,
        workers: list[str],
        *,
        env: dict[str, str] | None = None,
        proxy: Any = None,
        name: str | None = None,
    ) -> ChaosProcess:
        env = dict(env or {})
        env["BRIDGE_AMQP_URL"] = self.proxied_url(proxy) if proxy is not None else self.broker_url
        proc = ChaosProcess(
            workers,
            env=env,
            workdir=self.workdir,
            name=name or f"{'-'.join(workers)}-{len(self.processes)}",
        )
        self.processes.append(proc)
        if self._sampler is None:
            self._sampler = asyncio.get_running_loop().create_task(self._sample())
        return proc

    def proxied_url(self, proxy: Any) -> str:
        parts = urlsplit(self.broker_url)
        return proxy.url(parts.username or "guest", parts.password or "guest")

    async def proxy(self) -> Any:
        from bench.harness.proxy import TcpProxy

        parts = urlsplit(self.broker_url)
        proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
        self._proxies.append(proxy)
        return proxy

    def watch(self, proc: ChaosProcess) -> Readiness:
        watch = Readiness(proc).start()
        self._watches.append(watch)
        return watch

    async def _sample(self) -> None:
        while True:
            for proc in self.processes:
                proc.sample_rss()
            await asyncio.sleep(0.2)

    async def kill_loop(
        self,
        proc: ChaosProcess,
        kills: int,
        *,
        gap: tuple[float, float] = (0.5, 2.0),
        during_startup: float = 0.25,
        stop: asyncio.Event | None = None,
    ) -> list[dict[str, Any]]:
        """``kills`` kill -9 of ``proc``, each after a drawn pause once ready (or, with
        probability ``during_startup``, while it is still starting), then a restart."""
        records: list[dict[str, Any]] = []
        launched_at: float | None = None
        for _ in range(kills):
            if stop is not None and stop.is_set():
                break
            if launched_at is not None and self.rng.random() < during_startup:
                pause, phase = self.rng.uniform(0.05, 0.6), "startup"
            else:
                await proc.wait_ready()
                if launched_at is not None:
                    records[-1]["ready_s"] = round(time.monotonic() - launched_at, 2)
                pause, phase = self.rng.uniform(*gap), "running"
            await asyncio.sleep(pause)
            proc.kill9()
            self.kill_times.append(time.time())
            self.kills_done += 1
            down = self.rng.uniform(0.0, 0.3)
            await asyncio.sleep(down)
            launched_at = time.monotonic()
            proc.launch()
            records.append({"phase": phase, "after_s": round(pause, 2), "down_s": round(down, 2)})
        await proc.wait_ready()
        if records and launched_at is not None:
            records[-1].setdefault("ready_s", round(time.monotonic() - launched_at, 2))
        return records

    async def broker_restart(self, down_s: float) -> dict[str, Any]:
        """``rabbitmqctl stop_app``, ``down_s`` seconds, ``start_app``; waits for AMQP."""
        host = urlsplit(self.broker_url).hostname
        if host not in ("localhost", "127.0.0.1", "::1"):
            raise RuntimeError("broker restart needs a local broker and rabbitmqctl")
        # the CLI of the broker under test (TEST_BROKER_RABBITMQCTL), never another node's
        await asyncio.to_thread(require_same_node, self.broker_url)

        def ctl_run(*args: str) -> None:
            rabbitmqctl(*args, timeout=120)

        t0 = time.monotonic()
        await asyncio.to_thread(ctl_run, "stop_app")
        stopped = time.monotonic() - t0
        await asyncio.sleep(down_s)
        t1 = time.monotonic()
        await asyncio.to_thread(ctl_run, "start_app")
        await asyncio.to_thread(ctl_run, "await_startup")
        return {
            "stop_app_s": round(stopped, 2),
            "down_s": round(down_s, 2),
            "start_app_s": round(time.monotonic() - t1, 2),
        }

    async def close(self) -> None:
        for fn in reversed(self._cleanups):
            try:
                await fn()
            except Exception as exc:
                self.progress("cleanup failed:", exc)
        for proc in self.processes:
            proc.sample_rss()
            with contextlib.suppress(Exception):
                await proc.stop()
        for proxy in self._proxies:
            with contextlib.suppress(Exception):
                await proxy.stop()
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler

    def report(self, elapsed: float) -> dict[str, Any]:
        out = self.ledger.counters()
        if self.ledger.violation_examples:
            out["duplicated"]["examples"] = self.ledger.violation_examples
        if out["lost"]:
            out["lost_examples"] = [f"{k} at {d}" for k, d in self.ledger.missing()[:10]]
        out["kills"] = self.kills_done
        # Not-ready periods a watched worker came back from without a restart.
        out["reconnects"] = sum(w.recoveries for w in self._watches)
        out["max_rss_bytes"] = max((p.max_rss for p in self.processes), default=0)
        out["worker_log"] = {
            name: sum(p.log_count(marker) for p in self.processes)
            for name, marker in LOG_MARKERS.items()
        }
        out["elapsed_s"] = round(elapsed, 1)
        out["scenarios"] = self.scenarios
        out["failures"] = self.failures
        out["ok"] = not self.failures and out["lost"] == 0 and out["duplicated"]["violations"] == 0
        return out


# Lines in the workers' logs worth a look even when nothing was lost.
LOG_MARKERS = {
    "handler_failed": "handler failed",
    "channel_errors": "PRECONDITION_FAILED",
    "frames_for_closed_channels": "Got frame for closed channel",
    "tracebacks": "Traceback",
}
