"""The delay store (workers.delay.store): the message codec and the journal in SQL."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import sqlite3
from typing import Any

import pamqp.encode
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.amqp.frames import Properties
from workers.delay.store import (
    MAX_MID,
    SCHEMA,
    SCHEMA_VERSION,
    DelayStore,
    Delete,
    Insert,
    KeyDelete,
    _chunks,
    fetch_messages,
    legacy_properties,
    open_reader,
    stored_properties,
)

NOW = 1_700_000_000_000
HORIZON = 60_000


# ---------------------------------------------------------------- message codec


HEADERS = {
    "s": "text",
    "n": 42,
    "big": 2**40,
    "f": 1.5,
    "b": True,
    "none": None,
    "bin": b"\xff\x00",  # a non-UTF-8 long string decodes as bytes (as pamqp does)
    "list": [1, "two", b"\xfe"],
    "nested": {"a": {"b": [1]}},
    "ts": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
    "dec": decimal.Decimal("1.25"),
}
INCOMING = Properties(
    content_type="text/plain",
    content_encoding="gzip",
    delivery_mode=2,
    correlation_id="c",
    message_id="m",
    type="t",
    user_id="guest",
    app_id="a",
    expiration="1001",
    timestamp=dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC),
    headers={"x-delay": 5},
    cluster_id="deprecated",
)


def test_stored_properties_are_the_delivery_s_with_its_carried_headers_and_id() -> None:
    raw = INCOMING.encode()
    stored = stored_properties(INCOMING, HEADERS, "m2", raw)
    back = Properties.decode(stored)
    assert back.headers == HEADERS  # types kept, binary values stay long strings of bytes
    assert back == INCOMING.copy(headers=HEADERS, message_id="m2", cluster_id=None)
    assert stored == back.encode()  # what a lane publishes, byte for byte
    assert Properties.decode(stored_properties(INCOMING, {}, "m", raw)).headers is None
    assert INCOMING.headers == {"x-delay": 5}  # the delivery itself is left as it came


@pytest.mark.parametrize(
    "changes",
    [
        {},  # only the headers change: the received bytes are spliced
        {"message_id": None},  # an id is given to it
        {"cluster_id": "old"},  # a deprecated field is dropped
        {"content_type": ""},  # an empty string is not sent again
        {"headers": None},
    ],
)
def test_stored_properties_are_the_same_bytes_whichever_way_they_are_built(
    changes: dict[str, Any],
) -> None:
    incoming = INCOMING.copy(**{"cluster_id": None, **changes})
    # what the broker delivers: an empty string on the wire, which decodes as one
    raw = incoming.encode() if incoming.content_type != "" else _with_empty_content_type(incoming)
    decoded = Properties.decode(raw)
    stored = stored_properties(decoded, HEADERS, "m", raw)
    assert stored == decoded.copy(headers=HEADERS, message_id="m", cluster_id=None).encode()


def _with_empty_content_type(props: Properties) -> bytes:
    rest = props.copy(content_type=None).encode()
    flags = int.from_bytes(rest[:2], "big") | 0x8000
    return flags.to_bytes(2, "big") + b"\x00" + rest[2:]


def test_a_version_2_row_reads_as_the_properties_it_was_stored_from() -> None:
    # as the version 2 code wrote them: JSON with pamqp's property names, headers apart
    props = json.dumps(
        {
            "content_type": "text/plain",
            "content_encoding": "gzip",
            "delivery_mode": 2,
            "correlation_id": "c",
            "expiration": "1001",
            "message_id": "m",
            "timestamp": 1714979289,
            "message_type": "t",
            "user_id": "guest",
            "app_id": "a",
        }
    )
    headers = bytes(pamqp.encode.field_table({"s": "x", "n": 1}))
    expected = INCOMING.copy(headers={"s": "x", "n": 1}, cluster_id=None)
    assert Properties.decode(legacy_properties(props, headers)) == expected
    assert legacy_properties(props, headers) == expected.encode()
    assert Properties.decode(legacy_properties('{"message_id": "m"}', None)) == Properties(
        message_id="m"
    )


# ---------------------------------------------------------------- journal in SQL


def _store(tmp_path) -> DelayStore:
    return DelayStore(tmp_path)


def _insert(mid: int, due: int, topic: str = "t", key: str | None = None) -> Insert:
    return Insert(mid, due, topic, "rk", key, f"m{mid}", PROPS, b"x")


PROPS = Properties(delivery_mode=2).encode()


def test_apply_inserts_deletes_and_key_replacement(tmp_path) -> None:
    store = _store(tmp_path)
    try:
        db = store.db
        ops = [
            _insert(i, 1000 + i, "a" if i % 2 else "b", key="k" if i < 4 else None)
            for i in range(1, 301)
        ]
        db.run_sync(lambda c: _apply(store, c, ops))
        assert store.last_deltas == {"a": 150, "b": 150}
        assert not any(op.in_window for op in ops), "nothing is loaded yet"
        # a newer key holder replaces older rows, except the protected (in flight) one
        kd = KeyDelete("k", 400, frozenset({2}))
        db.run_sync(lambda c: _apply(store, c, [kd, _insert(400, 5, key="k")]))
        assert kd.deleted == 2
        assert store.last_deltas == {"a": -2, "t": 1}
        d = Delete([(mid, "a" if mid % 2 else "b") for mid in range(5, 300)] + [(10**6, "zz")])
        db.run_sync(lambda c: _apply(store, c, [d]))
        assert d.deleted == 295
        left = db.run_sync(
            lambda c: [r[0] for r in c.execute("SELECT mid FROM pending ORDER BY mid")]
        )
        assert left == [2, 4, 300, 400]
    finally:
        store.close()


def _apply(store: DelayStore, conn: sqlite3.Connection, ops: list) -> None:
    conn.execute("BEGIN")
    store.apply(conn, ops)
    conn.execute("COMMIT")


def test_load_pages_in_due_order_and_marks_new_rows_inside_the_window(tmp_path) -> None:
    store = _store(tmp_path)
    try:
        rows = [_insert(i, (i * 37) % 50) for i in range(1, 101)]
        store.db.run_sync(lambda c: _apply(store, c, rows))
        first = store.db.run_sync(store.load, 20, 30)
        assert [(r.due_ms, r.mid) for r in first] == sorted((r.due_ms, r.mid) for r in first)
        assert len(first) == 30 and store.window_end == (first[-1].due_ms, first[-1].mid)
        rest = store.db.run_sync(store.load, 20, 1000)
        assert store.window_end == (20, MAX_MID)
        seen = [(r.due_ms, r.mid) for r in first + rest]
        assert seen == sorted(seen) and all(d <= 20 for d, _ in seen)
        assert len(seen) == len({(r.due_ms, r.mid) for r in rows if r.due_ms <= 20})
        new = [_insert(500, 10), _insert(501, 21)]
        store.db.run_sync(lambda c: _apply(store, c, new))
        assert [op.in_window for op in new] == [True, False]
        later = store.db.run_sync(store.load, 30, 1000)
        assert 501 in [r.mid for r in later] and 500 not in [r.mid for r in later]
    finally:
        store.close()


@given(st.integers(0, 5000))
def test_chunks_cover_exactly(n: int) -> None:
    pieces = _chunks(n)
    assert sum(size for size, _ in pieces) == n
    starts = [start for _, start in pieces]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)


def test_schema_statements_are_idempotent() -> None:
    conn = sqlite3.connect(":memory:")
    for _ in range(2):
        for statement in SCHEMA:
            conn.execute(statement)
    conn.close()


# The file a release before TOPIC_BY wrote (schema version 1), as it wrote it.
V1_SCHEMA = (
    """CREATE TABLE bridge_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    """CREATE TABLE pending (
        mid INTEGER PRIMARY KEY,
        due_ms INTEGER NOT NULL,
        topic TEXT NOT NULL,
        routing_key TEXT NOT NULL,
        key TEXT,
        message_id TEXT,
        props TEXT NOT NULL,
        headers BLOB,
        body BLOB NOT NULL)""",
    "CREATE INDEX pending_due ON pending (due_ms)",
    "CREATE INDEX pending_topic ON pending (topic, due_ms)",
    "CREATE INDEX pending_key ON pending (key) WHERE key IS NOT NULL",
    "CREATE INDEX pending_message_id ON pending (message_id)",
    "INSERT INTO bridge_meta VALUES ('worker', 'delay'), ('schema_version', '1')",
)


