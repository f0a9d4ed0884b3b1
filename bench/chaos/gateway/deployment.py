"""The gateway under fault: its settings, echo servers, probes of its state and the cleanup of its
names."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from bench.chaos.gateway.ledger import SERVERS, ChaosClient, ServerLedger
from bench.gateway.processes import gateway_env
from bench.harness.broker import delete_names
from bench.harness.cpu import rss_bytes
from bench.harness.procs import WorkerProcess
from bench.harness.report import broker_url
from bench.harness.stats import rnd
from workers.gateway.backend import BackendServer
from workers.gateway.config import GatewaySettings


def settings_for(prefix: str) -> GatewaySettings:
    """The names a gateway started with ``gateway_env(prefix, ...)`` uses."""
    return GatewaySettings(
        servers_exchange=f"{prefix}.servers",
        server_queue_prefix=f"{prefix}.server.",
        undeliverable_queue=f"{prefix}.undeliverable",
        reply_queue_prefix=f"{prefix}.reply.",
        registry_queue_prefix=f"{prefix}.registry.",
        offline_queue_prefix=f"{prefix}.offline.",
        offline_exchange=f"{prefix}.offline",
        instance=prefix,
        peers=False,  # one replica: no peers exchange or sticky stream left in the broker
    )


def env_for(prefix: str, port: int, **settings: Any) -> dict[str, str]:
    env = gateway_env(prefix, port)
    env.update({"BRIDGE_GATEWAY__STATE_FLUSH_S": "0.2", "BRIDGE_GATEWAY__SERVER_TTL_S": "5"})
    env["BRIDGE_GATEWAY__PEERS"] = "false"  # one replica per scenario
    # replies kept for the clients' ids go away with their queues soon after a run
    env["BRIDGE_GATEWAY__OFFLINE_TTL_S"] = "60"
    env.update({f"BRIDGE_GATEWAY__{k.upper()}": str(v) for k, v in settings.items()})
    return env


async def start_servers(
    prefix: str, ledger: ServerLedger, ids: tuple[str, ...] = SERVERS, prefetch: int = 256
) -> list[BackendServer]:
    settings = settings_for(prefix)
    servers = [
        BackendServer(
            broker_url(),
            sid,
            settings=settings,
            heartbeat_s=1.0,
            handler=ledger.handle,
            prefetch=prefetch,
        )
        for sid in ids
    ]
    for server in servers:
        await server.start()
    return servers


async def alive_at(gateway: WorkerProcess, ids: tuple[str, ...], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            status, body = gateway.http("/admin/gateway/summary")
            if status == 200 and set(ids) <= set(json.loads(body)["servers_alive"]):
                return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"servers {ids} never alive at the gateway")


async def queue_depth(name: str) -> int:
    import aio_pika
    import aiormq

    conn = await aio_pika.connect(broker_url())
    try:
        channel = await conn.channel()
        try:
            q = await channel.declare_queue(name, passive=True)
            return int(q.declaration_result.message_count or 0)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return -1
    finally:
        await conn.close()


async def cleanup(prefix: str) -> None:
    s = settings_for(prefix)
    await delete_names(
        broker_url(),
        [s.servers_exchange, s.offline_exchange],
        [s.undeliverable_queue, s.reply_queue, *(s.server_queue(i) for i in SERVERS)],
    )


class RssWatch:
    """Largest RSS of a process whose pid may change (restarts), sampled in the background."""

    def __init__(self, pid: Callable[[], int | None], period: float = 0.2) -> None:
        self.pid = pid
        self.period = period
        self.samples: list[tuple[float, int]] = []
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            pid = self.pid()
            if pid is not None:
                with contextlib.suppress(OSError, ValueError):
                    self.samples.append((time.monotonic(), rss_bytes(pid)))
            await asyncio.sleep(self.period)

    def max_mib(self, since: float = 0.0, until: float = float("inf")) -> float:
        values = [v for t, v in self.samples if since <= t <= until]
        return rnd(max(values, default=0) / 2**20, 1)

    def stop(self) -> None:
        self._task.cancel()


def _running_pid(proc: WorkerProcess) -> int | None:
    p = proc.proc
    return p.pid if p is not None and p.poll() is None else None


async def finish(
    clients: list[ChaosClient], tasks: list[asyncio.Task[None]], timeout: float
) -> None:
    """Stop new messages; wait until everything sent is answered (resends included)."""
    for client in clients:
        client.sending = False
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    for task in done:
        if task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


# -- crash ---------------------------------------------------------------------------------
