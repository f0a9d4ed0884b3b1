"""The plugin host: the Worker protocol, entry-point discovery, lifecycle, signals, drain.

A worker is any class registered in the ``bridge.workers`` entry-point group that follows
:class:`Worker`. The host connects to the broker (retrying with a clear log line), starts
the HTTP endpoint, starts each worker, and on SIGTERM/SIGINT stops them within the drain
period: stop consuming, finish in-flight work, wait for confirms, close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Gauge, Info, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily

from bridge import __version__
from bridge.amqp import Broker
from bridge.errors import ConfigError
from bridge.http import HttpEndpoint
from bridge.metrics import ScrapeCollector
from bridge.settings import HostSettings

log = logging.getLogger("bridge.host")

ENTRY_POINT_GROUP = "bridge.workers"

# The *_created series double every counter on /metrics and no dashboard uses them.
disable_created_metrics()


@dataclass
class WorkerContext:
    """What the host gives a worker when it starts."""

    settings: HostSettings
    broker: Broker
    registry: CollectorRegistry
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def state_dir(self, worker: str) -> Path:
        path = Path(self.settings.state_dir) / worker
        path.mkdir(parents=True, exist_ok=True)
        return path


@runtime_checkable
class Worker(Protocol):
    name: str

    async def start(self, ctx: WorkerContext) -> None:
        """Declare topology, restore state, start consuming. Return once running."""

    async def stop(self, grace: float) -> None:
        """Stop consuming, finish in-flight work and outstanding confirms, release resources."""

    def ready(self) -> tuple[bool, str]:
        """(ready, reason) for /readyz."""
        ...

    def admin(self, view: str) -> Any:
        """A JSON-able read-only view for /admin/<worker>/<view>, or None if unknown."""


def available_workers() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_workers(names: list[str]) -> list[Worker]:
    found = available_workers()
    if not names or names == ["all"]:
        names = sorted(found)
    unknown = [n for n in names if n not in found]
    if unknown:
        raise ConfigError(
            f"unknown worker(s) {', '.join(unknown)}; installed: {', '.join(sorted(found)) or 'none'}"
        )
    workers: list[Worker] = []
    for name in dict.fromkeys(names):
        cls = found[name].load()
        workers.append(cls())
    return workers


class Host:
    def __init__(
        self, settings: HostSettings, workers: list[Worker], *, install_signals: bool = True
    ) -> None:
        self.settings = settings
        self.install_signals = install_signals
        self.workers = workers
        self.registry = CollectorRegistry()
        self.broker = Broker(settings)
        self.ctx = WorkerContext(settings=settings, broker=self.broker, registry=self.registry)
        self.http: HttpEndpoint | None = None
        self.started: list[Worker] = []
        self._stop = asyncio.Event()
        self._up = Gauge(
            "bridge_broker_connected",
            "1 while the broker connection is open",
            registry=self.registry,
        )
        self._up.set_function(lambda: 1.0 if self.broker.connected else 0.0)
        Info("bridge_build", "version of the running release", registry=self.registry).info(
            {"version": __version__}
        )
        self.registry.register(ScrapeCollector(self._ready_gauge))

    def worker_states(self) -> dict[str, tuple[bool, str]]:
        """Each worker's (ready, reason): "starting" until its start() returned."""
        started = {w.name for w in self.started}
        return {
            w.name: w.ready() if w.name in started else (False, "starting") for w in self.workers
        }

    def readiness(self) -> tuple[bool, dict[str, str]]:
        checks: dict[str, str] = {
            "broker": "connected" if self.broker.connected else "not connected"
        }
        ok = self.broker.connected
        for name, (w_ok, reason) in self.worker_states().items():
            checks[name] = reason
            ok = ok and w_ok
        return ok, checks

    def _ready_gauge(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "bridge_worker_ready",
            "1 while the worker is started and its own readiness check passes (the worker's "
            "entry in /readyz; the broker connection is bridge_broker_connected)",
            labels=["worker"],
        )
        for name, (ok, _) in self.worker_states().items():
            gauge.add_metric([name], 1.0 if ok else 0.0)
        yield gauge

    def admin(self, path: str) -> Any:
        name, _, view = path.partition("/")
        for worker in self.started:
            if worker.name == name:
                return worker.admin(view or "")
        if not name:
            return {"workers": [w.name for w in self.started]}
        return None

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        if self.install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self._signal, sig)
        if self.settings.http_port:
            self.http = HttpEndpoint(registry=self.registry, ready=self.readiness, admin=self.admin)
            await self.http.start(self.settings.http_host, self.settings.http_port)
        try:
            await self.broker.connect(stop=self._stop)
            for worker in self.workers:
                await worker.start(self.ctx)
                self.started.append(worker)
                log.info("worker started", extra={"worker": worker.name})
            await self._stop.wait()
        finally:
            await self.shutdown()

    def _signal(self, sig: signal.Signals) -> None:
        log.info(
            "signal received; draining",
            extra={"signal": sig.name, "grace_s": self.settings.drain_seconds},
        )
        self.ctx.stopping.set()
        self._stop.set()

    async def shutdown(self) -> None:
        self.ctx.stopping.set()
        grace = self.settings.drain_seconds

        async def stop(worker: Worker) -> None:
            try:
                await asyncio.wait_for(worker.stop(grace), grace + 1)
            except TimeoutError:
                log.error(
                    "worker did not drain within the grace period", extra={"worker": worker.name}
                )
            except Exception:
                log.exception("worker failed to stop cleanly", extra={"worker": worker.name})

        # Concurrently: `bridge run all` must drain within one grace period, not one per worker.
        await asyncio.gather(*(stop(w) for w in self.started))
        self.started.clear()
        await self.broker.close()
        if self.http is not None:
            await self.http.stop()
        log.info("stopped")
