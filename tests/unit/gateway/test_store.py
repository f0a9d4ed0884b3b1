"""The gateway's SQLite store (workers/gateway/store.py) on a real file: sessions'
client_ids saved, pruned after the window, and a version-1 file migrated."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from workers.gateway.store import GatewayStore


async def test_sessions_are_saved_replaced_and_pruned(tmp_path: Path) -> None:
    store = GatewayStore(tmp_path, "gw-a")
    try:
        await store.save(
            [],
            [],
            {},
            [("s1", "dev-1", 100.0), ("s2", "dev-2", 50.0)],
            forget_before=0,
            forget_sessions_before=0,
        )
        await store.save(
            [], [], {}, [("s1", "dev-1", 200.0)], forget_before=0, forget_sessions_before=60.0
        )
        saved = await store.load(since_sticky=0, since_server=0, since_session=150.0)
        assert saved.sessions == [("s1", "dev-1")]
        older = await store.load(since_sticky=0, since_server=0, since_session=0)
        assert older.sessions == [("s1", "dev-1")]  # s2 was pruned (seen before 60)
    finally:
        store.close()


async def test_a_version_1_file_gets_the_sessions_table(tmp_path: Path) -> None:
    path = tmp_path / "gw-b.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE bridge_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.executemany(
            "INSERT INTO bridge_meta VALUES (?, ?)",
            [("worker", "gateway"), ("schema_version", "1")],
        )
        conn.execute(
            "CREATE TABLE sticky (client_id TEXT PRIMARY KEY, server_id TEXT NOT NULL, "
            "released_at REAL NOT NULL)"
        )
        conn.execute("INSERT INTO sticky VALUES ('dev-1', 's1', 10.0)")
    conn.close()
    store = GatewayStore(tmp_path, "gw-b")
    try:
        assert store.db.migrated_from == 1
        saved = await store.load(since_sticky=0, since_server=0, since_session=0)
        assert saved.sticky == [("dev-1", "s1", 10.0)] and saved.sessions == []
    finally:
        store.close()
