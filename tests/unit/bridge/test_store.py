"""The SQLite file checks of bridge.store (through the directed worker's store): a foreign,
corrupt, newer or unmigratable file is refused and left untouched; a failed commit forgets."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from bridge.errors import StoreError
from workers.directed.store import DirectedStore


def test_foreign_sqlite_file_is_refused_and_untouched(tmp_path: Path):
    path = tmp_path / "directed.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER)")
    before = path.read_bytes()
    with pytest.raises(StoreError, match="did not create"):
        DirectedStore(tmp_path)
    assert path.read_bytes() == before


def test_corrupt_file_is_refused_and_untouched(tmp_path: Path):
    path = tmp_path / "directed.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    before = path.read_bytes()
    with pytest.raises(StoreError, match=r"not a usable SQLite database|cannot be opened"):
        DirectedStore(tmp_path)
    assert path.read_bytes() == before


def test_store_reopens_its_own_file(tmp_path: Path):
    DirectedStore(tmp_path).close()
    DirectedStore(tmp_path).close()


def test_newer_schema_is_refused(tmp_path: Path):
    DirectedStore(tmp_path).close()
    with sqlite3.connect(tmp_path / "directed.sqlite3") as conn:
        conn.execute("UPDATE bridge_meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="newer than this release"):
        DirectedStore(tmp_path)


def test_older_schema_without_a_migration_step_is_refused_and_untouched(tmp_path: Path):
    DirectedStore(tmp_path).close()  # directed has no migrations: version 0 cannot be helped
    path = tmp_path / "directed.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE bridge_meta SET value = '0' WHERE key = 'schema_version'")
    before = path.read_bytes()
    with pytest.raises(StoreError, match="cannot migrate it"):
        DirectedStore(tmp_path)
    assert path.read_bytes() == before


def test_failed_commit_forgets_new_target_numbers(tmp_path: Path):
    """A rolled-back transaction must not leave target numbers the file never got."""
    from bridge.store import transaction
    from workers.directed import model as m
    from workers.directed.store import Batch

    store = DirectedStore(tmp_path)
    ops: list[m.Op] = [m.NewMessage(1, "x", 1, 0, None), m.Enqueue("t1", 1, 1), m.Purge(99)]

    def failing(conn):
        store.apply(conn, [Batch(ops=ops, contents={})])
        raise OSError("disk full")

    with pytest.raises(OSError):
        store.db.run_sync(lambda conn: transaction(conn, failing))
    store.db.run_sync(
        lambda conn: transaction(conn, lambda c: store.apply(c, [Batch(ops=ops, contents={})]))
    )
    details, queues, _ = store.db.run_sync(store.load)
    assert queues == {"t1": [(1, 1)]} and [d.message_id for d in details] == ["x"]
    store.close()
