"""What a gateway replica remembers across a restart: its sticky records, live servers and
the ``client_id`` of its sessions.

The gateway is otherwise stateless, but without the first two tables a restart would forget
which server each ``client_id`` belonged to, and would send the first reconnecting clients
to whichever server heartbeats first. Without the third, a reply that waited in this
instance's reply queue while it was down (killed with -9) would find a session it never
heard of and go to ``gateway.undeliverable`` instead of its client's offline queue
(workers/gateway/offline.py). All are best effort (a lost write costs a client its
stickiness, not data), so they are saved every few seconds and at shutdown, with
``synchronous=NORMAL``. Times are stored as wall-clock epoch seconds, because the balancer's
monotonic clock does not survive the process.

File: ``<state_dir>/gateway/<name>.sqlite3``, ``<name>`` being the replica's instance when
it is set explicitly, else the host name (the default instance ends in the pid).
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from bridge.store import Database, transaction

SCHEMA_VERSION = 2
_SESSIONS = """CREATE TABLE IF NOT EXISTS sessions (
    sid TEXT PRIMARY KEY, client_id TEXT NOT NULL, seen_at REAL NOT NULL)"""
MIGRATIONS = {1: (_SESSIONS,)}  # version 1 had no sessions table
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS sticky (
        client_id TEXT PRIMARY KEY, server_id TEXT NOT NULL, released_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS servers (
        server_id TEXT PRIMARY KEY, last_heartbeat REAL NOT NULL)""",
    _SESSIONS,
)


@dataclass(slots=True)
class Saved:
    sticky: list[tuple[str, str, float]]  # (client_id, server_id, released_at), oldest first
    servers: dict[str, float]  # server_id -> last heartbeat
    sessions: list[tuple[str, str]]  # (sid, client_id) of sessions seen within the window


class GatewayStore:
    def __init__(self, directory: Path, name: str) -> None:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
        self.db = Database(
            directory / f"{safe}.sqlite3",
            worker="gateway",
            schema_version=SCHEMA_VERSION,
            schema=SCHEMA,
            synchronous="NORMAL",
            migrations=MIGRATIONS,
        )

    async def load(
        self, *, since_sticky: float, since_server: float, since_session: float
    ) -> Saved:
        def read(conn: sqlite3.Connection) -> Saved:
            sticky = conn.execute(
                "SELECT client_id, server_id, released_at FROM sticky "
                "WHERE released_at >= ? ORDER BY released_at",
                (since_sticky,),
            ).fetchall()
            servers = dict(
                conn.execute(
                    "SELECT server_id, last_heartbeat FROM servers WHERE last_heartbeat >= ?",
                    (since_server,),
                ).fetchall()
            )
            sessions = conn.execute(
                "SELECT sid, client_id FROM sessions WHERE seen_at >= ?", (since_session,)
            ).fetchall()
            return Saved(
                sticky=[tuple(r) for r in sticky],
                servers=servers,
                sessions=[tuple(r) for r in sessions],
            )

        return await self.db.run(read)

    async def save(
        self,
        upserts: list[tuple[str, str, float]],
        deletes: list[str],
        servers: dict[str, float],
        sessions: list[tuple[str, str, float]],
        *,
        forget_before: float,
        forget_sessions_before: float,
    ) -> None:
        """``sessions``: (sid, client_id, seen_at) to upsert; rows not seen since
        ``forget_sessions_before`` go."""

        def write(conn: sqlite3.Connection) -> None:
            def body(c: sqlite3.Connection) -> None:
                c.executemany("INSERT OR REPLACE INTO sticky VALUES (?, ?, ?)", upserts)
                c.executemany("DELETE FROM sticky WHERE client_id = ?", [(d,) for d in deletes])
                c.execute("DELETE FROM sticky WHERE released_at < ?", (forget_before,))
                c.execute("DELETE FROM servers")
                c.executemany("INSERT INTO servers VALUES (?, ?)", servers.items())
                c.executemany("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?)", sessions)
                c.execute("DELETE FROM sessions WHERE seen_at < ?", (forget_sessions_before,))

            transaction(conn, body)

        await self.db.run(write)

    def close(self) -> None:
        self.db.close()