def write_v1_file(directory, rows: list[tuple[int, int, str]]) -> None:
    """A version 1 state file with ``(mid, due_ms, topic)`` rows (topic = target exchange)."""
    directory.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(directory / "delay.sqlite3")
    for statement in V1_SCHEMA:
        conn.execute(statement)
    conn.executemany(
        "INSERT INTO pending VALUES (?, ?, ?, 'rk', NULL, ?, json_object('message_id', ?4), NULL, x'6869')",
        [(mid, due, topic, f"m{mid}") for mid, due, topic in rows],
    )
    conn.commit()
    conn.close()


def test_a_version_1_file_is_migrated_and_its_rows_keep_their_exchange(tmp_path) -> None:
    write_v1_file(tmp_path, [(1, 1000, "orders"), (2, 2000, "billing")])
    store = DelayStore(tmp_path)
    try:
        assert store.db.migrated_from == 1
        version = store.db.run_sync(
            lambda c: c.execute(
                "SELECT value FROM bridge_meta WHERE key = 'schema_version'"
            ).fetchone()[0]
        )
        assert version == str(SCHEMA_VERSION) == "3"
        new = _insert(3, 3000, "acme")
        new.exchange = "orders"
        store.db.run_sync(lambda c: _apply(store, c, [new]))
        reader = open_reader(store.path)
        try:
            rows = fetch_messages(reader, [1, 2, 3])
            assert {m: (r.exchange, r.body) for m, r in rows.items()} == {
                1: ("orders", b"hi"),
                2: ("billing", b"hi"),
                3: ("orders", b"x"),
            }
            assert DelayStore.counts(reader) == {
                "orders": (1, 1000),
                "billing": (1, 2000),
                "acme": (1, 3000),
            }
            assert [r[-1] for r in DelayStore.page(reader, "acme", None, 10)] == ["orders"]
        finally:
            reader.close()
    finally:
        store.close()
    reopened = DelayStore(tmp_path)  # now a version 3 file: nothing more to migrate
    assert reopened.db.migrated_from is None
    reopened.close()


