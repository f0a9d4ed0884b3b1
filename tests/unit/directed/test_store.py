"""Disk faults at the SQLite layer, without a broker: a commit that fails (full or read-only
disk) loses nothing, leaves nothing half-written and does not stop the next commit."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from bridge.store import GroupCommitter, transaction
from tests.unit.directed.replay import ReplayStore
from workers.directed import model as m
from workers.directed.core import DirectedCore
from workers.directed.store import Batch, Content, DirectedStore


class CommitFails:
    """A connection whose COMMITs fail like a full disk fails them.

    ``rolled_back``: SQLite rolled the transaction back itself (SQLITE_FULL usually does);
    otherwise the transaction is left open, which SQLite also allows.
    """

    def __init__(self, conn: sqlite3.Connection, *, rolled_back: bool) -> None:
        self._conn = conn
        self.rolled_back = rolled_back

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT":
            if self.rolled_back:
                self._conn.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:
        return self._conn.executemany(sql, *args)


def _batch(*ops: m.Op) -> list[Batch]:
    return [Batch(ops=list(ops), contents={})]


@pytest.mark.parametrize("rolled_back", [True, False])
def test_commit_failure_after_apply_forgets_target_numbers(tmp_path: Path, rolled_back: bool):
    """The COMMIT fails after apply() returned: the retry must write the target rows too,
    or the next start cannot map its queue entries back to names."""
    store = DirectedStore(tmp_path)
    ops = _batch(m.NewMessage(1, "x", 2, 0, None), m.Enqueue("t1", 1, 1), m.Enqueue("t2", 1, 1))

    def failing(conn: sqlite3.Connection) -> None:
        transaction(CommitFails(conn, rolled_back=rolled_back), lambda c: store.apply(c, ops))  # type: ignore[arg-type]

    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        store.db.run_sync(failing)
    assert not store.db.conn.in_transaction, "a failed COMMIT must not leave the transaction open"
    store.db.run_sync(lambda conn: transaction(conn, lambda c: store.apply(c, ops)))
    store.close()

    reopened = DirectedStore(tmp_path)
    details, queues, _ = reopened.db.run_sync(reopened.load)
    assert queues == {"t1": [(1, 1)], "t2": [(1, 1)]}
    assert [d.message_id for d in details] == ["x"]
    reopened.close()


def test_successful_commit_keeps_target_numbers(tmp_path: Path):
    store = DirectedStore(tmp_path)
    first = _batch(m.NewMessage(1, "a", 1, 0, None), m.Enqueue("t1", 1, 1))
    second = _batch(m.NewMessage(2, "b", 1, 0, None), m.Enqueue("t1", 2, 2), m.Enqueue("t2", 1, 2))
    for ops in (first, second):
        store.db.run_sync(lambda conn, ops=ops: transaction(conn, lambda c: store.apply(c, ops)))
    store.close()
    reopened = DirectedStore(tmp_path)
    _, queues, _ = reopened.db.run_sync(reopened.load)
    assert queues == {"t1": [(1, 1), (2, 2)], "t2": [(1, 2)]}
    reopened.close()


def test_full_database_error_is_reported_not_masked(tmp_path: Path):
    """SQLITE_FULL rolls back by itself; the error seen must still be 'disk is full'."""
    store = DirectedStore(tmp_path)
    conn = store.db.conn
    pages = store.db.run_sync(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
    store.db.run_sync(lambda c: c.execute(f"PRAGMA max_page_count = {pages + 1}"))
    big = Batch(
        ops=[m.NewMessage(1, "big", 1, 0, None), m.Enqueue("t", 1, 1)],
        contents={1: Content(body=b"x" * 200_000, props={})},
    )
    with pytest.raises(sqlite3.OperationalError, match="full"):
        store.db.run_sync(lambda c: transaction(c, lambda cc: store.apply(cc, [big])))
    assert not conn.in_transaction
    store.close()


async def test_group_committer_holds_barriers_while_failing_and_recovers(tmp_path: Path):
    store = DirectedStore(tmp_path)
    pages = store.db.run_sync(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
    store.db.run_sync(lambda c: c.execute(f"PRAGMA max_page_count = {pages + 1}"))
    journal: list[Batch] = [
        Batch(
            ops=[m.NewMessage(1, "big", 1, 0, None), m.Enqueue("new-target", 1, 1)],
            contents={1: Content(body=b"x" * 200_000, props={})},
        )
    ]

    def take() -> list[Batch]:
        out, journal[:] = list(journal), []
        return out

    committer = GroupCommitter(store.db, take, store.apply)
    committer.start()
    barrier = committer.barrier()
    for _ in range(200):
        if committer.failing:
            break
        await asyncio.sleep(0.01)
    assert committer.failing and "full" in committer.failing
    assert committer.failures >= 1
    assert not barrier.done(), "nothing may be acknowledged while the commit fails"
    await store.db.run(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))
    await asyncio.wait_for(barrier, 10)
    assert committer.failing is None
    await committer.close()
    store.close()
    reopened = DirectedStore(tmp_path)
    details, queues, _ = reopened.db.run_sync(reopened.load)
    assert queues == {"new-target": [(1, 1)]} and [d.message_id for d in details] == ["big"]
    assert reopened.db.run_sync(lambda c: reopened.contents(c, [1]))[1].body == b"x" * 200_000
    reopened.close()


@pytest.mark.parametrize("seed", range(8))
def test_store_file_matches_the_journal_replayed(tmp_path: Path, seed: int):
    """Random pulls (acknowledging, resending, with gaps from drop-head and expiry) committed
    in random groups: the SQLite file loads back as the journal contract says (ReplayStore),
    although the store writes only the last counters of a message per commit and replaces an
    acknowledged batch without deleting it first."""
    rng = random.Random(seed)
    core = DirectedCore(queue_limit=3, max_batch=4)
    replay = ReplayStore()
    store = DirectedStore(tmp_path)
    targets = ["a", "b", "c"]
    cursors: dict[str, str | None] = dict.fromkeys(targets)
    pending: list[m.Op] = []
    now = 0
    for step in range(300):
        now += rng.randint(0, 30)
        roll = rng.random()
        if roll < 0.35:
            chosen = rng.sample(targets, rng.randint(1, 3))
            core.submit(f"m{step}", chosen, now, rng.choice([None, 50, 400]))
        elif roll < 0.9:
            t = rng.choice(targets)
            sent = cursors[t] if rng.random() < 0.85 else "stale"
            result = core.pull(t, sent, rng.randint(0, 4), now, f"r{step}")
            cursors[t] = result.record_id
        else:
            core.expire(now)
        ops = core.take_journal()
        replay.apply(ops)
        pending += ops
        if rng.random() < 0.3:
            batch = [Batch(ops=pending, contents={})]
            store.db.run_sync(lambda c, b=batch: transaction(c, lambda cc: store.apply(cc, b)))
            pending = []
    batch = [Batch(ops=pending, contents={})]
    store.db.run_sync(lambda c: transaction(c, lambda cc: store.apply(cc, batch)))
    store.close()
    reopened = DirectedStore(tmp_path)
    details, queues, buffers = reopened.db.run_sync(reopened.load)
    gaps = reopened.db.run_sync(reopened.load_gaps)
    reopened.close()
    assert {d.mid: d for d in details} == replay.details
    assert queues == {t: sorted(q.items()) for t, q in replay.queues.items()}
    assert buffers == replay.buffers
    assert {t: (n, tuple(ids)) for t, (n, ids) in gaps.items()} == replay.gaps
