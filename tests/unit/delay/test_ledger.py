"""The delay worker's ledger (workers.delay.ledger): requests for a commit share one."""

from __future__ import annotations

import asyncio

from workers.delay.config import DelaySettings
from workers.delay.ledger import Ledger, ingress_linger_ms
from workers.delay.store import DelayStore, Insert


def _insert(mid: int) -> Insert:
    return Insert(mid, 1000 + mid, "t", "rk", None, f"m{mid}", b"\x00\x00", b"x")


def _rows(store: DelayStore) -> list[int]:
    return store.db.run_sync(
        lambda c: [r[0] for r in c.execute("SELECT mid FROM pending ORDER BY mid")]
    )


async def test_deletes_and_ingress_share_one_commit(tmp_path) -> None:
    """The deletes of confirmed messages wait up to DELETE_COMMIT_DELAY_MS and ride along
    with the ingress's commit (a commit costs the writer thread about as much as its rows),
    and the one commit settles both."""
    settings = DelaySettings(ingress_commit_linger_ms=10, delete_commit_delay_ms=1000)
    store = DelayStore(tmp_path)
    ledger = Ledger(store, settings, next_mid=1, topic_counts={}, on_commit_seconds=lambda s: None)
    ledger.committer.start()
    try:
        ledger.append(_insert(1))
        ledger.append(_insert(2))
        await ledger.stored(settings.ingress_commit_linger_ms)
        commits = ledger.committer.commits
        assert _rows(store) == [1, 2]

        ledger.delete_done([(1, "t")])  # would wait up to 1 s on its own
        assert 1 in ledger.deleting
        ledger.append(_insert(3))
        await asyncio.wait_for(
            ledger.stored(settings.ingress_commit_linger_ms), 5
        )  # well before the deletes' delay

        assert ledger.committer.commits == commits + 1
        assert _rows(store) == [2, 3]
        await asyncio.sleep(0)
        assert 1 not in ledger.deleting
        assert ledger.topic_counts == {"t": 2}
    finally:
        await ledger.committer.close()
        store.close()


async def test_deletes_alone_are_committed_within_their_delay(tmp_path) -> None:
    settings = DelaySettings(delete_commit_delay_ms=20)
    store = DelayStore(tmp_path)
    ledger = Ledger(store, settings, next_mid=1, topic_counts={}, on_commit_seconds=lambda s: None)
    ledger.committer.start()
    try:
        ledger.append(_insert(1))
        await ledger.stored(settings.ingress_commit_linger_ms)
        ledger.delete_done([(1, "t")])
        for _ in range(500):  # the commit comes by itself, without an ingress to share it
            if not ledger.deleting:
                break
            await asyncio.sleep(0.01)
        assert not ledger.deleting
        assert _rows(store) == []
    finally:
        await ledger.committer.close()
        store.close()


async def test_close_commits_a_shared_commit_still_waiting_and_settles_it(tmp_path) -> None:
    """At stop, a commit whose linger has not run out is made at once and its waiters (the
    ingress's acknowledgements) are settled before the link closes."""
    settings = DelaySettings(ingress_commit_linger_ms=60_000)
    store = DelayStore(tmp_path)
    ledger = Ledger(store, settings, next_mid=1, topic_counts={}, on_commit_seconds=lambda s: None)
    ledger.committer.start()
    try:
        ledger.append(_insert(1))
        stored = ledger.stored(settings.ingress_commit_linger_ms)
        await asyncio.wait_for(ledger.close(), 10)
        await asyncio.sleep(0)
        assert stored.done() and stored.exception() is None
        assert _rows(store) == [1]
    finally:
        store.close()


async def test_commit_now_returns_after_the_waiters_of_a_lingering_commit_ran(tmp_path) -> None:
    """On shutdown the worker commits what is journaled and flushes the acknowledgements that
    the commit's waiters make: they must have run by then (else a stored delivery goes
    unacknowledged and the broker delivers it again)."""
    settings = DelaySettings(ingress_commit_linger_ms=60_000)
    store = DelayStore(tmp_path)
    ledger = Ledger(store, settings, next_mid=1, topic_counts={}, on_commit_seconds=lambda s: None)
    ledger.committer.start()
    acked: list[int] = []
    try:
        for mid in (1, 2):
            ledger.append(_insert(mid))
            ledger.stored(settings.ingress_commit_linger_ms).add_done_callback(
                lambda _, mid=mid: acked.append(mid)
            )
        await asyncio.wait_for(ledger.commit_now(), 5)  # not the linger's minute
        assert acked == [1, 2]
        assert _rows(store) == [1, 2]
    finally:
        await ledger.committer.close()
        store.close()


