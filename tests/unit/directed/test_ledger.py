"""The directed ledger (workers.directed.ledger) on a real SQLite file, without a broker:
replies sent from commit callbacks never run ahead of the commit, and the cache of encoded
messages answers what the store holds."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

from workers.directed.core import DirectedCore
from workers.directed.groups import Groups
from workers.directed.ledger import ContentCache, Ledger
from workers.directed.replies import encode_message
from workers.directed.store import Content, DirectedStore


def _ledger(tmp_path: Path, cache_bytes: int = 1 << 20) -> Ledger:
    store = DirectedStore(tmp_path)
    return Ledger(
        store, DirectedCore(), Groups({}, max_size=10), cache_bytes=cache_bytes, on_commit=_ignore
    )


def _ignore(_items: int, _seconds: float) -> None:
    pass


def _accept(ledger: Ledger, message_id: str) -> int:
    result = ledger.core.submit(message_id, ["t"], 0, None)
    assert result.mid is not None
    ledger.add_content(result.mid, Content(message_id.encode(), {}))
    return result.mid


def _stored(path: Path, message_id: str) -> bool:
    with sqlite3.connect(path) as conn:
        row = conn.execute("SELECT 1 FROM messages WHERE message_id = ?", (message_id,))
        return row.fetchone() is not None


async def test_a_callback_runs_only_after_the_commit_of_what_was_journaled_before_it(
    tmp_path: Path,
):
    """A callback added while a commit is already being written waits for the next one:
    the reply it sends never names a state that a crash could forget."""
    ledger = _ledger(tmp_path)
    path = ledger.store.db.path
    gate = threading.Event()
    writing = threading.Event()
    apply = ledger.committer.apply

    def slow_apply(conn: sqlite3.Connection, items: list) -> None:  # type: ignore[type-arg]
        writing.set()
        gate.wait(10)
        apply(conn, items)

    ledger.committer.apply = slow_apply
    ledger.committer.start()
    seen: list[tuple[str, bool, BaseException | None]] = []
    try:
        _accept(ledger, "a")
        ledger.on_committed(lambda e: seen.append(("a", _stored(path, "a"), e)))
        await asyncio.to_thread(writing.wait, 10)  # "a" is being written
        _accept(ledger, "b")
        ledger.on_committed(lambda e: seen.append(("b", _stored(path, "b"), e)))
        ledger.on_committed(lambda e: seen.append(("b2", _stored(path, "b"), e)))
        gate.set()
        for _ in range(200):
            if len(seen) == 3:
                break
            await asyncio.sleep(0.01)
        assert seen == [("a", True, None), ("b", True, None), ("b2", True, None)]
        assert ledger.committer.commits >= 2
    finally:
        gate.set()
        await ledger.committer.close()
        ledger.store.close()


def test_cache_encodes_a_message_once_and_counts_it():
    cache = ContentCache(10_000)
    cache.put(1, Content(b"x" * 100, {"content_type": "a/b", "headers": {"k": "v"}}))
    before = cache.bytes
    first = cache.encoded(1, "m1")
    assert first == encode_message("m1", b"x" * 100, {"content_type": "a/b", "headers": {"k": "v"}})
    assert cache.encoded(1, "m1") is first
    assert cache.bytes == before + len(first)
    cache.drop(1)
    assert cache.bytes == 0
    assert cache.encoded(1, "m1") is None


def test_cache_stays_within_its_bytes_when_encodings_are_added():
    cache = ContentCache(2_000)
    for mid in range(1, 20):
        cache.put(mid, Content(b"y" * 300, {}))
        cache.encoded(mid, f"m{mid}")
        assert cache.bytes <= 2_000
    assert cache.get(1) is None  # the oldest went
    assert cache.get(19) is not None
