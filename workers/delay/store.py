"""SQLite persistence of the delay worker: the pending messages, the journal that changes
them, and the reads the loader, the lanes and the control RPC need.

One file, ``<state_dir>/delay/delay.sqlite3``, one table ``pending``: a row per message that
was accepted and not yet confirmed by the broker at its target (or dead-lettered). ``mid`` is
the arrival order. ``topic`` is the message's topic (``BRIDGE_DELAY__TOPIC_BY``, computed at
ingress); ``exchange`` is its target exchange, NULL when it is the topic itself (the default,
and every row of a version 1 file, whose topic was always the target exchange). ``props``
holds the basic properties as the AMQP content header carries them (property flags and
fields, the headers table inside, the control headers stripped): a lane publishes them as
they are, without decoding or encoding anything (version 3). Rows of version 1 and 2 files
hold them as JSON text with the headers table in ``headers``; they are read as such until
they are delivered. The row is the truth; the in-memory scheduler holds only a near-term
window of ``(mid, topic, due, key)`` hints. A lane that finds no row for a hint (cancelled or
replaced while the hint travelled) skips it.

Writes happen on the :class:`bridge.store.Database` writer thread, grouped by
:class:`bridge.store.GroupCommitter`. The loader's window reads run on that same thread, so
"is this new row inside the loaded window?" is decided consistently with what the loader has
read (see :meth:`DelayStore.apply`). Lanes and the control RPC read through their own
read-only connections (WAL lets them read while the writer commits).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import sqlite3
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.amqp import frames
from bridge.sharding import SHARD_COUNT_HINT
from bridge.store import Database

SCHEMA_VERSION = 3
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS pending (
        mid INTEGER PRIMARY KEY,
        due_ms INTEGER NOT NULL,
        topic TEXT NOT NULL,
        routing_key TEXT NOT NULL,
        key TEXT,
        message_id TEXT,
        props BLOB NOT NULL,
        headers BLOB,
        body BLOB NOT NULL,
        exchange TEXT)""",
    # The rowid is appended to every index entry, so this is the (due_ms, mid) order.
    "CREATE INDEX IF NOT EXISTS pending_due ON pending (due_ms)",
    "CREATE INDEX IF NOT EXISTS pending_topic ON pending (topic, due_ms)",
    "CREATE INDEX IF NOT EXISTS pending_key ON pending (key) WHERE key IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS pending_message_id ON pending (message_id)",
)
# Version 1 had no exchange column: its topic was the target exchange (NULL says just that).
# Version 2 stored the properties as JSON text and the headers apart; version 3 stores them
# encoded (new rows only: the column's type is a declaration, SQLite keeps the blob as it is;
# older rows are read as they were written, see fetch_messages). Nothing to rewrite, but a
# release before version 3 must not read a version 3 file.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE pending ADD COLUMN exchange TEXT",),
    2: (),
}
MAX_MID = (1 << 63) - 1
FILE_NAME = "delay.sqlite3"

# AMQP basic properties of a version 1 or 2 row, headers aside: the stored JSON names (the
# first version of the file format used pamqp's names: ``message_type``) and the data path's
# Properties attribute names.
PROP_FIELDS = (
    ("content_type", "content_type"),
    ("content_encoding", "content_encoding"),
    ("delivery_mode", "delivery_mode"),
    ("priority", "priority"),
    ("correlation_id", "correlation_id"),
    ("reply_to", "reply_to"),
    ("expiration", "expiration"),
    ("message_id", "message_id"),
    ("timestamp", "timestamp"),
    ("message_type", "type"),
    ("user_id", "user_id"),
    ("app_id", "app_id"),
)


# ---------------------------------------------------------------- message codec


