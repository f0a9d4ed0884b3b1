"""SQLite persistence of the directed worker: applies the core's journal, loads it back.

Layout (one file, ``<state_dir>/directed/directed.sqlite3``):

- ``messages``: one detail record per message: counters, expiry, properties and the content
  (set to NULL once no target needs it; the row stays as a tombstone for status queries and
  de-duplication until the retention window passes);
- ``targets``: target name -> small integer, so the per-target rows stay small (the worker
  keeps the mapping in memory; numbers are allocated by the writer thread);
- ``entries``: the per-target ID-only queues, ``(target, seq) -> message``, WITHOUT ROWID
  so one extra target of a request costs one short b-tree cell;
- ``buffers``: the unacknowledged batch per target with its record id;
- ``gaps``: per target, the ids it lost (dropped or expired before it got them) and has not
  acknowledged: slot 0 the gap since its last batch, slot 1 the gap its unacknowledged batch
  reports. A table of its own, so files written before it existed open unchanged.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.sharding import SHARD_COUNT_HINT
from bridge.store import Database
from workers.directed import model as m

SCHEMA_VERSION = 1
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS messages (
        mid INTEGER PRIMARY KEY,
        message_id TEXT NOT NULL UNIQUE,
        total INTEGER NOT NULL,
        remaining INTEGER NOT NULL,
        acked INTEGER NOT NULL DEFAULT 0,
        expired INTEGER NOT NULL DEFAULT 0,
        dropped INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL,
        expires_ms INTEGER,
        done_ms INTEGER,
        props TEXT,
        body BLOB)""",
    # WITHOUT ROWID keyed by name: the name is stored once (a rowid table plus a UNIQUE
    # index stores it twice, which was most of the cost of a new target).
    """CREATE TABLE IF NOT EXISTS targets (
        name TEXT PRIMARY KEY, tid INTEGER NOT NULL) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS entries (
        tid INTEGER NOT NULL, seq INTEGER NOT NULL, mid INTEGER NOT NULL,
        PRIMARY KEY (tid, seq)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS buffers (
        tid INTEGER PRIMARY KEY, record_id TEXT NOT NULL, mids TEXT NOT NULL)""",
    # messages recalled (the count of targets they were taken back from): a table of its own
    # so that files written before recall existed open unchanged
    """CREATE TABLE IF NOT EXISTS recalls (
        mid INTEGER PRIMARY KEY, recalled INTEGER NOT NULL)""",
    # named target groups (workers.directed.groups): name -> JSON array of target names
    """CREATE TABLE IF NOT EXISTS target_groups (
        name TEXT PRIMARY KEY, targets TEXT NOT NULL) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS gaps (
        tid INTEGER NOT NULL, slot INTEGER NOT NULL, missed INTEGER NOT NULL, ids TEXT NOT NULL,
        PRIMARY KEY (tid, slot)) WITHOUT ROWID""",
)
GAP_PENDING, GAP_BUFFER = 0, 1


@dataclass(slots=True)
class Content:
    body: bytes
    props: dict[str, Any]


@dataclass(slots=True)
class Batch:
    """What one group commit writes: journal ops plus the content of new messages."""

    ops: list[m.Op]
    contents: dict[int, Content]
    # group name -> its members after a change (None: the group is gone)
    groups: dict[str, list[str] | None] = field(default_factory=dict)


