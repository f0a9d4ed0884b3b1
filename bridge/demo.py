"""``rabbitmq-bridge demo``: every installed worker's part of the tour in this process, each
flow driven end to end against the configured broker, then a summary table; nothing is left
behind.

The parts come from the entry-point group ``bridge.demo`` (the bundled workers register
theirs in ``workers/<name>/demo.py``; a third-party worker can add its own): each is built
with the run's name prefix and brings its worker, configured with names under that prefix,
the exchanges and queues it will touch, and its flow. The demo refuses to start if any of
those names exists already, and deletes exactly those afterwards, also after a failure,
Ctrl-C or SIGTERM. Worker state lives in a temporary directory that is removed at the end;
the HTTP endpoint is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

import aio_pika
import aio_pika.exceptions
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from bridge.errors import BridgeError
from bridge.host import Host
from bridge.settings import HostSettings, redact_url

PREFIX_RE = re.compile(r"^demo[A-Za-z0-9_-]{0,40}$")

FLOW_TIMEOUT_S = 25.0
READY_TIMEOUT_S = 30.0
DEMO_GROUP = "bridge.demo"


class DemoPart(Protocol):
    """One worker's part of the tour (see the module)."""

    flow: str  # the name in the progress lines and the summary table
    order: int  # parts run in this order
    worker: Any  # the worker (bridge.host.Worker) the part runs, named under the prefix

    def names(self) -> list[tuple[str, str]]:
        """Every ("exchange" | "queue", name) the worker and the flow will declare."""
        ...

    async def run(self, tour: Tour, result: FlowResult) -> None:
        """The flow; fills ``result`` (``ok`` only at the end), raises on a failure."""
        ...


@dataclass(frozen=True)
class DemoNames:
    """The parts of one run and every name they touch."""

    prefix: str
    parts: tuple[DemoPart, ...]

    def part(self, flow: str) -> Any:
        return next(p for p in self.parts if p.flow == flow)

    def all(self) -> list[tuple[str, str]]:
        return [kn for part in self.parts for kn in part.names()]

    def exchanges(self) -> list[str]:
        return [name for kind, name in self.all() if kind == "exchange"]

    def queues(self) -> list[str]:
        return [name for kind, name in self.all() if kind == "queue"]


def new_prefix() -> str:
    return "demo-" + uuid.uuid4().hex[:8]


def demo_names(prefix: str) -> DemoNames:
    """The installed workers' parts, built with ``prefix``. Each part sets the fields its
    flow depends on explicitly, so that BRIDGE_<WORKER>__* variables meant for a real
    deployment (gateway tokens, a TLS-only listener, ...) cannot break the demo."""
    if not PREFIX_RE.match(prefix):
        raise BridgeError(
            f"demo prefix {prefix!r} must start with 'demo' and use only letters, digits, - and _"
        )
    parts = [ep.load()(prefix) for ep in entry_points(group=DEMO_GROUP)]
    return DemoNames(prefix, tuple(sorted(parts, key=lambda p: (p.order, p.flow))))


# -- output ------------------------------------------------------------------------------


@dataclass
class FlowResult:
    flow: str
    what: str = ""
    figures: str = ""
    ok: bool = False
    error: str | None = None


class Progress:
    """Progress lines on stdout, each with the seconds since the demo started."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, flow: str, text: str) -> None:
        print(f"[{time.monotonic() - self.started:5.1f}s] {flow:<8} {text}", flush=True)


def summary_table(results: list[FlowResult]) -> str:
    rows = [("flow", "what happened", "figures", "result")]
    for r in results:
        figures = r.figures if r.error is None else f"{r.figures} {r.error[:80]}".strip()
        rows.append((r.flow, r.what, figures, "OK" if r.ok else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


# -- the flows ---------------------------------------------------------------------------


@dataclass
class Tour:
    """What every flow shares: a connection of the demo's own, progress lines, and what
    to undo at the end (clients, consumers), last first."""

    connection: AbstractRobustConnection
    url: str
    say: Progress
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


# -- broker housekeeping -----------------------------------------------------------------


async def _each_name(
    url: str,
    names: list[tuple[str, str]],
    op: Callable[[AbstractChannel, str, str], Awaitable[None]],
) -> list[str]:
    """Run ``op(channel, kind, name)`` for each name on a channel of its own (a failed
    declare or delete closes its channel); return the failures other than "not found"."""
    problems: list[str] = []
    conn = await aio_pika.connect(url, timeout=10)
    try:
        for kind, name in names:
            channel = await conn.channel()
            try:
                await op(channel, kind, name)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                pass
            except Exception as exc:
                problems.append(f"{kind} {name} ({type(exc).__name__})")
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()
    finally:
        await conn.close()
    return problems


async def _probe(channel: AbstractChannel, kind: str, name: str) -> None:
    if kind == "exchange":
        await channel.declare_exchange(name, passive=True)
    else:
        await channel.declare_queue(name, passive=True)
    raise FileExistsError  # found (a queue exclusive to another connection raises 405)


async def _delete(channel: AbstractChannel, kind: str, name: str) -> None:
    if kind == "exchange":
        await channel.exchange_delete(name)
    else:
        await channel.queue_delete(name)


async def existing_names(url: str, names: DemoNames) -> list[str]:
    """The demo's names that exist in the broker."""
    return await _each_name(url, names.all(), _probe)


