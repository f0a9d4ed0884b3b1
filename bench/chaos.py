"""Fault suite: kill -9, broker link faults, broker restart and overload against real worker
processes, checked against ledgers kept by the suite's producers and consumers.

    python -m bench.chaos [--seed N] [--workers directed,delay,gateway] [--kills 20] [--quick]
                          [--skip broker_restart,...] [--overload-seconds 180]

Prints ONE JSON object on stdout (progress on stderr) and exits 1 if anything was lost or a
duplicate broke a worker's contract:

    {"seed": 123, "mode": "full", "ok": true, "elapsed_s": ...,
     "total":   {<counters summed over workers>},
     "workers": {"directed": {<counters>, "scenarios": {...}, "failures": [...]},
                 "delay": {"skipped": "no scenario module registered"}}}

Counters (every worker reports the same ones): ``sent`` (publishes attempted),
``acknowledged`` (publishes the broker confirmed), ``expected`` (deliveries the contract owes
for the acknowledged ones: a message times its destinations), ``delivered`` (distinct
deliveries seen), ``lost`` (expected but never seen; must be 0), ``duplicated`` ({"count",
"allowed", "violations", "reasons": {reason: n}}), ``kills`` (kill -9 sent), ``reconnects``
(times a worker watched with ``h.watch`` went not-ready and came back by itself, without a
restart), ``max_rss_bytes`` (largest RSS of any worker process).

Timings (when to kill, how long a stall lasts, which targets a message goes to) come from
``random.Random(f"{seed}:{worker}")``: the printed seed replays a run, and adding a worker
does not change another worker's draws.

Plugging in a worker (the interface other workers' engineers use)
------------------------------------------------------------------
1. Write ``bench/chaos_<worker>.py`` with::

       async def run(h: bench.chaos.Harness) -> None

   It drives its scenarios through ``h`` and records into ``h.ledger`` / ``h.scenario()``;
   an exception is reported as a failure of that worker, not a crash of the suite.
2. Add one line to :data:`SCENARIOS` below.

A worker whose suite already is its own command (``python -m bench.chaos_<worker> --seed N
[--quick] [--kills K] [--no-broker-restart]`` printing one JSON object with the counters
above, ``max_rss_mib`` accepted for ``max_rss_bytes``, and ``ok``) needs only the registry
line: a module whose ``run`` is not a coroutine function is run as a subprocess with the
same seed (and ``--overload-s``) and its summary is merged in.

What ``h`` (:class:`Harness`) offers:

- ``h.name``, ``h.seed``, ``h.rng``, ``h.quick``, ``h.kills`` (kills asked for),
  ``h.overload_seconds`` (how long an overload scenario floods: 180 s full, 10 s quick),
  ``h.broker_url``, ``h.workdir`` (a fresh directory), ``h.skip`` (scenario names to skip),
  ``h.progress(...)``, ``h.unique(prefix)`` (a name for exchanges and queues);
- ``h.process(workers, env=..., proxy=None, name=...)`` -> :class:`ChaosProcess`: ``python -m
  bridge.cli run <workers>`` with its own state directory, HTTP port and log file, through
  ``proxy`` if given; ``await p.start()``, ``p.kill9()``, ``await p.stop()``, ``p.pid``,
  ``await p.ready()``, ``p.log_count(text)``; RSS is sampled while it runs;
- ``await h.proxy()`` -> ``tests.proxy.TcpProxy`` to the broker (``cut()``, ``stall()`` /
  ``resume()``, ``latency``, ``accepting``), stopped at the end;
- ``await h.kill_loop(p, n, gap=(lo, hi))``: n kill -9 at drawn moments, each followed by a
  restart (some land during start-up), counted in ``kills``; returns per-kill figures;
  ``h.kill_times`` holds the wall-clock time (``time.time()``) of every kill;
- ``h.watch(p)`` -> :class:`Readiness`: /readyz polled every 100 ms (``went_down``,
  ``came_back``, ``not_ready_s``, ``transitions``); its recoveries are the ``reconnects``;
- ``await h.broker_restart(down_s)``: ``rabbitmqctl stop_app`` / ``start_app`` (the only place
  the suite restarts the broker; tests never do, since they share it);
- ``h.ledger`` (:class:`Ledger`): ``sent(key)``, ``acknowledged(key, destinations)``,
  ``delivered(key, destination, allowed_reason=None)``; duplicates are counted as allowed
  only when the caller names the contract clause that allows them;
- ``h.scenario(name)`` -> dict for that scenario's figures; ``h.fail(text)`` records a failure;
- ``h.on_cleanup(async_fn)``: run at the end even after an error (delete queues...).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.common import broker_url, emit, free_port, progress, rss_bytes

# One line per worker: the module whose ``run(h)`` drives that worker's fault scenarios.
SCENARIOS: dict[str, str] = {
    "directed": "bench.chaos_directed",
    "gateway": "bench.chaos_gateway",
    "delay": "bench.chaos_delay",
}

ALL_WORKERS = ("directed", "delay", "gateway")


class Ledger:
    """What producers had confirmed and what consumers saw, keyed by message id."""

    def __init__(self) -> None:
        self.sent_keys: set[str] = set()
        self.expected: dict[str, tuple[str, ...]] = {}
        self.seen: dict[tuple[str, str], int] = {}
        self.duplicates: Counter[str] = Counter()
        self.allowed = 0
        self.violations = 0
        self.violation_examples: list[str] = []

    def sent(self, key: str) -> None:
        self.sent_keys.add(key)

    def acknowledged(self, key: str, destinations: list[str] | tuple[str, ...]) -> None:
        self.sent_keys.add(key)
        self.expected[key] = tuple(destinations)

    def delivered(self, key: str, destination: str, allowed_reason: str | None = None) -> bool:
        """Record one delivery; True if it is the first of ``key`` at ``destination``.

        A repeat counts as allowed only with ``allowed_reason`` (the contract clause that
        permits it); otherwise it is a violation.
        """
        pair = (key, destination)
        count = self.seen.get(pair, 0)
        self.seen[pair] = count + 1
        if count == 0:
            return True
        if allowed_reason:
            self.allowed += 1
            self.duplicates[allowed_reason] += 1
        else:
            self.violations += 1
            self.duplicates["violation: delivered again outside the contract"] += 1
            if len(self.violation_examples) < 10:
                self.violation_examples.append(f"{key} at {destination}")
        return False

    def missing(self) -> list[tuple[str, str]]:
        return [
            (key, d)
            for key, dests in self.expected.items()
            for d in dests
            if (key, d) not in self.seen
        ]

    def has(self, key: str, destination: str) -> bool:
        return (key, destination) in self.seen

    def counters(self) -> dict[str, Any]:
        expected = sum(len(d) for d in self.expected.values())
        delivered = sum(
            1 for key, dests in self.expected.items() for d in dests if (key, d) in self.seen
        )
        return {
            "sent": len(self.sent_keys),
            "acknowledged": len(self.expected),
            "expected": expected,
            "delivered": delivered,
            "lost": expected - delivered,
            "duplicated": {
                "count": self.allowed + self.violations,
                "allowed": self.allowed,
                "violations": self.violations,
                "reasons": dict(self.duplicates),
            },
        }


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
    """``python -m bridge.cli run <workers>`` that can be killed and restarted."""

    def __init__(self, workers: list[str], *, env: dict[str, str], workdir: Path, name: str):
        self.workers = workers
        self.name = name
        self.port = free_port()
        self.state = workdir / f"{name}.state"
        self.state.mkdir(parents=True, exist_ok=True)
        self.log = workdir / f"{name}.log"
        self.env = {
            **os.environ,
            "BRIDGE_STATE_DIR": str(self.state),
            "BRIDGE_HTTP_PORT": str(self.port),
            "BRIDGE_HTTP_HOST": "127.0.0.1",
            "BRIDGE_LOG_FORMAT": "text",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.max_rss = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def launch(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge.cli", "run", *self.workers],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1

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
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            if await self.ready():
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(
            f"{self.name} not ready after {timeout}s: {self.log.read_text()[-2000:]}"
        )

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    async def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def sample_rss(self) -> None:
        if self.alive:
            with contextlib.suppress(OSError, ValueError):
                self.max_rss = max(self.max_rss, rss_bytes(self.pid))

    def log_count(self, text: str) -> int:
        try:
            return self.log.read_text(errors="replace").count(text)
        except OSError:
            return 0


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
        from tests.proxy import TcpProxy

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
        ctl = shutil.which("rabbitmqctl")
        host = urlsplit(self.broker_url).hostname
        if ctl is None or host not in ("localhost", "127.0.0.1", "::1"):
            raise RuntimeError("broker restart needs a local broker and rabbitmqctl")

        def ctl_run(*args: str) -> None:
            subprocess.run([ctl, *args], check=True, capture_output=True, timeout=120)

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

COUNTERS = ("sent", "acknowledged", "expected", "delivered", "lost", "kills", "reconnects")


def total(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ran = [r for r in reports.values() if "skipped" not in r]
    out: dict[str, Any] = {c: sum(r.get(c, 0) for r in ran) for c in COUNTERS}
    reasons: Counter[str] = Counter()
    for r in ran:
        reasons.update(r["duplicated"]["reasons"])
    out["duplicated"] = {
        "count": sum(r["duplicated"].get("count", 0) for r in ran),
        "allowed": sum(r["duplicated"].get("allowed", 0) for r in ran),
        "violations": sum(r["duplicated"].get("violations", 0) for r in ran),
        "reasons": dict(reasons),
    }
    out["max_rss_bytes"] = max((r["max_rss_bytes"] for r in ran), default=0)
    out["workers_run"] = len(ran)
    return out


async def run_worker(name: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    module_name = SCENARIOS.get(name)
    if module_name is None:
        return {"skipped": "no scenario module registered in bench/chaos.py SCENARIOS"}
    module = importlib.import_module(module_name)
    if not inspect.iscoroutinefunction(getattr(module, "run", None)):
        return await run_standalone(module_name, args)
    h = Harness(name, args, root)
    started = time.monotonic()
    try:
        await module.run(h)
    except Exception as exc:
        h.fail(f"scenario crashed: {type(exc).__name__}: {exc}")
        traceback.print_exc(file=sys.stderr)
    finally:
        await h.close()
    return h.report(time.monotonic() - started)


async def run_standalone(module_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run a worker's own suite command with this run's seed and merge its summary."""
    cmd = [sys.executable, "-m", module_name, "--seed", str(args.seed), "--kills", str(args.kills)]
    if args.quick:
        cmd.append("--quick")
    if "broker_restart" in args.skip:
        cmd.append("--no-broker-restart")
    cmd += ["--overload-s", str(args.overload_seconds)]
    progress("running", " ".join(cmd[1:]))
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    try:
        report: dict[str, Any] = json.loads(out)
    except ValueError:
        return {**empty_report(), "ok": False, "failures": [f"{module_name}: no JSON summary"]}
    if "max_rss_bytes" not in report:
        report["max_rss_bytes"] = int(report.get("max_rss_mib", 0) * 2**20)
    report.setdefault("failures", [] if report.get("ok") else ["see the worker's scenarios"])
    report["command"] = " ".join(["python", *cmd[1:]])
    return {**empty_report(), **report}


