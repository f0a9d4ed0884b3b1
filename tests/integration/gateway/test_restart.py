"""A gateway restart: clients are told BYE, their disconnects reach the servers, and
reconnecting clients with a client_id land on the server they had before."""

from __future__ import annotations

import pytest

from tests.conftest import running_host
from tests.integration.gateway.helpers import (
    SERVER_HEARTBEAT_S,
    cleanup,
    gateway_settings,
    wait_until,
)
from workers.gateway.backend import BackendServer
from workers.gateway.client import GatewayClient, GatewayError
from workers.gateway.worker import GatewayWorker

pytestmark = pytest.mark.integration


async def test_restart_keeps_sticky_assignment(broker_url, tmp_path, unique):
    # Servers saved by the first gateway count as alive for server_ttl_s after their last
    # heartbeat: long enough here for the restart (the default of the test settings, 1 s,
    # is shorter than the stop, the wait for the disconnects and the new start on a loaded
    # machine, and the restored servers were dropped as expired: seen once in CI)
    s = gateway_settings(unique, server_ttl_s=10.0)
    state = tmp_path / "state"
    servers = {
        sid: BackendServer(
            broker_url, sid, settings=s, heartbeat_s=SERVER_HEARTBEAT_S, keep_events=True
        )
        for sid in ("s1", "s2")
    }
    clients: list[GatewayClient] = []
    try:
        for server in servers.values():
            await server.start()
        first = GatewayWorker(s)
        async with running_host(broker_url, state, [first]):
            await wait_until(lambda: first.balancer.alive() == ["s1", "s2"], "servers alive")
            for i in range(4):
                clients.append(await GatewayClient.connect(port=first.port, client_id=f"k{i}"))
            before = {f"k{i}": c.server for i, c in enumerate(clients)}
            sessions = {c.session: c.server for c in clients}
            assert sorted(before.values()) == ["s1", "s1", "s2", "s2"]
            for c in clients:
                assert await c.request(b"ping") == b"ping"
        # graceful stop: every client got BYE
        for c in clients:
            with pytest.raises(GatewayError) as info:
                await c.recv()
            assert info.value.code == "bye"
            c.close()
        for sid, server in servers.items():
            mine = {k for k, v in sessions.items() if v == sid}
            await server.wait_events(
                lambda evs, mine=mine: {e.session for e in evs if e.event == "disconnect"} >= mine
            )

        second = GatewayWorker(s)
        async with running_host(broker_url, state, [second]):
            # the servers are known at once (restored), and each client_id goes back to its
            # server -- in an order in which least-connections alone would mix them up
            assert second.balancer.alive() == ["s1", "s2"]
            order = sorted(before, key=lambda k: (before[k], k))  # both of s1's first
            again: dict[str, str] = {}
            for k in order:
                c = await GatewayClient.connect(port=second.port, client_id=k)
                clients.append(c)
                again[k] = c.server
                assert await c.request(k.encode()) == k.encode()
            assert again == before
            # a client_id never seen before is placed by least connections as usual
            fresh = await GatewayClient.connect(port=second.port, client_id="new")
            clients.append(fresh)
            assert fresh.server in ("s1", "s2")
            for c in clients[-5:]:
                await c.bye()
    finally:
        for c in clients:
            c.close()
        for server in servers.values():
            await server.stop()
        await cleanup(broker_url, s, list(servers))