async def delete_names(url: str, names: DemoNames) -> list[str]:
    """Delete every demo queue, then every exchange; return what could not be deleted."""
    return await _each_name(url, sorted(names.all(), key=lambda kn: kn[0] != "queue"), _delete)


# -- the run -----------------------------------------------------------------------------


async def _wait_ready(host: Host, task: asyncio.Task[None]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not host.readiness()[0]:
        if task.done():
            task.result()
            raise BridgeError("the workers stopped while starting")
        if time.monotonic() > deadline:
            raise BridgeError(
                f"workers not ready after {READY_TIMEOUT_S:.0f} s: {host.readiness()[1]}"
            )
        await asyncio.sleep(0.05)


async def run(settings: HostSettings, prefix: str, say: Progress) -> tuple[list[FlowResult], bool]:
    """Run every flow; return the results and whether the broker was left clean."""
    names = demo_names(prefix)
    url = settings.amqp_url
    in_use = await existing_names(url, names)
    if in_use:
        raise BridgeError(
            f"{len(in_use)} demo names already exist ({in_use[0]}, ...); "
            "run again with another --prefix (nothing was changed)"
        )
    results = [FlowResult(part.flow) for part in names.parts]
    host = Host(settings, [part.worker for part in names.parts], install_signals=False)
    host_task: asyncio.Task[None] | None = None
    connection: AbstractRobustConnection | None = None
    cleanups: list[Callable[[], Awaitable[None]]] = []
    try:
        flows = ", ".join(part.flow for part in names.parts)
        say("demo", f"starting the workers in this process: {flows}")
        started = time.monotonic()
        host_task = asyncio.get_running_loop().create_task(host.run(), name="demo-host")
        await _wait_ready(host, host_task)
        say("demo", f"workers ready in {time.monotonic() - started:.1f} s")
        connection = await aio_pika.connect_robust(url, timeout=10)
        tour = Tour(connection, url, say, cleanups)
        for part, result in zip(names.parts, results, strict=True):
            flow = part.flow
            print(flush=True)
            try:
                await asyncio.wait_for(part.run(tour, result), FLOW_TIMEOUT_S)
            except TimeoutError:
                result.error = f"timed out after {FLOW_TIMEOUT_S:.0f} s"
                say(flow, f"FAILED: {result.error}")
            except Exception as exc:  # a failed flow is reported; the others still run
                result.error = f"{type(exc).__name__}: {exc}"[:200]
                say(flow, f"FAILED: {result.error}")
    finally:
        print(flush=True)
        say("demo", "stopping the workers and deleting every demo exchange and queue")
        for cleanup in reversed(cleanups):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(cleanup(), 10)
        if host_task is not None:
            host.request_stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(host_task, settings.drain_seconds * 3 + 5)
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()
        clean = await _cleanup_broker(url, names, say)
    return results, clean


async def _cleanup_broker(url: str, names: DemoNames, say: Progress) -> bool:
    try:
        problems = await delete_names(url, names)
        problems += await existing_names(url, names)
    except Exception as exc:
        problems = [f"{type(exc).__name__}: {exc}"]
    if problems:
        say("demo", f"cleanup incomplete: {'; '.join(problems)}")
        say("demo", f"delete the exchanges and queues named {names.prefix}.* by hand")
        return False
    total = len(names.exchanges()) + len(names.queues())
    say("demo", f"cleanup: the {total} demo exchanges and queues are gone from the broker")
    return True


def run_demo(base: HostSettings, prefix: str | None = None, *, verbose: bool = False) -> int:
    """The ``rabbitmq-bridge demo`` command: 0 only if every flow succeeded and the broker is clean."""
    from bridge.amqp import connect_once
    from bridge.logs import setup_logging

    setup_logging(base.log_level if verbose else "WARNING", "text")
    prefix = prefix or new_prefix()
    demo_names(prefix)  # check the prefix before anything is created
    say = Progress()
    state = Path(tempfile.mkdtemp(prefix="bridge-demo-"))
    try:
        settings = base.model_copy(
            update={"state_dir": state, "http_port": 0, "drain_seconds": 5.0}
        )
        print(
            f"rabbitmq-bridge demo against {redact_url(settings.amqp_url)}: names {prefix}.*, "
            f"state in {state}",
            flush=True,
        )

        async def main() -> tuple[list[FlowResult], bool]:
            task = asyncio.current_task()
            assert task is not None
            with contextlib.suppress(NotImplementedError, RuntimeError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
            conn = await connect_once(settings.amqp_url, timeout=5)  # fail fast, clearly
            await conn.close()
            return await run(settings, prefix, say)

        results, clean = asyncio.run(main())
    except KeyboardInterrupt:
        print("rabbitmq-bridge demo: interrupted; cleaned up", file=sys.stderr)
        return 130
    except asyncio.CancelledError:  # SIGTERM
        print("rabbitmq-bridge demo: terminated; cleaned up", file=sys.stderr)
        return 143
    finally:
        shutil.rmtree(state, ignore_errors=True)
    print(flush=True)
    print(summary_table(results), flush=True)
    ok = all(r.ok for r in results) and clean
    print(
        f"\n{'all flows OK' if ok else 'FAILED'} in {time.monotonic() - say.started:.1f} s; "
        f"state dir {state} removed",
        flush=True,
    )
    return 0 if ok else 1
