"""Gateway server registry and association records, with no I/O.

This module owns the gateway's view of which backend servers exist and which client
connection belongs to which server (the seed's "association record": client -> server). It
decides where a new connection goes (least associated live clients, ties rotated, sticky for a
known ``client_id`` that comes back soon) and keeps the counts that decision rests on. The
adapter feeds it events -- registry messages from ``gateway.servers``, HELLOs, disconnects,
other replicas' counts and sticky records -- and does the I/O. Time is passed in as float
seconds from any monotonic clock; nothing here reads a clock.

Several replicas. Each replica's choice rests on a *global view*: for every server, this
replica's own live clients (exact) plus, for every other replica heard from within
``replica_ttl_s``, the counts it last reported plus the assignments this replica made since
that report arrived. The last term is the herd damper: replicas behind one load balancer
see similar traffic, so while a report is in transit each of them is assumed to be doing
what this one does; without it every replica would send all its new clients to the same
least-loaded server until the reports caught up. Ties on the global view go to the server
least recently picked here, then to a random one (``rng``), so replicas that start together
do not all begin with the same server. Sticky records learnt from other replicas
(``learn_sticky``) make a returning ``client_id`` land on its server whichever replica it
reaches.

Server states: *alive* servers take new clients. A server that deregisters or misses
heartbeats for ``server_ttl_s`` takes no new clients, but its existing associations stay
counted until their connections close; its record is dropped once it has none left.
"""

from __future__ import annotations

import random
from collections import deque
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
    live: int = 0  # connections with this client_id that are open here right now
    released_at: float = 0.0  # meaningful only when live == 0
    updated: float = 0.0  # when ``server`` was chosen (here or by the replica that told us)


@dataclass(slots=True)
class _Replica:
    counts: dict[str, int]
    seen: float
    # This replica's own assignments per server made after that replica's report was sent:
    # the estimate of what it has been doing meanwhile (the herd damper).
    since: dict[str, int] = field(default_factory=dict)