def stored_properties(
    properties: frames.Properties, headers: dict[str, Any], message_id: str, raw: bytes
) -> bytes:
    """What a row keeps of a delivery's properties, encoded: every basic property as it came
    (``cluster_id`` aside, a field AMQP 0-9-1 deprecated), ``headers`` instead of its headers,
    and ``message_id``. ``raw``: the delivery's properties as received (``properties`` is
    their decoding). Raises :class:`bridge.amqp.frames.EncodeError` for a header value that
    cannot be written again."""
    p = properties
    if (
        p.message_id == message_id
        and p.cluster_id is None
        # an empty string is not sent again (as pamqp): encode those the long way
        and "" not in (p.content_type, p.content_encoding, p.correlation_id, p.reply_to)
        and "" not in (p.expiration, p.type, p.user_id, p.app_id)
    ):
        # the common case: only the headers change; every other field as received
        spliced = frames.replace_headers(raw, headers)
        if spliced is not None:
            return spliced
    # Encoded from the delivery's own object, the three fields swapped in and back: a copy
    # of every property per message cost more than the swap.
    kept = properties.headers, properties.message_id, properties.cluster_id
    properties.headers = headers or None
    properties.message_id, properties.cluster_id = message_id, None
    try:
        return properties.encode()
    finally:
        properties.headers, properties.message_id, properties.cluster_id = kept


def legacy_properties(props: str, headers: bytes | None) -> bytes:
    """The encoded properties of a version 1 or 2 row (JSON text and a headers table)."""
    doc = json.loads(props)
    out = frames.Properties(headers=frames.decode_table(bytes(headers)) if headers else None)
    for stored, attr in PROP_FIELDS:
        value = doc.get(stored)
        if value is None:
            continue
        if stored == "timestamp":
            value = dt.datetime.fromtimestamp(value, dt.UTC)
        setattr(out, attr, value)
    return out.encode()


# ---------------------------------------------------------------- journal ops


@dataclass(slots=True)
class Insert:
    """A newly accepted message. ``in_window`` is decided at commit, on the writer thread."""

    mid: int
    due_ms: int
    topic: str
    routing_key: str
    key: str | None
    message_id: str | None
    props: bytes  # stored_properties()
    body: bytes
    exchange: str | None = None  # the target exchange when it is not ``topic``
    in_window: bool = False

    def read_back(self) -> StoredMessage:
        """The row as a lane reads it back (:func:`fetch_messages`)."""
        return StoredMessage(
            self.mid,
            self.topic if self.exchange is None else self.exchange,
            self.routing_key,
            self.message_id,
            self.props,
            self.body,
        )

    def row(self) -> tuple[Any, ...]:
        return (
            self.mid,
            self.due_ms,
            self.topic,
            self.routing_key,
            self.key,
            self.message_id,
            self.props,
            self.body,
            self.exchange,
        )


@dataclass(slots=True)
class Delete:
    """Rows to remove (confirmed, dead-lettered, replaced or cancelled); ``deleted`` after."""

    rows: list[tuple[int, str]]  # (mid, topic)
    deleted: int = 0


@dataclass(slots=True)
class KeyDelete:
    """A newer message with ``key`` replaces every older stored row with that key, except the
    ``protect``ed ones (in flight, or promised as being sent)."""

    key: str
    below_mid: int
    protect: frozenset[int]
    deleted: int = 0


Op = Insert | Delete | KeyDelete


@dataclass(slots=True)
class Loaded:
    mid: int
    due_ms: int
    topic: str
    key: str | None


@dataclass(slots=True)
class StoredMessage:
    mid: int
    exchange: str  # where it is published when due
    routing_key: str
    message_id: str | None
    properties: bytes  # encoded, as publish() takes them (see stored_properties)
    body: bytes


@dataclass(slots=True)
class Startup:
    next_mid: int
    topic_counts: dict[str, int] = field(default_factory=dict)
    pending: int = 0


# ---------------------------------------------------------------- the store