class DirectedStore:
    def __init__(
        self,
        directory: Path,
        *,
        synchronous: str = "FULL",
        identity: dict[str, str] | None = None,
    ) -> None:
        self.db = Database(
            directory / "directed.sqlite3",
            worker="directed",
            schema_version=SCHEMA_VERSION,
            schema=SCHEMA,
            synchronous=synchronous,
            identity=identity,
            identity_defaults={"shard_count": "1", "shard_index": "0"},
            identity_hint=SHARD_COUNT_HINT,
        )
        # Owned by the writer thread: every access goes through db.run / run_sync.
        self._tids: dict[str, int] = {}
        # Names numbered by the last apply() and the first number it handed out: that
        # transaction may still fail at COMMIT, after apply() returned.
        self._created: list[str] = []
        self._created_from = 1
        self.db.run_sync(self._load_tids)

    def _load_tids(self, conn: sqlite3.Connection) -> None:
        self._tids = dict(conn.execute("SELECT name, tid FROM targets"))
        self._next_tid = max(self._tids.values(), default=0) + 1

    def _tid(self, conn: sqlite3.Connection, name: str) -> int:
        tid = self._tids.get(name)
        if tid is None:
            tid = self._new_tids(conn, [name])[0]
        return tid

    def _new_tids(self, conn: sqlite3.Connection, names: list[str]) -> list[int]:
        rows = []
        for name in names:
            rows.append((name, self._next_tid))
            self._tids[name] = self._next_tid
            self._created.append(name)
            self._next_tid += 1
        conn.executemany("INSERT INTO targets (name, tid) VALUES (?, ?)", rows)
        return [tid for _, tid in rows]

    def apply(self, conn: sqlite3.Connection, batches: list[Batch]) -> None:
        """Write the journal in order (called inside one transaction)."""
        self._forget_unwritten(conn)
        self._created_from = self._next_tid
        try:
            self._apply(conn, batches)
        except BaseException:
            # The transaction rolls back: forget target numbers it would have created, or
            # the retry would reference targets that were never written.
            self._forget_created()
            raise

    def _forget_unwritten(self, conn: sqlite3.Connection) -> None:
        """Forget the numbers of the previous apply() if its transaction did not commit.

        A full or read-only disk usually fails the COMMIT, after apply() returned; the
        retry would then write queue entries for target numbers the file never got, and
        the next start could not load them. One transaction is all or nothing, so looking
        up the last name it numbered tells.
        """
        if not self._created:
            return
        last = self._created[-1]
        if conn.execute("SELECT 1 FROM targets WHERE name = ?", (last,)).fetchone() is None:
            self._forget_created()
        self._created = []

    def _forget_created(self) -> None:
        for name in self._created:
            self._tids.pop(name, None)
        self._next_tid = self._created_from
        self._created = []

    def _apply(self, conn: sqlite3.Connection, batches: list[Batch]) -> None:
        tids = self._tids
        fresh = [
            op.target
            for batch in batches
            for op in batch.ops
            if isinstance(op, m.Enqueue) and op.target not in tids
        ]
        if fresh:
            self._new_tids(conn, list(dict.fromkeys(fresh)))
        # Counts are absolute: only the last of each message in this transaction is written
        # (10,000 targets acknowledging the same message in one commit: one UPDATE).
        last_counts = {
            op.mid: op for batch in batches for op in batch.ops if isinstance(op, m.Counts)
        }
        enqueue: list[tuple[int, int, int]] = []
        for batch in batches:
            for op in batch.ops:
                if isinstance(op, m.Enqueue):
                    enqueue.append((tids[op.target], op.seq, op.mid))
                    continue
                if isinstance(op, m.Counts) and last_counts[op.mid] is not op:
                    continue
                if enqueue:  # keep order: flush the run of enqueues before any other op
                    conn.executemany("INSERT INTO entries VALUES (?, ?, ?)", enqueue)
                    enqueue = []
                self._apply_one(conn, op, batch.contents)
        if enqueue:
            conn.executemany("INSERT INTO entries VALUES (?, ?, ?)", enqueue)
        for batch in batches:
            for name, members in batch.groups.items():
                if members is None:
                    conn.execute("DELETE FROM target_groups WHERE name = ?", (name,))
                else:
                    conn.execute(
                        "INSERT OR REPLACE INTO target_groups VALUES (?, ?)",
                        (name, json.dumps(members)),
                    )

    def _apply_one(
        self, conn: sqlite3.Connection, op: m.Op, contents: Mapping[int, Content]
    ) -> None:
        if isinstance(op, m.NewMessage):
            content = contents.get(op.mid)
            conn.execute(
                "INSERT INTO messages (mid, message_id, total, remaining, created_ms, expires_ms,"
                " props, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    op.mid,
                    op.message_id,
                    op.total,
                    op.total,
                    op.created_ms,
                    op.expires_at_ms,
                    json.dumps(content.props, default=str) if content else None,
                    content.body if content else None,
                ),
            )
        elif isinstance(op, m.Dequeue):
            conn.execute(
                "DELETE FROM entries WHERE tid = ? AND seq <= ?",
                (self._tid(conn, op.target), op.upto_seq),
            )
        elif isinstance(op, m.SetBuffer):
            tid = self._tid(conn, op.target)
            conn.execute(
                "INSERT OR REPLACE INTO buffers VALUES (?, ?, ?)",
                (tid, op.record_id, json.dumps(list(op.mids))),
            )
            if op.missed:  # else there is no gap of the buffer to remove (see SetBuffer)
                self._set_gap(conn, tid, GAP_BUFFER, op.missed, op.missed_ids)
        elif isinstance(op, m.SetGap):
            self._set_gap(conn, self._tid(conn, op.target), GAP_PENDING, op.missed, op.missed_ids)
        elif isinstance(op, m.ClearBuffer):
            tid = self._tid(conn, op.target)
            conn.execute("DELETE FROM buffers WHERE tid = ?", (tid,))
            conn.execute("DELETE FROM gaps WHERE tid = ? AND slot = ?", (tid, GAP_BUFFER))
        elif isinstance(op, m.Counts):
            conn.execute(
                "UPDATE messages SET remaining = ?, acked = ?, expired = ?, dropped = ? WHERE mid = ?",
                (op.remaining, op.acked, op.expired, op.dropped, op.mid),
            )
            if op.recalled:
                conn.execute("INSERT OR REPLACE INTO recalls VALUES (?, ?)", (op.mid, op.recalled))
        elif isinstance(op, m.DeleteContent):
            conn.execute(
                "UPDATE messages SET done_ms = ?, body = NULL, props = NULL WHERE mid = ?",
                (op.done_ms, op.mid),
            )
        elif isinstance(op, m.Purge):
            conn.execute("DELETE FROM messages WHERE mid = ?", (op.mid,))
            conn.execute("DELETE FROM recalls WHERE mid = ?", (op.mid,))
        else:  # pragma: no cover - a new op type must be handled here
            raise TypeError(f"unknown journal op {op!r}")

    @staticmethod
    def _set_gap(
        conn: sqlite3.Connection, tid: int, slot: int, missed: int, ids: tuple[str, ...]
    ) -> None:
        if missed:
            conn.execute(
                "INSERT OR REPLACE INTO gaps VALUES (?, ?, ?, ?)",
                (tid, slot, missed, json.dumps(list(ids))),
            )
        else:
            conn.execute("DELETE FROM gaps WHERE tid = ? AND slot = ?", (tid, slot))

    # -- reads -------------------------------------------------------------------------

    def load(
        self, conn: sqlite3.Connection
    ) -> tuple[list[m.Detail], dict[str, list[tuple[int, int]]], dict[str, m.Buffer]]:
        details = [
            m.Detail(
                mid=row[0],
                message_id=row[1],
                total=row[2],
                remaining=row[3],
                acked=row[4],
                expired=row[5],
                dropped=row[6],
                created_ms=row[7],
                expires_at_ms=row[8],
                done_ms=row[9],
                recalled=row[10],
            )
            for row in conn.execute(
                "SELECT m.mid, message_id, total, remaining, acked, expired, dropped, created_ms,"
                " expires_ms, done_ms, coalesce(r.recalled, 0)"
                " FROM messages m LEFT JOIN recalls r ON r.mid = m.mid ORDER BY m.mid"
            )
        ]
        names = {tid: name for name, tid in self._tids.items()}
        queues: dict[str, list[tuple[int, int]]] = {}
        for tid, seq, mid in conn.execute("SELECT tid, seq, mid FROM entries ORDER BY tid, seq"):
            queues.setdefault(names[tid], []).append((seq, mid))
        gaps = self._gaps(conn, GAP_BUFFER)
        buffers = {}
        for tid, record_id, mids in conn.execute("SELECT tid, record_id, mids FROM buffers"):
            missed, ids = gaps.get(tid, (0, []))
            buffers[names[tid]] = m.Buffer(record_id, tuple(json.loads(mids)), missed, tuple(ids))
        return details, queues, buffers

    @staticmethod
    def load_groups(conn: sqlite3.Connection) -> dict[str, list[str]]:
        return {
            name: json.loads(targets)
            for name, targets in conn.execute("SELECT name, targets FROM target_groups")
        }

    def load_gaps(self, conn: sqlite3.Connection) -> dict[str, tuple[int, list[str]]]:
        """Each target's gap since its last batch (those of batches come with load())."""
        names = {tid: name for name, tid in self._tids.items()}
        return {names[tid]: gap for tid, gap in self._gaps(conn, GAP_PENDING).items()}

    @staticmethod
    def _gaps(conn: sqlite3.Connection, slot: int) -> dict[int, tuple[int, list[str]]]:
        rows = conn.execute("SELECT tid, missed, ids FROM gaps WHERE slot = ?", (slot,))
        return {tid: (missed, json.loads(ids)) for tid, missed, ids in rows}

    @staticmethod
    def contents(conn: sqlite3.Connection, mids: Iterable[int]) -> dict[int, Content]:
        wanted = list(mids)
        out: dict[int, Content] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for mid, props, body in conn.execute(
                f"SELECT mid, props, body FROM messages WHERE mid IN ({marks}) AND body IS NOT NULL",
                chunk,
            ):
                out[mid] = Content(body=bytes(body), props=json.loads(props) if props else {})
        return out

    def close(self) -> None:
        self.db.close()