class Balancer:
    """Server registry plus association records for one gateway replica."""

    def __init__(
        self,
        *,
        server_ttl_s: float,
        sticky_retention_s: float,
        replica_ttl_s: float | None = None,
        herd_estimate: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        if server_ttl_s <= 0:
            raise ValueError("server_ttl_s must be > 0")
        if sticky_retention_s < 0:
            raise ValueError("sticky_retention_s must be >= 0")
        if replica_ttl_s is not None and replica_ttl_s <= 0:
            raise ValueError("replica_ttl_s must be > 0")
        self._ttl = server_ttl_s
        self._retention = sticky_retention_s
        self._replica_ttl = server_ttl_s if replica_ttl_s is None else replica_ttl_s
        self._herd_estimate = herd_estimate
        self._rng = rng if rng is not None else random.Random()
        self._servers: dict[str, _Server] = {}
        self._conns: dict[str, _Conn] = {}
        self._clients: dict[str, _ClientRecord] = {}
        # client_id -> released_at for records with no live connection, in release order
        # (re-inserted on every release), so pruning pops from the front and each entry is
        # touched once: amortised O(1) per call, and the table never outgrows the retention.
        self._idle: dict[str, float] = {}
        self._replicas: dict[str, _Replica] = {}
        # server -> sum over fresh replicas of (reported count + own assignments since)
        self._remote: dict[str, int] = {}
        self._picks = 0
        # (time, server) of this replica's recent assignments, oldest first, kept for
        # replica_ttl_s: a report sent at t is completed with the ones made after t.
        self._log: deque[tuple[float, str]] = deque()

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
        if self._herd_estimate:
            self._log.append((now, server_id))
            for rep in self._replicas.values():
                rep.since[server_id] = rep.since.get(server_id, 0) + 1
            if self._replicas:
                self._remote[server_id] = self._remote.get(server_id, 0) + len(self._replicas)
        if client_id is not None:
            record = self._clients.get(client_id)
            if record is None:
                self._clients[client_id] = _ClientRecord(server_id, live=1, updated=now)
            else:
                record.server = server_id  # the latest choice is the one to come back to
                record.updated = now
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
        best: list[str] = []
        best_key: tuple[int, int] | None = None
        remote = self._remote
        for server_id, server in self._servers.items():
            if not self._eligible(server, now):
                continue
            # Fewest clients on the global view first, then least recently picked here.
            key = (len(server.conns) + remote.get(server_id, 0), server.last_pick)
            if best_key is None or key < best_key:
                best, best_key = [server_id], key
            elif key == best_key:
                best.append(server_id)
        if not best:
            return None
        # Still tied (servers never picked here): a random one, so replicas that start at
        # the same time do not all send their first clients to the same server.
        return best[0] if len(best) == 1 else self._rng.choice(sorted(best))

    def global_counts(self, now: float) -> dict[str, int]:
        """The view a choice rests on: per server, this replica's live clients plus each
        fresh replica's last report plus this replica's assignments since that report."""
        self._expire_replicas(now)
        remote = self._remote
        out = {sid: len(s.conns) + remote.get(sid, 0) for sid, s in self._servers.items()}
        for sid, n in remote.items():
            out.setdefault(sid, n)
        return dict(sorted(out.items()))

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

    def move(self, conn_key: str, now: float) -> str | None:
        """The connection's server is gone: associate it with the least-loaded alive server
        instead (never the one it had, which is not alive). Returns the new server, or None
        when no server is alive, in which case the connection is no longer associated."""
        conn = self._conns.get(conn_key)
        if conn is None:
            raise ValueError(f"connection {conn_key!r} is not associated")
        self.release(conn_key, now)
        return self.assign(conn_key, conn.client_id, now)

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
        self._clients[client_id] = _ClientRecord(
            server_id, live=0, released_at=released_at, updated=released_at
        )
        self._idle[client_id] = released_at

    def learn_sticky(self, client_id: str, server_id: str, at: float, now: float) -> bool:
        """Another replica saw ``client_id`` with ``server_id`` at time ``at`` (assigned,
        still connected, or released then). Newer news wins: a record whose server was
        chosen after ``at`` is left alone. A record with live connections here keeps them
        counted, but the next reconnect goes where the latest choice was. True if applied.
        """
        at = min(at, now)
        if now - at > self._retention:
            return False
        record = self._clients.get(client_id)
        if record is not None and record.live == 0 and now - record.released_at > self._retention:
            record = None  # past its retention, only not pruned yet: as good as unknown
        if record is None:
            self._clients[client_id] = _ClientRecord(server_id, live=0, released_at=at, updated=at)
            self._idle.pop(client_id, None)
            self._idle[client_id] = at
            return True
        if at < record.updated:
            return False
        record.server = server_id
        record.updated = at
        if record.live == 0 and at > record.released_at:
            record.released_at = at
            self._idle.pop(client_id, None)
            self._idle[client_id] = at
        return True

    def _prune_sticky(self, now: float) -> None:
        idle = self._idle
        while idle:
            client_id, released_at = next(iter(idle.items()))
            if now - released_at <= self._retention:
                break
            del idle[client_id]
            del self._clients[client_id]

    # ------------------------------------------------------------------ other replicas

    def set_remote_counts(
        self,
        replica: str,
        counts: Mapping[str, int],
        now: float,
        sent_at: float | None = None,
    ) -> None:
        """Per-server client counts reported by another gateway replica (its whole table:
        a newer report replaces the previous one), made at ``sent_at`` (default ``now``).

        They are added to the local counts when choosing, so replicas behind one load
        balancer spread clients over servers together; the assignments made here after
        ``sent_at`` are added once more, as the estimate of what that replica did since.
        A replica not heard from for ``replica_ttl_s`` is forgotten, and with it its
        clients.
        """
        since: dict[str, int] = {}
        if self._herd_estimate:
            sent = now if sent_at is None else min(sent_at, now)
            log = self._log
            while log and now - log[0][0] > self._replica_ttl:
                log.popleft()
            for t, server_id in reversed(log):
                if t <= sent:
                    break
                since[server_id] = since.get(server_id, 0) + 1
        self._replicas[replica] = _Replica(
            {s: max(0, int(n)) for s, n in counts.items()}, now, since
        )
        self._expire_replicas(now)
        self._sum_remote()

    def forget_replica(self, replica: str) -> None:
        """The replica said it is leaving (its clients were told BYE)."""
        if self._replicas.pop(replica, None) is not None:
            self._sum_remote()

    def replicas(self, now: float) -> list[str]:
        self._expire_replicas(now)
        return sorted(self._replicas)

    def _expire_replicas(self, now: float) -> None:
        ttl = self._replica_ttl
        stale = [r for r, rep in self._replicas.items() if now - rep.seen > ttl]
        for replica in stale:
            del self._replicas[replica]
        if stale:
            self._sum_remote()

    def _sum_remote(self) -> None:
        total: dict[str, int] = {}
        for rep in self._replicas.values():
            for server_id, n in rep.counts.items():
                total[server_id] = total.get(server_id, 0) + n
            for server_id, n in rep.since.items():
                total[server_id] = total.get(server_id, 0) + n
        self._remote = total

    # ------------------------------------------------------------------ admin view

    def snapshot(self, now: float) -> dict[str, Any]:
        """JSON-able state for the admin page. Takes ``now`` because ages need a clock."""
        self._expire_replicas(now)
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
                    "assigned_here_since": sum(rep.since.values()),
                }
                for r, rep in sorted(self._replicas.items())
            },
            "global_clients": self.global_counts(now),
        }
