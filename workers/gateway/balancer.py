"""Gateway server registry and association records, with no I/O.

This module owns the gateway's view of which backend servers exist and which client
connection belongs to which server (the seed's "association record": client -> server). It
decides where a new connection goes (least associated live clients, ties rotated, sticky for a
known ``client_id`` that comes back soon) and keeps the counts that decision rests on. The
adapter feeds it events -- registry messages from ``gateway.servers``, HELLOs, disconnects,
other replicas' counts -- and does the I/O. Time is passed in as float seconds from any
monotonic clock; nothing here reads a clock.

Server states: *alive* servers take new clients. A server that deregisters or misses
heartbeats for ``server_ttl_s`` takes no new clients, but its existing associations stay
counted until their connections close; its record is dropped once it has none left.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Balancer", "ServerState"]

ServerState = Literal["alive", "deregistered", "expired"]


@dataclass(slots=True)
class _Server:
    state: ServerState
    last_heartbeat: float
    conns: set[str] = field(default_factory=set)
    # Sequence number of the last time this server was picked; the lowest among tied servers
    # goes next, which rotates ties instead of always favouring the first id.
    last_pick: int = -1


@dataclass(slots=True)
class _Conn:
    server: str
    client_id: str | None


@dataclass(slots=True)
class _ClientRecord:
    """Where a known client_id was last sent, for reconnects (the sticky table)."""

    server: str
    live: int = 0  # connections with this client_id that are open right now
    released_at: float = 0.0  # meaningful only when live == 0


@dataclass(slots=True)
class _Replica:
    counts: dict[str, int]
    seen: float


class Balancer:
    """Server registry plus association records for one gateway replica."""

    def __init__(self, *, server_ttl_s: float, sticky_retention_s: float) -> None:
        if server_ttl_s <= 0:
            raise ValueError("server_ttl_s must be > 0")
        if sticky_retention_s < 0:
            raise ValueError("sticky_retention_s must be >= 0")
        self._ttl = server_ttl_s
        self._retention = sticky_retention_s
        self._servers: dict[str, _Server] = {}
        self._conns: dict[str, _Conn] = {}
        self._clients: dict[str, _ClientRecord] = {}
        # client_id -> released_at for records with no live connection, in release order
        # (re-inserted on every release), so pruning pops from the front and each entry is
        # touched once: amortised O(1) per call, and the table never outgrows the retention.
        self._idle: dict[str, float] = {}
        self._replicas: dict[str, _Replica] = {}
        self._remote: dict[str, int] = {}  # server -> sum over fresh replicas
        self._picks = 0

    # ------------------------------------------------------------------ registry

    def register(self, server_id: str, now: float) -> bool:
        """A server announced itself. True if it just became alive (declare its queue)."""
        server = self._servers.get(server_id)
        if server is None:
            self._servers[server_id] = _Server("alive", now)
            return True
        server.last_heartbeat = max(server.last_heartbeat, now)
        was_alive = server.state == "alive"
        server.state = "alive"
        return not was_alive

    def heartbeat(self, server_id: str, now: float) -> bool:
        """A heartbeat; from an unknown, expired or deregistered server it registers it again
        (the server restarted, or the gateway restarted and missed its register). So a server
        must stop its heartbeat timer before it publishes deregister."""
        return self.register(server_id, now)

    def deregister(self, server_id: str, now: float) -> None:
        """The server is leaving: no new clients; existing ones stay until they disconnect."""
        server = self._servers.get(server_id)
        if server is None:
            return
        server.state = "deregistered"
        self._drop_if_empty(server_id, server)

    def expire(self, now: float) -> list[str]:
        """Mark alive servers silent for longer than server_ttl_s as expired; return them."""
        expired: list[str] = []
        for server_id, server in list(self._servers.items()):
            if server.state == "alive" and now - server.last_heartbeat > self._ttl:
                server.state = "expired"
                expired.append(server_id)
                self._drop_if_empty(server_id, server)
        self._expire_replicas(now)
        self._prune_sticky(now)
        return sorted(expired)

    def alive(self) -> list[str]:
        return sorted(sid for sid, s in self._servers.items() if s.state == "alive")

    def is_alive(self, server_id: str) -> bool:
        server = self._servers.get(server_id)
        return server is not None and server.state == "alive"

    def _eligible(self, server: _Server, now: float) -> bool:
        # Also checks the heartbeat age, so a client is never sent to a server that has gone
        # silent just because the adapter's expire() tick has not run yet.
        return server.state == "alive" and now - server.last_heartbeat <= self._ttl

    def _drop_if_empty(self, server_id: str, server: _Server) -> None:
        # Records of servers that can take no clients and hold none would only leak memory.
        if server.state != "alive" and not server.conns:
            del self._servers[server_id]

    # ------------------------------------------------------------------ associations

    def assign(self, conn_key: str, client_id: str | None, now: float) -> str | None:
        """Pick the server for a new connection and record the association.

        Returns None (and records nothing) when no server is alive. Raises ValueError if
        ``conn_key`` already has an association.
        """
        if conn_key in self._conns:
            raise ValueError(f"connection {conn_key!r} is already associated")
        self._prune_sticky(now)
        self._expire_replicas(now)
        server_id = self._sticky_choice(client_id, now)
        if server_id is None:
            server_id = self._least_loaded(now)
            if server_id is None:
                return None
        server = self._servers[server_id]
        server.conns.add(conn_key)
        self._picks += 1
        server.last_pick = self._picks
        self._conns[conn_key] = _Conn(server_id, client_id)
        if client_id is not None:
            record = self._clients.get(client_id)
            if record is None:
                self._clients[client_id] = _ClientRecord(server_id, live=1)
            else:
                record.server = server_id  # the latest choice is the one to come back to
                record.live += 1
                self._idle.pop(client_id, None)
        return server_id

    def _sticky_choice(self, client_id: str | None, now: float) -> str | None:
        if client_id is None:
            return None
        record = self._clients.get(client_id)
        if record is None:
            return None
        # A client with a connection still open is usually reconnecting before the gateway
        # noticed the old socket die; it belongs with the same server as much as a fresh one.
        if record.live == 0 and now - record.released_at > self._retention:
            return None
        server = self._servers.get(record.server)
        if server is None or not self._eligible(server, now):
            return None
        return record.server

    def _least_loaded(self, now: float) -> str | None:
        best_id: str | None = None
        best_key: tuple[int, int, str] | None = None
        for server_id, server in self._servers.items():
            if not self._eligible(server, now):
                continue
            # Fewest clients across all replicas first, then least recently picked, then id
            # so the choice is deterministic.
            key = (len(server.conns) + self._remote.get(server_id, 0), server.last_pick, server_id)
            if best_key is None or key < best_key:
                best_id, best_key = server_id, key
        return best_id

    def release(self, conn_key: str, now: float) -> str | None:
        """The connection closed. Returns the server it was associated with, or None."""
        conn = self._conns.pop(conn_key, None)
        if conn is None:
            return None
        server = self._servers.get(conn.server)
        if server is not None:
            server.conns.discard(conn_key)
            self._drop_if_empty(conn.server, server)
        if conn.client_id is not None:
            record = self._clients.get(conn.client_id)
            if record is not None:
                record.live = max(0, record.live - 1)
                if record.live == 0:
                    record.released_at = now
                    self._idle.pop(conn.client_id, None)
                    self._idle[conn.client_id] = now
        self._prune_sticky(now)
        return conn.server

    def server_of(self, conn_key: str) -> str | None:
        conn = self._conns.get(conn_key)
        return None if conn is None else conn.server

    def connections_of(self, server_id: str) -> list[str]:
        """Live connections associated with a server, e.g. to close them when it expires."""
        server = self._servers.get(server_id)
        return [] if server is None else sorted(server.conns)

    def counts(self) -> dict[str, int]:
        """Live clients of this replica per server: every alive server, plus any not-alive
        server that still has clients."""
        return {sid: len(s.conns) for sid, s in sorted(self._servers.items())}

    def sticky_record(self, client_id: str) -> tuple[str, int, float] | None:
        """(server, live connections, released_at) of a known client_id, for persistence;
        ``released_at`` is meaningful only when live is 0."""
        record = self._clients.get(client_id)
        if record is None:
            return None
        return record.server, record.live, record.released_at

    def restore_sticky(self, client_id: str, server_id: str, released_at: float) -> None:
        """Bring back a sticky record saved before a restart (no live connection).

        Call in ascending ``released_at`` order (pruning relies on it); a client_id that is
        already known is left alone, since what this process saw is newer.
        """
        if client_id in self._clients:
            return
        self._clients[client_id] = _ClientRecord(server_id, live=0, released_at=released_at)
        self._idle[client_id] = released_at

    def _prune_sticky(self, now: float) -> None:
        idle = self._idle
        while idle:
            client_id, released_at = next(iter(idle.items()))
            if now - released_at <= self._retention:
                break
            del idle[client_id]
            del self._clients[client_id]

    # ------------------------------------------------------------------ other replicas

    def set_remote_counts(self, replica: str, counts: Mapping[str, int], now: float) -> None:
        """Per-server client counts reported by another gateway replica.

        They are added to the local counts when choosing, so replicas behind one load
        balancer spread clients over servers together. A replica not heard from for
        server_ttl_s is forgotten.
        """
        self._replicas[replica] = _Replica({s: max(0, int(n)) for s, n in counts.items()}, now)
        self._expire_replicas(now)
        self._sum_remote()

    def _expire_replicas(self, now: float) -> None:
        stale = [r for r, rep in self._replicas.items() if now - rep.seen > self._ttl]
        for replica in stale:
            del self._replicas[replica]
        if stale:
            self._sum_remote()

    def _sum_remote(self) -> None:
        total: dict[str, int] = {}
        for rep in self._replicas.values():
            for server_id, n in rep.counts.items():
                total[server_id] = total.get(server_id, 0) + n
        self._remote = total

    # ------------------------------------------------------------------ admin view

    def snapshot(self, now: float) -> dict[str, Any]:
        """JSON-able state for the admin page. Takes ``now`` because ages need a clock."""
        return {
            "servers": {
                sid: {
                    "state": s.state,
                    "alive": s.state == "alive",
                    "last_heartbeat_age_s": round(max(0.0, now - s.last_heartbeat), 3),
                    "clients": len(s.conns),
                    "remote_clients": self._remote.get(sid, 0),
                }
                for sid, s in sorted(self._servers.items())
            },
            "associations": len(self._conns),
            "sticky_entries": len(self._clients),
            "replicas": {
                r: {
                    "age_s": round(max(0.0, now - rep.seen), 3),
                    "clients": sum(rep.counts.values()),
                }
                for r, rep in sorted(self._replicas.items())
            },
        }
