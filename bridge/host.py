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
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Gauge, Info, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from pydantic_settings import BaseSettings

from bridge import __version__
from bridge.amqp import Broker
from bridge.errors import ConfigError
from bridge.http import HttpEndpoint
from bridge.metrics import ScrapeCollector
from bridge.settings import HostSettings, load_settings, unknown_variables
from bridge.tls import server_context

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
    """A worker. Optionally its class names its settings (``settings_class``, a
    pydantic-settings class): the host then reads and validates them before anything starts,
    passes them to the constructor, and knows their variables (``check`` warns about misspelled
    ones). Optional too: ``listen_ports()`` (checked before the broker), ``describe()``
    (what the ``ready`` line says) and ``http_routes()`` (aiohttp route definitions served on
    the host's HTTP port beside the probes, from before the worker started: a handler answers
    503 itself until its worker is running)."""

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


def worker_classes(names: list[str]) -> list[Any]:
    """The classes of the named workers (``all``: every installed one), in that order."""
    found = available_workers()
    if not names or names == ["all"]:
        names = sorted(found)
    unknown = [n for n in names if n not in found]
    if unknown:
        raise ConfigError(
            f"unknown worker(s) {', '.join(unknown)}; installed: {', '.join(sorted(found)) or 'none'}"
        )
    return [found[name].load() for name in dict.fromkeys(names)]


def worker_settings(classes: list[Any]) -> list[BaseSettings | None]:
    """Each worker's settings (its optional ``settings_class``, read from the environment),
    all validated before any is used: a :class:`ConfigError` lists every problem of every
    worker, one line each, so ``check`` finds what ``run`` would stop on."""
    loaded: list[BaseSettings | None] = []
    problems: list[str] = []
    for cls in classes:
        settings_class = getattr(cls, "settings_class", None)
        if settings_class is None:
            loaded.append(None)
            continue
        try:
            loaded.append(load_settings(settings_class))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(*problems)
    return loaded


def settings_warnings() -> list[str]:
    """``BRIDGE_*`` variables that neither the host nor an installed worker reads."""
    classes: list[type[BaseSettings]] = [HostSettings]
    for ep in available_workers().values():
        settings_class = getattr(ep.load(), "settings_class", None)
        if settings_class is not None:
            classes.append(settings_class)
    return unknown_variables(classes)


def check_ports(settings: HostSettings, workers: list[Worker]) -> None:
    """Bind each port the process will listen on (the HTTP endpoint's and those a worker's
    optional ``listen_ports()`` names, as ``(variable, host, port)``) and let it go again,
    before anything connects to the broker: a port in use (or named twice) is one
    :class:`ConfigError` line each."""
    wanted: list[tuple[str, str, int]] = []
    if settings.http_port:
        wanted.append(("BRIDGE_HTTP_PORT", settings.http_host, settings.http_port))
    for worker in workers:
        listen_ports = getattr(worker, "listen_ports", None)
        if callable(listen_ports):
            wanted.extend(listen_ports())
    problems = []
    taken: dict[int, str] = {}
    for variable, host, port in wanted:
        if not port:
            continue  # any free port
        if port in taken:
            problems.append(f"{variable}={port}: the same port as {taken[port]}")
            continue
        taken[port] = variable
        try:
            with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
                # as asyncio's create_server binds: a port in TIME_WAIT is free
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
        except OSError as exc:
            problems.append(
                f"{variable}={port}: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                "stop what listens there or choose another port"
            )
    if problems:
        raise ConfigError(*problems)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def load_workers(names: list[str]) -> list[Worker]:
    """The named workers built with their validated settings; a :class:`ConfigError` lists
    every problem (settings, then what a constructor refuses, such as a missing shard index)."""
    classes = worker_classes(names)
    settings = worker_settings(classes)
    workers: list[Worker] = []
    problems: list[str] = []
    for cls, loaded in zip(classes, settings, strict=True):
        try:
            workers.append(cls() if loaded is None else cls(loaded))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(*problems)
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
            self.http = HttpEndpoint(
                registry=self.registry,
                ready=self.readiness,
                admin=self.admin,
                routes=self._worker_routes(),
                max_body_bytes=self.settings.http_max_body_bytes,
                keepalive_s=self.settings.http_keepalive_s,
                max_connections=self.settings.http_max_connections,
                tls=self._http_tls(),
            )
            try:
                await self.http.start(self.settings.http_host, self.settings.http_port)
            except OSError as exc:  # taken since check_ports
                raise ConfigError(
                    f"BRIDGE_HTTP_PORT={self.settings.http_port}: cannot listen on "
                    f"{self.settings.http_host}:{self.settings.http_port} ({exc.strerror or exc})"
                ) from exc
        try:
            await self.broker.connect(stop=self._stop)
            for worker in self.workers:
                await worker.start(self.ctx)
                self.started.append(worker)
                if worker.ready()[0]:
                    log.info("ready", extra={"worker": worker.name, **self._describe(worker)})
                else:  # e.g. another process owns its queues: it said why, /readyz says it too
                    log.info(
                        "started, not ready yet (see /readyz)",
                        extra={"worker": worker.name, **self._describe(worker)},
                    )
            await self._stop.wait()
        finally:
            await self.shutdown()

    def _http_tls(self) -> ssl.SSLContext | None:
        s = self.settings
        if s.http_tls_cert is None or s.http_tls_key is None:
            return None
        return server_context(
            s.http_tls_cert, s.http_tls_key, settings="BRIDGE_HTTP_TLS_CERT / BRIDGE_HTTP_TLS_KEY"
        )

    def _worker_routes(self) -> list[Any]:
        routes: list[Any] = []
        for worker in self.workers:
            http_routes = getattr(worker, "http_routes", None)
            if callable(http_routes):
                routes.extend(http_routes())
        return routes

    def _describe(self, worker: Worker) -> dict[str, Any]:
        """What a started worker listens on and consumes (its optional ``describe()``)."""
        out: dict[str, Any] = {}
        if self.http is not None:
            out["http"] = f"{self.settings.http_host}:{self.http.port}"
        describe = getattr(worker, "describe", None)
        if callable(describe):
            out.update(describe())
        return out

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

        # Concurrently: `rabbitmq-bridge run all` must drain within one grace period, not one per worker.
        await asyncio.gather(*(stop(w) for w in self.started))
        self.started.clear()
        await self.broker.close()
        if self.http is not None:
            await self.http.stop()
        log.info("stopped")