def empty_report() -> dict[str, Any]:
    dup = {"count": 0, "allowed": 0, "violations": 0, "reasons": {}}
    return {**dict.fromkeys(COUNTERS, 0), "duplicated": dup, "max_rss_bytes": 0}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bridge-chaos-"))
    started = time.monotonic()
    reports: dict[str, dict[str, Any]] = {}
    for name in args.workers:
        progress(f"== {name}")
        reports[name] = await run_worker(name, args, root)
    ok = all(r.get("ok", True) for r in reports.values())
    if ok and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "seed": args.seed,
        "mode": "quick" if args.quick else "full",
        "ok": ok,
        "elapsed_s": round(time.monotonic() - started, 1),
        "broker": urlsplit(broker_url()).hostname,
        "workdir": None if ok and not args.keep else str(root),
        "total": total(reports),
        "workers": reports,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: random)")
    parser.add_argument("--workers", default=",".join(ALL_WORKERS), help="comma-separated")
    parser.add_argument("--kills", type=int, default=None, help="kill -9 per worker (20; 8 quick)")
    parser.add_argument("--quick", action="store_true", help="shorter phases, fewer kills")
    parser.add_argument("--skip", default="", help="scenario names to skip, comma-separated")
    parser.add_argument("--keep", action="store_true", help="keep logs and state directories")
    parser.add_argument(
        "--overload-seconds",
        type=float,
        default=None,
        help="how long each overload scenario floods the worker (180; 10 quick)",
    )
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 31)
    if args.kills is None:
        args.kills = 8 if args.quick else 20
    if args.overload_seconds is None:
        args.overload_seconds = 10.0 if args.quick else 180.0
    args.workers = [w for w in args.workers.split(",") if w]
    unknown = [w for w in args.workers if w not in ALL_WORKERS and w not in SCENARIOS]
    if unknown:
        parser.error(f"unknown worker(s): {', '.join(unknown)}")
    args.skip = [s for s in args.skip.split(",") if s]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The suite's own clients reconnect on purpose; their libraries' tracebacks would bury
    # the progress lines. The workers' logs are in their log files.
    logging.basicConfig(level=logging.ERROR)
    for noisy in ("aiormq", "aio_pika"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    progress(f"seed {args.seed} ({'quick' if args.quick else 'full'})")
    summary = asyncio.run(main_async(args))
    emit(summary)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