class DelayStore:
    def __init__(
        self,
        directory: Path,
        *,
        synchronous: str = "FULL",
        cache_mb: int = 16,
        identity: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(directory) / FILE_NAME
        self.db = Database(
            self.path,
            worker="delay",
            schema_version=SCHEMA_VERSION,
            schema=SCHEMA,
            synchronous=synchronous,
            identity=identity,
            identity_defaults={"shard_count": "1", "shard_index": "0"},
            identity_hint=SHARD_COUNT_HINT,
            migrations=MIGRATIONS,
        )
        self.db.run_sync(lambda c: c.execute(f"PRAGMA cache_size=-{cache_mb * 1024}"))
        # Owned by the writer thread: everything at or before this (due_ms, mid) position has
        # been handed to the loader's caller.
        self.window_end: tuple[int, int] = (-1, -1)
        # Writer thread asks the worker whether a new row beyond window_end may still go into
        # memory (a message due now while the window is capped by a backlog).
        self.admit_extra: Callable[[int], bool] = lambda due_ms: False
        # Count changes of the last apply(), taken by the worker after the commit succeeded.
        self.last_deltas: dict[str, int] = {}
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="delay-reader")
        self._reader_conn: sqlite3.Connection = self._reader.submit(
            open_reader, self.path, 8
        ).result()

    # -- writer thread ---------------------------------------------------------------

    def startup(self, conn: sqlite3.Connection) -> Startup:
        top = conn.execute("SELECT max(mid) FROM pending").fetchone()[0]
        counts = {
            topic: n
            for topic, n in conn.execute("SELECT topic, count(*) FROM pending GROUP BY topic")
        }
        return Startup(next_mid=(top or 0) + 1, topic_counts=counts, pending=sum(counts.values()))

    def apply(self, conn: sqlite3.Connection, ops: list[Op]) -> None:
        """Write the journal in order (inside one transaction).

        Rows go in and out with multi-row statements: sqlite3 releases the GIL around every
        statement step, and on a busy process each re-acquisition can wait a whole thread
        switch interval, so one statement per row would make a commit of N rows cost N
        switch intervals.
        """
        deltas: dict[str, int] = {}
        run: list[Insert] = []
        for op in ops:
            if isinstance(op, Insert):
                run.append(op)
                continue
            if run:
                self._insert(conn, run, deltas)
                run = []
            if isinstance(op, Delete):
                by_topic: dict[str, list[int]] = {}
                for mid, topic in op.rows:
                    by_topic.setdefault(topic, []).append(mid)
                op.deleted = 0
                for topic, mids in by_topic.items():
                    n = _delete_mids(conn, mids)
                    op.deleted += n
                    deltas[topic] = deltas.get(topic, 0) - n
            elif isinstance(op, KeyDelete):
                victims = [
                    (mid, topic)
                    for mid, topic in conn.execute(
                        "SELECT mid, topic FROM pending WHERE key = ? AND mid < ?",
                        (op.key, op.below_mid),
                    )
                    if mid not in op.protect
                ]
                op.deleted = _delete_mids(conn, [m for m, _ in victims])
                for _, topic in victims:
                    deltas[topic] = deltas.get(topic, 0) - 1
            else:  # pragma: no cover - a new op type must be handled here
                raise TypeError(f"unknown journal op {op!r}")
        if run:
            self._insert(conn, run, deltas)
        self.last_deltas = deltas

    def _insert(self, conn: sqlite3.Connection, run: list[Insert], deltas: dict[str, int]) -> None:
        for size, start in _chunks(len(run)):
            params: list[Any] = []
            for op in run[start : start + size]:
                params.extend(op.row())
            conn.execute(_insert_sql(size), params)
        end = self.window_end
        for op in run:
            op.in_window = (op.due_ms, op.mid) <= end or self.admit_extra(op.due_ms)
            deltas[op.topic] = deltas.get(op.topic, 0) + 1

    def load(self, conn: sqlite3.Connection, until_due_ms: int, limit: int) -> list[Loaded]:
        """The next rows after ``window_end`` due by ``until_due_ms``, at most ``limit``;
        advances ``window_end`` past them (to ``until_due_ms`` if fewer were found)."""
        if limit <= 0:
            return []
        due, mid = self.window_end
        rows = conn.execute(
            "SELECT mid, due_ms, topic, key FROM pending"
            " WHERE (due_ms, mid) > (?, ?) AND due_ms <= ?"
            " ORDER BY due_ms, mid LIMIT ?",
            (due, mid, until_due_ms, limit),
        ).fetchall()
        if len(rows) < limit:
            self.window_end = max(self.window_end, (until_due_ms, MAX_MID))
        else:
            self.window_end = (rows[-1][1], rows[-1][0])
        topics: dict[str, str] = {}  # one string object per topic keeps the window small
        return [Loaded(m, d, topics.setdefault(t, t), k) for m, d, t, k in rows]

    # -- reader thread (read-only connection) ----------------------------------------

    async def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader, fn, self._reader_conn, *args)

    @staticmethod
    def counts(conn: sqlite3.Connection) -> dict[str, tuple[int, int]]:
        return {
            topic: (n, first)
            for topic, n, first in conn.execute(
                "SELECT topic, count(*), min(due_ms) FROM pending GROUP BY topic"
            )
        }

    @staticmethod
    def page(
        conn: sqlite3.Connection, topic: str, after: tuple[int, int] | None, limit: int
    ) -> list[tuple[int, int, str | None, str, str | None, int, str]]:
        due, mid = after if after is not None else (-1, -1)
        return conn.execute(
            "SELECT mid, due_ms, key, routing_key, message_id, length(body),"
            " coalesce(exchange, topic) FROM pending"
            " WHERE topic = ? AND (due_ms, mid) > (?, ?) ORDER BY due_ms, mid LIMIT ?",
            (topic, due, mid, limit),
        ).fetchall()

    @staticmethod
    def select(conn: sqlite3.Connection, column: str, value: str) -> list[tuple[int, str]]:
        assert column in ("message_id", "key")
        return conn.execute(
            f"SELECT mid, topic FROM pending WHERE {column} = ? ORDER BY mid", (value,)
        ).fetchall()

    def size_bytes(self) -> int:
        return self.db.size_bytes()

    def close(self) -> None:
        def _close(conn: sqlite3.Connection) -> None:
            conn.close()

        try:
            self._reader.submit(_close, self._reader_conn).result()
        finally:
            self._reader.shutdown(wait=True)
        self.db.close()