async def test_admitted_content_is_kept_within_its_budget_and_counted_until_it_leaves(
    tmp_path,
) -> None:
    """A row the ingress has in hand rides with its window entry while the window's
    content stays within WINDOW_CONTENT_MB; past it, entries are plain hints (their lane
    reads the store). What leaves the window gives its budget back."""
    from workers.delay.ledger import CONTENT_OVERHEAD

    body = b"x" * 1000
    each = CONTENT_OVERHEAD + 2 + len(body)
    settings = DelaySettings(window_content_mb=(2.5 * each) / (1024 * 1024))
    store = DelayStore(tmp_path)
    ledger = Ledger(store, settings, next_mid=1, topic_counts={}, on_commit_seconds=lambda s: None)
    scheduler = ledger.scheduler
    ops = [Insert(mid, 1000, "t", "rk", None, f"m{mid}", b"\x00\x00", body) for mid in (1, 2, 3)]
    for op in ops:
        ledger.admit(op.mid, op.due_ms, op.topic, op.key, op.read_back())
    kept = [scheduler.entry(op.mid).content for op in ops]
    assert kept[0] == ops[0].read_back() and kept[1] == ops[1].read_back()
    assert kept[2] is None, "beyond the budget the entry is a hint"
    assert scheduler.content_bytes == 2 * each

    (a,) = scheduler.assign(2000)
    scheduler.complete(a.lane, [e.mid for e in a.entries])
    assert scheduler.content_bytes == 0
    store.close()


def test_a_row_read_back_from_the_window_is_the_row_the_store_returns(tmp_path) -> None:
    """Insert.read_back() is what fetch_messages reads for the same row: the target exchange
    (the topic when it is not stored apart, and the default exchange "" kept as such)."""
    from workers.delay.store import fetch_messages, open_reader

    store = DelayStore(tmp_path)
    ops = [
        Insert(1, 1000, "t", "rk", None, "m1", b"\x00\x00", b"a"),
        Insert(2, 1000, "tenant-a", "rk", None, None, b"\x00\x00", b"b", exchange="orders"),
        Insert(3, 1000, "tenant-b", "q", None, "m3", b"\x00\x00", b"", exchange=""),
    ]
    store.db.run_sync(lambda c: store.apply(c, ops))
    reader = open_reader(store.path)
    try:
        assert fetch_messages(reader, [1, 2, 3]) == {op.mid: op.read_back() for op in ops}
    finally:
        reader.close()
        store.close()


def test_a_delivery_due_later_may_wait_longer_for_its_commit() -> None:
    """A twentieth of the time until due, between the minimum and the maximum linger, and
    no wait once a quarter of PREFETCH waits (the broker stops at PREFETCH unacked)."""
    s = DelaySettings(ingress_commit_linger_ms=10, ingress_commit_linger_max_ms=50, prefetch=1000)
    assert ingress_linger_ms(s, 0, 0) == 10, "due now: the minimum"
    assert ingress_linger_ms(s, -5000, 0) == 10, "overdue: the minimum"
    assert ingress_linger_ms(s, 600, 0) == 30
    assert ingress_linger_ms(s, 1000, 0) == 50
    assert ingress_linger_ms(s, 3_600_000, 0) == 50, "due in an hour: the maximum"
    assert ingress_linger_ms(s, 3_600_000, 249) == 50
    assert ingress_linger_ms(s, 3_600_000, 250) == 0, "a quarter of PREFETCH waits"
    flat = DelaySettings(ingress_commit_linger_ms=10, ingress_commit_linger_max_ms=10)
    assert ingress_linger_ms(flat, 3_600_000, 0) == 10
    longer = DelaySettings(ingress_commit_linger_ms=400, ingress_commit_linger_max_ms=50)
    assert ingress_linger_ms(longer, 0, 0) == 400, "the minimum wins over a smaller maximum"
