"""``broker``: the gateway's broker link dropped, stalled and slowed through a proxy, then the
broker restarted; a ledger of the confirmed publishes kept inside the gateway (run in this
process)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.chaos.gateway.deployment import cleanup, finish, settings_for, start_servers
from bench.chaos.gateway.ledger import SERVERS, ChaosClient, ServerLedger, analyse, parse
from bench.harness.broker import rabbitmqctl, require_same_node
from bench.harness.report import broker_url, progress, unique
from bench.harness.stats import rnd
from bridge.amqp.frames import Properties
from workers.gateway.backend import BackendServer


class Readiness:
    """Samples /readyz (the host's readiness, what the endpoint serves) every 20 ms."""

    def __init__(self, ready: Callable[[], bool]) -> None:
        self.ready = ready
        self.samples: list[tuple[float, bool]] = []
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic(), self.ready()))
            await asyncio.sleep(0.02)

    def not_ready_s(self, since: float) -> float:
        total, last = 0.0, None
        for t, ok in self.samples:
            if t < since:
                continue
            if last is not None and not last[1]:
                total += t - last[0]
            last = (t, ok)
        return rnd(total, 2)

    async def wait_ready(self, timeout: float = 90.0) -> float:
        started = time.monotonic()
        while not self.ready():
            if time.monotonic() - started > timeout:
                raise RuntimeError("not ready again after the fault")
            await asyncio.sleep(0.02)
        return rnd(time.monotonic() - started, 2)

    def stop(self) -> None:
        self._task.cancel()


async def broker(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from bench.harness.proxy import TcpProxy
    from bridge.host import Host
    from bridge.settings import HostSettings
    from workers.gateway.worker import GatewayWorker

    prefix = unique("chaos-gw-broker")
    parts = urlsplit(broker_url())
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    s = settings_for(prefix).model_copy(
        update={"host": "127.0.0.1", "port": 0, "state_flush_s": 0.2, "server_ttl_s": 5.0}
    )
    worker = GatewayWorker(s)
    host = Host(
        HostSettings(
            amqp_url=proxy.url(parts.username or "guest", parts.password or "guest"),
            state_dir=root / "broker",
            http_port=0,
            heartbeat_s=2,
            drain_seconds=5,
        ),
        [worker],
        install_signals=False,
    )
    running = asyncio.get_running_loop().create_task(host.run())
    ledger = ServerLedger()
    servers: list[BackendServer] = []
    readiness = Readiness(lambda: host.readiness()[0])
    phases: dict[str, Any] = {}
    try:
        await readiness.wait_ready(60)
        confirmed, failed = _confirm_ledger(worker)
        servers = await start_servers(prefix, ledger)
        for _ in range(600):
            if set(SERVERS) <= set(worker.balancer.alive()):
                break
            await asyncio.sleep(0.05)
        # half of them pipeline deeply: more DATA read than may be in flight per session
        clients = [
            ChaosClient(
                f"b{i}",
                lambda: worker.port,
                window=4 if i % 2 else 100,
                resend_after_s=5.0,
                seed=args.seed * 1000 + i,
            )
            for i in range(args.clients)
        ]
        tasks = [asyncio.get_running_loop().create_task(c.run()) for c in clients]
        await asyncio.sleep(2.0)

        async def drop() -> None:
            proxy.accepting = False
            proxy.cut()
            await asyncio.sleep(2.0)
            proxy.accepting = True

        async def stall(seconds: float) -> None:
            proxy.stall()
            await asyncio.sleep(seconds)
            proxy.resume()

        async def slow() -> None:
            proxy.latency = 0.05
            await asyncio.sleep(5.0)
            proxy.latency = 0.0

        async def restart() -> None:
            await asyncio.to_thread(require_same_node, broker_url())  # never another broker
            await asyncio.to_thread(rabbitmqctl, "stop_app")
            await asyncio.sleep(2.0)
            await asyncio.to_thread(rabbitmqctl, "start_app")

        faults: list[tuple[str, Callable[[], Any]]] = [
            ("drop_2s", drop),
            ("stall_1s", lambda: stall(1.0)),
            # aiormq gives up on a silent connection after 3 * (heartbeat + 1) s = 9 s
            ("stall_12s", lambda: stall(12.0)),
            ("slow_50ms_5s", slow),
        ]
        if args.broker_restart:
            faults.append(("broker_restart", restart))
        for name, fault in faults:
            before = sum((c.closes for c in clients), Counter())
            acked_before = sum(len(c.answered) for c in clients)
            timeouts_before = sum(c.timeout_resends for c in clients)
            redelivered_before = len(ledger.redelivered)
            started = time.monotonic()
            progress(f"broker: {name}")
            await fault()
            ready_after = await readiness.wait_ready()
            await asyncio.sleep(3.0)  # load goes on; clients that were cut come back
            closes = sum((c.closes for c in clients), Counter()) - before
            phases[name] = {
                "not_ready_s": readiness.not_ready_s(started),
                "ready_again_after_heal_s": ready_after,
                "sessions_closed_by": dict(closes),
                "answered_during_phase": sum(len(c.answered) for c in clients) - acked_before,
                "replies_late_resent": sum(c.timeout_resends for c in clients) - timeouts_before,
                "redelivered_to_server": len(ledger.redelivered) - redelivered_before,
                "gateway_reconnects": host.broker.reconnects,
            }
        await finish(clients, tasks, timeout=120)
        for _ in range(100):  # the last disconnect events
            if ledger.connects <= ledger.disconnects:
                break
            await asyncio.sleep(0.05)
        out = analyse(clients, ledger)
        delivered = {(cid, seq, att) for _, cid, seq, att in ledger.data + ledger.redelivered}
        out.update(
            {
                "faults": phases,
                "broker_confirmed": len(confirmed),
                "broker_confirmed_lost": len(set(confirmed) - delivered),
                "publishes_failed": len(failed),
                "gateway_reconnects": host.broker.reconnects,
                "gateway_restarted": False,
            }
        )
        return out
    finally:
        readiness.stop()
        host.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 30)
        for server in servers:
            await server.stop()
        await proxy.stop()
        await cleanup(prefix)


def _confirm_ledger(worker: Any) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]:
    """Every DATA publish the broker confirmed to the gateway (and those it failed)."""
    confirmed: list[tuple[str, int, int]] = []
    failed: list[tuple[str, int, int]] = []
    publish = worker.publisher.publish

    def recording(
        exchange: str, routing_key: str, body: bytes, properties: Any = None, **kw: Any
    ) -> Any:
        fut = publish(exchange, routing_key, body, properties, **kw)
        if isinstance(properties, bytes):  # encoded, as the gateway keeps a session's
            properties = Properties.decode(properties)
        headers = (properties.headers if properties is not None else None) or {}
        parsed = parse(body) if headers.get("x-event") == "data" else None
        if parsed is not None:

            def settled(f: asyncio.Future[None]) -> None:
                ok = not f.cancelled() and f.exception() is None
                (confirmed if ok else failed).append(parsed)

            fut.add_done_callback(settled)
        return fut

    worker.publisher.publish = recording
    return confirmed, failed


# -- overload ------------------------------------------------------------------------------