# Statement sizes for multi-row writes: few distinct statements, so sqlite3's statement
# cache keeps them compiled. 256 rows x 9 columns stays under SQLite's variable limit.
_CHUNK_SIZES = (256, 64, 16, 4, 1)
_COLUMNS = "(mid, due_ms, topic, routing_key, key, message_id, props, body, exchange)"


def _chunks(n: int) -> list[tuple[int, int]]:
    """(size, start) pieces covering ``n`` items with sizes from _CHUNK_SIZES."""
    out, start = [], 0
    for size in _CHUNK_SIZES:
        while n - start >= size:
            out.append((size, start))
            start += size
    return out


@functools.cache
def _insert_sql(rows: int) -> str:
    values = ",".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * rows)
    return f"INSERT INTO pending {_COLUMNS} VALUES {values}"


@functools.cache
def _delete_sql(rows: int) -> str:
    return f"DELETE FROM pending WHERE mid IN ({','.join('?' * rows)})"


@functools.cache
def _fetch_sql(rows: int) -> str:
    return (
        "SELECT mid, coalesce(exchange, topic), routing_key, message_id, props, headers, body"
        f" FROM pending WHERE mid IN ({','.join('?' * rows)})"
    )


def _delete_mids(conn: sqlite3.Connection, mids: list[int]) -> int:
    deleted = 0
    for size, start in _chunks(len(mids)):
        deleted += conn.execute(_delete_sql(size), mids[start : start + size]).rowcount
    return deleted


# ---------------------------------------------------------------- lane reads


def open_reader(path: Path, cache_mb: int = 2) -> sqlite3.Connection:
    """A read-only connection (lanes and the control RPC read while the writer commits)."""
    conn = sqlite3.connect(
        f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
    )
    conn.execute(f"PRAGMA cache_size=-{cache_mb * 1024}")
    conn.execute("PRAGMA query_only=1")
    return conn


def fetch_messages(conn: sqlite3.Connection, mids: Iterable[int]) -> dict[int, StoredMessage]:
    wanted = list(mids)
    out: dict[int, StoredMessage] = {}
    for size, start in _chunks(len(wanted)):  # few distinct statements: they stay compiled
        for mid, exchange, routing_key, message_id, props, headers, body in conn.execute(
            _fetch_sql(size), wanted[start : start + size]
        ):
            out[mid] = StoredMessage(
                mid=mid,
                exchange=exchange,
                routing_key=routing_key,
                message_id=message_id,
                properties=props if isinstance(props, bytes) else legacy_properties(props, headers),
                body=body,
            )
    return out