def write_v2_file(directory, rows: list[tuple[int, int, str, str, bytes | None]]) -> None:
    """A version 2 state file as the release before encoded properties wrote it, with
    ``(mid, due_ms, topic, props JSON, headers table)`` rows."""
    directory.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(directory / "delay.sqlite3")
    for statement in V1_SCHEMA[:-1]:
        conn.execute(statement)
    conn.execute("ALTER TABLE pending ADD COLUMN exchange TEXT")
    conn.execute("INSERT INTO bridge_meta VALUES ('worker', 'delay'), ('schema_version', '2')")
    conn.executemany(
        "INSERT INTO pending (mid, due_ms, topic, routing_key, key, message_id, props, headers,"
        " body, exchange) VALUES (?, ?, ?, 'rk', NULL, ?, ?, ?, x'6869', NULL)",
        [(mid, due, topic, f"m{mid}", props, headers) for mid, due, topic, props, headers in rows],
    )
    conn.commit()
    conn.close()


def test_a_version_2_file_is_migrated_and_its_rows_publish_their_stored_properties(
    tmp_path,
) -> None:
    table = bytes(pamqp.encode.field_table({"tenant": "acme", "n": 7}))
    write_v2_file(
        tmp_path,
        [
            (1, 1000, "orders", '{"message_id":"m1","delivery_mode":2,"user_id":"u"}', table),
            (2, 2000, "billing", '{"message_id":"m2","content_type":"a/b"}', None),
        ],
    )
    store = DelayStore(tmp_path)
    try:
        assert store.db.migrated_from == 2
        new = _insert(3, 3000, "orders")
        incoming = Properties(message_id="m3", headers={"x-delay": 1})
        new.props = stored_properties(incoming, {"k": b"\xff"}, "m3", incoming.encode())
        store.db.run_sync(lambda c: _apply(store, c, [new]))
        reader = open_reader(store.path)
        try:
            rows = fetch_messages(reader, [1, 2, 3])
        finally:
            reader.close()
        decoded = {mid: Properties.decode(r.properties) for mid, r in rows.items()}
        assert decoded == {
            1: Properties(
                message_id="m1", delivery_mode=2, user_id="u", headers={"tenant": "acme", "n": 7}
            ),
            2: Properties(message_id="m2", content_type="a/b"),
            3: Properties(message_id="m3", headers={"k": b"\xff"}),
        }
        assert {m: (r.exchange, r.body, r.message_id) for m, r in rows.items()} == {
            1: ("orders", b"hi", "m1"),
            2: ("billing", b"hi", "m2"),
            3: ("orders", b"x", "m3"),
        }
    finally:
        store.close()
    reopened = DelayStore(tmp_path)
    assert reopened.db.migrated_from is None
    reopened.close()
