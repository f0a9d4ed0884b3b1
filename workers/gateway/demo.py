"""The ``gateway`` part of ``rabbitmq-bridge demo``: two echo servers register, two TCP
clients connect, each is given a different server (fewest associated clients) and gets its
message echoed back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from bridge.demo import FlowResult, Tour
from workers.gateway.backend import BackendServer
from workers.gateway.client import GatewayClient
from workers.gateway.config import GatewaySettings
from workers.gateway.worker import GatewayWorker

SERVER_IDS = ("s1", "s2")  # the echo backends


class GatewayDemo:
    flow = "gateway"
    order = 30

    def __init__(self, prefix: str) -> None:
        p = self.prefix = prefix
        self.settings = GatewaySettings(
            host="127.0.0.1",
            port=0,
            plain_listener=True,
            tls_cert=None,
            tls_key=None,
            tokens=[],
            servers_exchange=f"{p}.gateway.servers",
            server_queue_prefix=f"{p}.gateway.server.",
            undeliverable_queue=f"{p}.gateway.undeliverable",
            reply_queue_prefix=f"{p}.gateway.reply.",
            registry_queue_prefix=f"{p}.gateway.registry.",
            instance=f"{p}-gw",
            peers=False,  # one replica: no peers exchange or sticky stream to leave behind
            no_server_wait_s=5.0,
            tick_s=0.1,
            state_flush_s=0.5,
        )
        self.worker = GatewayWorker(self.settings)

    def names(self) -> list[tuple[str, str]]:
        s = self.settings
        return [
            ("exchange", s.servers_exchange),
            ("queue", s.undeliverable_queue),
            ("queue", s.reply_queue),
            ("queue", s.registry_queue),
            *(("queue", s.server_queue(server)) for server in SERVER_IDS),
        ]

    async def run(self, tour: Tour, result: FlowResult) -> None:
        say, worker, settings = tour.say, self.worker, self.settings
        result.what = "2 TCP clients through the gateway, 2 echo servers"
        for server_id in SERVER_IDS:
            server = BackendServer(tour.url, server_id, settings=settings, heartbeat_s=2.0)
            await server.start()
            tour.cleanups.append(server.stop)
        deadline = time.monotonic() + 10
        while not all(worker.balancer.is_alive(s) for s in SERVER_IDS):
            if time.monotonic() > deadline:
                raise AssertionError(f"echo servers not registered: {worker.balancer.alive()}")
            await asyncio.sleep(0.02)
        say(
            "gateway",
            f"echo backends {' and '.join(SERVER_IDS)} registered on {settings.servers_exchange}; "
            f"gateway listening on 127.0.0.1:{worker.port}",
        )
        echoed: dict[str, str] = {}
        rtts: list[float] = []
        for i in (1, 2):
            client = await GatewayClient.connect("127.0.0.1", worker.port, client_id=f"client-{i}")
            tour.cleanups.append(_closer(client))
            say("gateway", f"client-{i} connected: WELCOME, assigned to server {client.server}")
            payload = f"hello from client-{i}".encode()
            started = time.perf_counter()
            reply = await client.request(payload)
            rtts.append((time.perf_counter() - started) * 1000)
            say(
                "gateway",
                f"client-{i} sent {payload.decode()!r}, got back {reply.decode()!r} "
                f"({rtts[-1]:.1f} ms via {settings.server_queue(client.server)})",
            )
            if reply != payload:
                raise AssertionError(f"client-{i} got {reply!r}")
            echoed[f"client-{i}"] = client.server
            await client.bye()
        servers = sorted(set(echoed.values()))
        result.figures = (
            ", ".join(f"{c}->{s}" for c, s in echoed.items())
            + f", round trip max {max(rtts):.0f} ms"
        )
        if servers != sorted(SERVER_IDS):
            raise AssertionError(f"both clients went to {servers}")
        say("gateway", "each client was given a different server (fewest associated clients)")
        result.ok = True


def _closer(client: GatewayClient) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        client.close()

    return close
