"""Gateway replicas as real processes (`rabbitmq-bridge run gateway`) sharing one server registry:
balance on the global view, sticky client_ids across replicas and across a replica's
restart, and a replica killed with kill -9 leaving the global view.

Every wait is on a condition with a generous deadline; nothing asserts how long it took.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from bench.harness.broker import delete_names
from tests.integration.gateway.helpers import SERVER_HEARTBEAT_S, Replica, gateway_settings
from workers.gateway.backend import BackendServer
from workers.gateway.client import GatewayClient, GatewayError

pytestmark = pytest.mark.integration

DEADLINE = 60.0  # generous: the machine is shared
# sticky client_ids kept long enough, and a restarted replica catching up from its peers
STICKY = {"BRIDGE_GATEWAY__STICKY_RETENTION_S": "120", "BRIDGE_GATEWAY__PEER_CATCHUP_S": "20"}


async def wait_for(check: Any, what: str) -> Any:
    """Poll an async condition until it holds (no timing assertion: a deadline only)."""
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_replicas_share_counts_and_sticky_records(broker_url, tmp_path, unique):
    s = gateway_settings(unique)
    a = Replica("a", s, broker_url, tmp_path, STICKY)
    b = Replica("b", s, broker_url, tmp_path, STICKY)
    c = Replica("c", s, broker_url, tmp_path, STICKY)
    servers = {
        sid: BackendServer(broker_url, sid, settings=s, heartbeat_s=SERVER_HEARTBEAT_S)
        for sid in ("s1", "s2")
    }
    clients: dict[str, tuple[Replica, GatewayClient]] = {}  # client_id -> (via, client)
    try:
        await asyncio.gather(a.start(), b.start())
        for server in servers.values():
            await server.start()
        for replica, other in ((a, b), (b, a)):

            async def sees_all(replica: Replica = replica, other: Replica = other) -> bool:
                summary = await replica.admin("summary")
                return summary["servers_alive"] == ["s1", "s2"] and summary["peers"][
                    "replicas"
                ] == [other.instance]

            await wait_for(sees_all, f"{replica.name} sees both servers and the other replica")

        def truth() -> dict[str, int]:
            return dict(Counter(cl.server for _, cl in clients.values()))

        async def views_exact() -> bool:
            want = truth()
            live = [r for r in (a, b, c) if r.proc.proc and r.proc.proc.poll() is None]
            return all([await r.global_view() == want for r in live])

        # -- balance on the global view: clients alternate between the replicas ----------
        for i in range(24):
            via = (a, b)[i % 2]
            client = await via.connect(f"k{i}")
            clients[f"k{i}"] = (via, client)
            assert await client.request(f"hello {i}".encode()) == f"hello {i}".encode()
            # Each replica's choice rests on the other's report: wait until both have it.
            await wait_for(views_exact, "both replicas' global view equals the truth")
            counts = truth()
            assert max(counts.values()) - min(counts.values()) <= 1, counts
        assert truth() == {"s1": 12, "s2": 12}
        # ...although each replica alone would not need to be balanced, the sum is.
        per_replica = {
            r.name: Counter(cl.server for v, cl in clients.values() if v is r) for r in (a, b)
        }
        assert sum(per_replica["a"].values()) == sum(per_replica["b"].values()) == 12

        async def close(client_id: str) -> None:
            _via, client = clients.pop(client_id)
            await client.bye()
            await wait_for(views_exact, "views updated after a disconnect")

        async def sticky_through(first: Replica, then: Replica) -> None:
            """A client_id that first came through ``first`` reconnects through ``then``
            and lands on its server, although least-loaded would pick the other one."""
            client_id = next(k for k, (v, _) in clients.items() if v is first)
            home = clients[client_id][1].server
            other = "s2" if home == "s1" else "s1"
            # Make ``home`` the busier server even without this client.
            while truth().get(other, 0) >= truth()[home] - 1:
                await close(next(k for k, (_, cl) in clients.items() if cl.server == other))
            await close(client_id)
            assert truth().get(other, 0) < truth()[home]  # least-loaded alone: ``other``

            async def known() -> bool:
                return await then.sticky_server(client_id) == home

            await wait_for(known, f"{then.name} knows where {client_id} belongs")
            client = await then.connect(client_id)
            clients[client_id] = (then, client)
            assert client.server == home
            assert await client.request(b"back") == b"back"
            await wait_for(views_exact, "views updated after the reconnect")

        await sticky_through(a, b)
        await sticky_through(b, a)

        # -- a replica dies with kill -9 --------------------------------------------------
        lost = {k: cl.server for k, (v, cl) in clients.items() if v is a}
        assert lost
        a.proc.kill9()
        for client_id in lost:
            with pytest.raises((GatewayError, ConnectionError)):
                await clients[client_id][1].recv(timeout=DEADLINE)
            clients.pop(client_id)[1].close()

        async def a_forgotten() -> bool:
            summary = await b.admin("summary")
            return summary["peers"]["replicas"] == [] and await b.global_view() == truth()

        # Its clients leave b's global view once its reports are older than peer_ttl_s.
        await wait_for(a_forgotten, "the killed replica's counts leave the global view")
        # No client is stuck: each reconnects through b, to the server it had.
        for client_id, home in lost.items():
            client = await b.connect(client_id)
            clients[client_id] = (b, client)
            assert client.server == home, client_id
            assert await client.request(client_id.encode()) == client_id.encode()
        await wait_for(views_exact, "b's view after the reconnects")

        # -- a replica started later (empty disk) reads the sticky records ----------------
        await c.start()

        async def c_sees_b() -> bool:
            return (await c.admin("summary"))["peers"]["replicas"] == [b.instance]

        await wait_for(c_sees_b, "the new replica hears from b")
        await sticky_through(b, c)
    finally:
        for _, client in clients.values():
            client.close()
        for replica in (a, b, c):
            if replica.proc.proc is not None and replica.proc.proc.poll() is None:
                replica.proc.terminate()
        for server in servers.values():
            await server.stop()
        await delete_names(
            broker_url,
            [s.servers_exchange, s.peers_exchange_name],
            [
                s.undeliverable_queue,
                s.sticky_stream_name,
                *(s.server_queue(i) for i in servers),
                *(s.reply_queue_prefix + r.instance for r in (a, b, c)),
            ],
        )
