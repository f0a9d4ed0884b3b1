"""Directed core (workers.directed.core): tables over (state, event) pairs, and hypothesis
invariants. Journals are replayed into :class:`~tests.unit.directed.replay.ReplayStore`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter as Tally
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Literal

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tests.unit.directed.replay import ReplayStore, fill, replayed
from workers.directed.core import DirectedCore
from workers.directed.model import (
    ClearBuffer,
    Counts,
    DeleteContent,
    Dequeue,
    Detail,
    Enqueue,
    NewMessage,
    Op,
    OverflowPolicy,
    PullResult,
    Purge,
    SetBuffer,
    SetGap,
    SubmitResult,
)

# ----------------------------------------------------------------------------- construction


@pytest.mark.parametrize("kwargs", [{"queue_limit": 0}, {"max_batch": 0}])
def test_limits_must_be_positive(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        DirectedCore(**kwargs)


def test_overflow_accepts_its_wire_spelling() -> None:
    assert OverflowPolicy("drop-head") is OverflowPolicy.DROP_HEAD
    assert OverflowPolicy("reject") is OverflowPolicy.REJECT


# ----------------------------------------------------------------------------- submit


def test_submit_journals_the_detail_and_one_enqueue_per_distinct_target() -> None:
    core = DirectedCore()
    result = core.submit("a", ["x", "y", "x"], 10, 100)
    assert result == SubmitResult("accepted", 1)
    assert core.take_journal() == [
        NewMessage(1, "a", 2, 10, 110),
        Enqueue("x", 1, 1),
        Enqueue("y", 1, 1),
    ]
    assert core.detail(1) == Detail(1, "a", 2, 2, created_ms=10, expires_at_ms=110)
    assert core.mid_of("a") == 1
    assert (core.backlog("x"), core.backlog("y"), core.backlog("z")) == (1, 1, 0)


def test_mids_and_seqs_increase() -> None:
    core = DirectedCore()
    assert fill(core, ("a", ["x"]), ("b", ["x", "y"]), ("c", ["y"])) == [1, 2, 3]
    enqueues = [op for op in core.take_journal() if isinstance(op, Enqueue)]
    assert enqueues == [
        Enqueue("x", 1, 1),
        Enqueue("x", 2, 2),
        Enqueue("y", 1, 2),
        Enqueue("y", 2, 3),
    ]


def test_submit_without_targets_is_rejected() -> None:
    core = DirectedCore()
    assert core.submit("a", [], 0, None) == SubmitResult("rejected", None, "no_targets")
    assert core.take_journal() == []
    assert core.mid_of("a") is None


def test_targets_as_one_string_is_a_caller_bug() -> None:
    with pytest.raises(TypeError):
        DirectedCore().submit("a", "target", 0, None)


@pytest.mark.parametrize("finished", [False, True], ids=["alive", "tombstone"])
def test_duplicate_message_id_is_not_applied_twice(finished: bool) -> None:
    core = DirectedCore()
    fill(core, ("a", ["x"]))
    if finished:
        core.pull("x", None, 1, 0, "r1")
        core.pull("x", "r1", 0, 0, "r2")
    core.take_journal()
    before = (core.status("a"), core.backlog("x"), core.alive_messages, core.target_count)
    assert core.submit("a", ["x", "y"], 5, 10) == SubmitResult("duplicate", 1)
    assert core.take_journal() == []
    assert (core.status("a"), core.backlog("x"), core.alive_messages, core.target_count) == before


def test_drop_head_removes_the_oldest_and_deletes_content_nobody_holds() -> None:
    core = DirectedCore(queue_limit=2)
    fill(core, ("a", ["t"]), ("b", ["t"]))
    core.take_journal()
    result = core.submit("c", ["t"], 7, None)
    assert result == SubmitResult("accepted", 3, dropped=(("t", 1),))
    assert core.take_journal() == [
        NewMessage(3, "c", 1, 7, None),
        Dequeue("t", 1),
        Enqueue("t", 3, 3),
        Counts(1, 0, 0, 0, 1),
        DeleteContent(1, 7),
        SetGap("t", 1, ("a",)),  # t lost a before it got it: its next batch says so
    ]
    assert core.status("a") == {
        "message_id": "a",
        "total": 1,
        "acked": 0,
        "pending": 0,
        "expired": 0,
        "dropped": 1,
        "recalled": 0,
        "state": "done",
    }
    assert core.backlog("t") == 2


def test_drop_head_keeps_content_other_targets_still_hold() -> None:
    core = DirectedCore(queue_limit=1)
    fill(core, ("a", ["t", "u"]))
    core.take_journal()
    assert core.submit("b", ["t"], 3, None).dropped == (("t", 1),)
    assert core.take_journal() == [
        NewMessage(2, "b", 1, 3, None),
        Dequeue("t", 1),
        Enqueue("t", 1, 2),  # the queue was emptied, so seqs restart at 1 (as after restore)
        Counts(1, 1, 0, 0, 1),
        SetGap("t", 1, ("a",)),
    ]
    assert core.detail(1) == Detail(1, "a", 2, 1, dropped=1)


def test_drop_head_journals_one_counts_per_message_however_many_queues() -> None:
    core = DirectedCore(queue_limit=1)
    fill(core, ("a", ["t", "u", "v"]))
    core.take_journal()
    result = core.submit("b", ["t", "u", "v"], 4, None)
    assert result.dropped == (("t", 1), ("u", 1), ("v", 1))
    ops = core.take_journal()
    assert [op for op in ops if isinstance(op, Counts | DeleteContent)] == [
        Counts(1, 0, 0, 0, 3),
        DeleteContent(1, 4),
    ]


@pytest.mark.parametrize("overflow", list(OverflowPolicy))
def test_dead_entries_do_not_count_toward_the_limit(overflow: OverflowPolicy) -> None:
    core = DirectedCore(queue_limit=2, overflow=overflow)
    core.submit("a", ["t"], 0, 5)
    core.submit("b", ["t"], 0, None)
    assert core.expire(5) == [1]
    assert core.backlog("t") == 1
    core.take_journal()
    result = core.submit("c", ["t"], 6, None)
    assert result == SubmitResult("accepted", 3)
    assert core.take_journal() == [NewMessage(3, "c", 1, 6, None), Enqueue("t", 3, 3)]


def test_drop_head_skips_dead_entries_at_the_head_in_the_same_dequeue() -> None:
    core = DirectedCore(queue_limit=2)
    core.submit("a", ["t"], 0, 5)
    fill(core, ("b", ["t"]), ("c", ["t"]))
    core.expire(5)
    core.take_journal()
    result = core.submit("d", ["t"], 6, None)
    assert result.dropped == (("t", 2),)
    assert core.take_journal()[1:3] == [Dequeue("t", 2), Enqueue("t", 4, 4)]


def test_reject_refuses_the_whole_request_without_any_change() -> None:
    core = DirectedCore(queue_limit=1, overflow=OverflowPolicy.REJECT)
    fill(core, ("a", ["t"]))
    core.take_journal()
    assert core.submit("b", ["u", "t"], 1, None) == SubmitResult("rejected", None, "queue_full")
    assert core.take_journal() == []
    assert (core.mid_of("b"), core.backlog("u"), core.target_count) == (None, 0, 1)
    # The unacknowledged buffer does not count toward the queue limit.
    core.pull("t", None, 1, 2, "r1")
    assert core.submit("b", ["u", "t"], 3, None).status == "accepted"


def test_queues_full_of_dead_entries_are_compacted() -> None:
    """A target that never pulls and keeps receiving content that expires stays bounded."""
    core = DirectedCore(queue_limit=2)
    store = ReplayStore()
    fill(core, ("keep", ["t"]))
    for i in range(1, 30):
        core.submit(f"m{i}", ["t"], i * 10, 1)
        core.expire(i * 10 + 1)
        replayed(core, store)
        assert len(store.queues["t"]) <= 2 * 2 + 1
    assert core.backlog("t") == 1
    assert store.alive_queue("t") == [1]
    result = core.pull("t", None, 10, 1000, "r1")
    assert result.mids == (1,)


# ----------------------------------------------------------------------------- pull table

Kind = Literal["fresh", "ack_fresh", "resend", "ack_only", "empty"]
TAKE_2 = [Dequeue("t", 2), SetBuffer("t", "r2", (2,))]
ACK_1 = [Counts(1, 0, 1, 0, 0), DeleteContent(1, 5)]


def table_core(buffered: bool) -> DirectedCore:
    """Target ``t``: mid 1 buffered under "r1" (or already acknowledged), mid 2 queued."""
    core = DirectedCore(max_batch=5)
    fill(core, ("a", ["t"]), ("b", ["t"]))
    assert core.pull("t", None, 1, 0, "r1").mids == (1,)
    if not buffered:
        assert core.pull("t", "r1", 0, 0, "unused").kind == "ack_only"
    core.take_journal()
    return core


# (buffer, record_id sent, max) -> (kind, record_id back, mids, redelivered, acked, ops, backlog)
PULL_TABLE = [
    ("none", None, 0, "empty", None, (), False, (), [], 1),
    ("none", None, 3, "fresh", "r2", (2,), False, (), TAKE_2, 0),
    ("none", "r1", 0, "empty", None, (), False, (), [], 1),  # the id acknowledged before
    ("none", "r1", 3, "fresh", "r2", (2,), False, (), TAKE_2, 0),
    ("none", "zz", 0, "empty", None, (), False, (), [], 1),
    ("none", "zz", 3, "fresh", "r2", (2,), False, (), TAKE_2, 0),
    ("present", None, 0, "resend", "r1", (1,), True, (), [], 1),
    ("present", None, 3, "resend", "r1", (1,), True, (), [], 1),
    ("present", "r1", 0, "ack_only", None, (), False, (1,), [ClearBuffer("t"), *ACK_1], 1),
    (
        "present",
        "r1",
        3,
        "ack_fresh",
        "r2",
        (2,),
        False,
        (1,),
        [*TAKE_2, *ACK_1],  # the new batch replaces the acknowledged one: no ClearBuffer
        0,
    ),
    ("present", "zz", 0, "resend", "r1", (1,), True, (), [], 1),
    ("present", "zz", 3, "resend", "r1", (1,), True, (), [], 1),
]


@pytest.mark.parametrize(
    ("buffer", "sent", "max_n", "kind", "record_id", "mids", "redelivered", "acked", "ops", "left"),
    [pytest.param(*row, id=f"{row[0]}-{row[1]}-max{row[2]}") for row in PULL_TABLE],
)
def test_pull_table(
    buffer: str,
    sent: str | None,
    max_n: int,
    kind: Kind,
    record_id: str | None,
    mids: tuple[int, ...],
    redelivered: bool,
    acked: tuple[int, ...],
    ops: list[Op],
    left: int,
) -> None:
    core = table_core(buffered=buffer == "present")
    result = core.pull("t", sent, max_n, 5, "r2")
    assert result == PullResult(kind, record_id, mids, redelivered, acked)
    assert core.take_journal() == ops
    assert core.backlog("t") == left


def test_ack_fresh_with_nothing_left_ends_without_a_buffer() -> None:
    core = DirectedCore()
    fill(core, ("a", ["t"]))
    core.pull("t", None, 5, 0, "r1")
    core.take_journal()
    assert core.pull("t", "r1", 5, 1, "r2") == PullResult("ack_fresh", None, (), False, (1,))
    assert core.take_journal() == [ClearBuffer("t"), Counts(1, 0, 1, 0, 0), DeleteContent(1, 1)]
    assert core.target_count == 0
    # With no buffer left, the old record id is just ignored.
    assert core.pull("t", "r1", 5, 2, "r3").kind == "empty"


def test_pull_of_unknown_target_is_empty() -> None:
    core = DirectedCore()
    assert core.pull("nobody", "r9", 10, 0, "r1") == PullResult("empty", None, (), False, ())
    assert core.take_journal() == []


def test_max_zero_without_buffer_takes_nothing() -> None:
    core = DirectedCore()
    core.submit("a", ["t"], 0, 1)
    core.expire(1)
    fill(core, ("b", ["t"]))
    core.take_journal()
    assert core.pull("t", None, 0, 2, "r1").kind == "empty"
    assert core.take_journal() == []  # not even the dead head goes
    assert core.backlog("t") == 1


def test_batch_is_capped_by_max_batch() -> None:
    core = DirectedCore(max_batch=2)
    fill(core, ("a", ["t"]), ("b", ["t"]), ("c", ["t"]))
    assert core.pull("t", None, 10**9, 0, "r1").mids == (1, 2)
    assert core.backlog("t") == 1


def test_pull_skips_and_dequeues_expired_content() -> None:
    core = DirectedCore()
    core.submit("a", ["t"], 0, 5)
    fill(core, ("b", ["t"]))
    core.submit("c", ["t"], 0, 5)
    fill(core, ("d", ["t"]))
    core.take_journal()
    result = core.pull("t", None, 1, 5, "r1")  # the pull itself expires a and c first
    assert result.mids == (2,)
    assert core.take_journal() == [
        Counts(1, 0, 0, 1, 0),
        DeleteContent(1, 5),
        Counts(3, 0, 0, 1, 0),
        DeleteContent(3, 5),
        SetGap("t", 2, ("a", "c")),
        Dequeue("t", 3),  # a, b, and the dead c that followed b
        SetBuffer("t", "r1", (2,), 2, ("a", "c")),  # the batch reports the gap...
        SetGap("t", 0, ()),  # ...which is no longer pending
    ]
    assert (result.missed, result.missed_ids) == (2, ("a", "c"))


def test_pull_of_only_dead_entries_reports_the_gap_and_clears_them() -> None:
    core = DirectedCore()
    core.submit("a", ["t"], 0, 5)
    core.expire(5)
    core.take_journal()
    gap = PullResult("fresh", "r1", (), False, (), 1, ("a",))
    assert core.pull("t", None, 3, 6, "r1") == gap
    assert core.take_journal() == [
        Dequeue("t", 1),
        SetBuffer("t", "r1", (), 1, ("a",)),
        SetGap("t", 0, ()),
    ]
    assert core.pull("t", "nope", 3, 7, "r2") == dataclasses.replace(
        gap, kind="resend", redelivered=True
    )
    assert core.pull("t", "r1", 3, 8, "r3") == PullResult("ack_fresh", None, (), False, ())
    assert core.target_count == 0


def test_a_gap_waits_for_a_pull_that_fetches() -> None:
    core = DirectedCore(queue_limit=1)
    fill(core, ("a", ["t"]))
    core.pull("t", None, 1, 0, "r1")
    fill(core, ("b", ["t"]), ("c", ["t"]))  # c pushes b out: t never got b
    assert core.target_status("t") == {
        "target": "t",
        "backlog": 1,
        "unacknowledged": 1,
        "missed": 1,
        "missed_ids": ["b"],
    }
    assert core.pull("t", "r1", 0, 1, "r2").missed == 0  # max 0: acknowledges, no new batch
    result = core.pull("t", None, 5, 2, "r3")
    assert (result.mids, result.missed, result.missed_ids) == ((3,), 1, ("b",))
    core.pull("t", "r3", 0, 3, "r4")
    assert core.target_status("t")["missed"] == 0


def test_expired_content_in_a_buffer_is_not_resent_nor_acknowledged() -> None:
    core = DirectedCore()
    core.submit("a", ["t"], 0, 5)
    fill(core, ("b", ["t"]))
    core.pull("t", None, 5, 0, "r1")
    core.take_journal()
    assert core.pull("t", None, 5, 5, "r2") == PullResult("resend", "r1", (2,), True, ())
    assert core.take_journal() == [Counts(1, 0, 0, 1, 0), DeleteContent(1, 5)]
    assert core.pull("t", "r1", 0, 6, "r3").acked == (2,)
    assert core.detail(1) == Detail(1, "a", 1, 0, expired=1, expires_at_ms=5, done_ms=5)
    assert core.detail(2) == Detail(2, "b", 1, 0, acked=1, done_ms=6)


def test_a_buffer_of_dead_content_is_resent_empty_until_acknowledged() -> None:
    core = DirectedCore()
    core.submit("a", ["t"], 0, 5)
    core.pull("t", None, 5, 0, "r1")
    assert core.pull("t", "other", 5, 9, "r2") == PullResult("resend", "r1", (), True, ())
    assert core.pull("t", "r1", 5, 9, "r3") == PullResult("ack_fresh", None, (), False, ())


# ----------------------------------------------------------------------------- expiry


def test_expire_counts_every_target_that_had_not_acknowledged() -> None:
    core = DirectedCore()
    core.submit("a", ["t", "u", "v"], 0, 10)
    core.pull("t", None, 1, 1, "r1")
    core.pull("t", "r1", 0, 2, "r2")  # t acknowledged
    core.pull("u", None, 1, 3, "r3")  # u holds it unacknowledged
    core.take_journal()
    assert core.expire(9) == []
    assert core.expire(10) == [1]
    # v had it queued (a gap); u had it in its batch (handed out: not a gap)
    assert core.take_journal() == [
        Counts(1, 0, 1, 2, 0),
        DeleteContent(1, 10),
        SetGap("v", 1, ("a",)),
    ]
    assert core.status("a") == {
        "message_id": "a",
        "total": 3,
        "acked": 1,
        "pending": 0,
        "expired": 2,
        "dropped": 0,
        "recalled": 0,
        "state": "expired",
    }
    assert core.expire(10**12) == []
    assert core.pull("v", None, 5, 11, "r4") == PullResult("fresh", "r4", (), False, (), 1, ("a",))


def test_messages_finish_in_expiry_order_and_never_expire_without_ttl() -> None:
    core = DirectedCore()
    core.submit("late", ["t"], 0, 30)
    core.submit("never", ["t"], 0, None)
    core.submit("soon", ["t"], 0, 10)
    assert core.expire(10**15) == [3, 1]
    status = core.status("never")
    assert status is not None and status["state"] == "active"


def test_content_finished_before_its_ttl_does_not_expire_later() -> None:
    core = DirectedCore(max_batch=1000)
    for i in range(200):
        core.submit(f"m{i}", ["t"], 0, 1000)
    core.pull("t", None, 1000, 1, "r1")
    core.pull("t", "r1", 0, 2, "r2")
    core.take_journal()
    # Heap entries of finished messages are collected rather than kept for the whole TTL.
    assert len(core._expiry) < 100
    assert core.expire(1000) == []
    assert core.take_journal() == []


# ----------------------------------------------------------------------------- purge


def test_purge_forgets_tombstones_after_retention_and_frees_the_message_id() -> None:
    core = DirectedCore()
    fill(core, ("a", ["t"]), ("b", ["t"]))
    core.pull("t", None, 1, 10, "r1")
    core.pull("t", "r1", 0, 20, "r2")  # a done at 20
    core.take_journal()
    assert core.purge(now_ms=29, retention_ms=10) == []
    assert core.submit("a", ["t"], 29, None).status == "duplicate"
    assert core.purge(now_ms=30, retention_ms=10) == [1]
    assert core.take_journal() == [Purge(1)]
    assert (core.detail(1), core.mid_of("a"), core.status("a")) == (None, None, None)
    assert core.tombstones == 0
    assert core.purge(now_ms=10**12, retention_ms=0) == []  # b is alive: never purged
    assert core.submit("a", ["t"], 31, None) == SubmitResult("accepted", 3)


def test_purged_content_still_queued_is_skipped() -> None:
    core = DirectedCore()
    core.submit("a", ["t"], 0, 1)
    fill(core, ("b", ["t"]))
    core.expire(1)
    assert core.purge(2, 0) == [1]
    core.take_journal()
    assert core.pull("t", None, 5, 3, "r1").mids == (2,)
    assert core.take_journal() == [
        Dequeue("t", 2),
        SetBuffer("t", "r1", (2,), 1, ("a",)),
        SetGap("t", 0, ()),
    ]


# ----------------------------------------------------------------------------- invariants

TARGETS = ("a", "b", "c", "d")
MESSAGE_IDS = tuple(f"m{i}" for i in range(8))
LIMIT = 3
MAX_BATCH = 2  # below LIMIT, so that the cap matters

REQUESTS = st.tuples(
    st.sampled_from(MESSAGE_IDS),
    st.lists(st.sampled_from(TARGETS), max_size=6),  # recipients, duplicates included
    st.sampled_from([None, 1, 4, 15]),  # ttl
)
Request = tuple[str, list[str], int | None]
Label = tuple[str, int]  # (message_id, how many times it had been accepted): survives restore


@dataclasses.dataclass
class Twin:
    """A core restored from the replayed journal, driven with the same events."""

    core: DirectedCore
    store: ReplayStore
    names: dict[int, Label]


def normalize(names: dict[int, Label], value: Any) -> Any:
    """Replace mids by labels: a restored core may number new messages differently."""
    if isinstance(value, SubmitResult):
        mid = None if value.mid is None else names[value.mid]
        return (value.status, mid, value.reason, [(t, names[m]) for t, m in value.dropped])
    if isinstance(value, PullResult):
        mids = [names[m] for m in value.mids]
        acked = [names[m] for m in value.acked]
        return (
            value.kind,
            value.record_id,
            mids,
            value.redelivered,
            acked,
            value.missed,
            value.missed_ids,
            value.recalled_ids,
        )
    assert isinstance(value, list)
    return [names[m] for m in value]


def store_view(store: ReplayStore, names: dict[int, Label]) -> Any:
    return (
        {names[m]: dataclasses.astuple(d)[1:] for m, d in store.details.items()},
        {names[m] for m in store.content},
        {t: [(s, names[m]) for s, m in sorted(q.items())] for t, q in store.queues.items()},
        {
            t: (b.record_id, [names[m] for m in b.mids], b.missed, b.missed_ids)
            for t, b in store.buffers.items()
        },
        dict(store.gaps),
    )


def observe(core: DirectedCore) -> Any:
    return (
        [core.status(m) for m in MESSAGE_IDS],
        [core.backlog(t) for t in TARGETS],
        sorted(core.targets()),
        (core.alive_messages, core.target_count, core.tombstones),
    )


def check_consistent(core: DirectedCore, store: ReplayStore) -> None:
    """The replayed journal is the core's state, and that state keeps invariants (a)-(c)."""
    for mid, d in store.details.items():
        assert core.detail(mid) == d
    for message_id in MESSAGE_IDS:
        mids = [m for m, d in store.details.items() if d.message_id == message_id]
        assert core.mid_of(message_id) == (mids[0] if mids else None)
    holders: dict[int, set[str]] = defaultdict(set)
    for t, q in store.queues.items():
        for m in q.values():
            holders[m].add(t)
    for t, b in store.buffers.items():
        for m in b.mids:
            holders[m].add(t)
    for mid, d in store.details.items():
        state = (
            "active"
            if d.alive
            else "recalled"
            if d.recalled
            else "expired"
            if d.expired
            else "done"
        )
        assert core.status(d.message_id) == {
            "message_id": d.message_id,
            "total": d.total,
            "acked": d.acked,
            "pending": d.remaining,
            "expired": d.expired,
            "dropped": d.dropped,
            "recalled": d.recalled,
            "state": state,
        }
        assert min(d.remaining, d.acked, d.expired, d.dropped, d.recalled) >= 0  # (b)
        assert d.acked + d.expired + d.dropped + d.recalled + d.remaining == d.total  # (b)
        if d.alive:
            assert d.remaining == len(holders[mid])  # (a)
        assert (mid in store.content) == d.alive == (d.remaining > 0)  # (c)
    for t in TARGETS:
        alive = store.alive_queue(t)
        assert core.backlog(t) == len(alive) <= LIMIT
        assert len(store.queues.get(t, {})) <= 2 * LIMIT + 1  # dead entries are compacted
    assert core.alive_messages == len(store.content)
    assert sorted(core.targets()) == sorted(
        set(store.queues) | set(store.buffers) | set(store.gaps)
    )
    for t in TARGETS:  # (h) the gap the core reports is the one it journaled
        buf = store.buffers.get(t)
        pending = store.gaps.get(t, (0, ()))
        assert core.target_status(t)["missed"] == pending[0] + (buf.missed if buf else 0)


class DirectedMachine(RuleBasedStateMachine):
    overflow = OverflowPolicy.DROP_HEAD

    def __init__(self) -> None:
        super().__init__()
        self.config: dict[str, Any] = {
            "queue_limit": LIMIT,
            "overflow": self.overflow,
            "max_batch": MAX_BATCH,
        }
        self.core = DirectedCore(**self.config)
        self.store = ReplayStore()
        self.names: dict[int, Label] = {}
        self.accepted: Tally[str] = Tally()
        self.twin: Twin | None = None
        self.now = 0
        self.records = 0
        # What each target was told, to check (d).
        self.targeted: dict[str, set[int]] = defaultdict(set)
        self.acked_by: dict[str, set[int]] = defaultdict(set)
        self.last_handed: dict[str, int] = defaultdict(int)
        self.buffer: dict[str, tuple[str, tuple[int, ...], int]] = {}
        self.old_record: dict[str, str] = {}
        # (h): every queued id a target loses (dropped, expired) before it got it is reported
        # in exactly one batch: lost == reported in acknowledged batches + still to report.
        self.lost = 0
        self.reported = 0

    def apply(
        self, call: Callable[[DirectedCore], Any], *, recall: bool = False
    ) -> tuple[Any, list[Op], Any]:
        queued = {} if recall else {t: self.store.alive_queue(t) for t in TARGETS}
        result = call(self.core)
        ops = self.core.take_journal()
        self.store.apply(ops)
        dropped = set(result.dropped) if isinstance(result, SubmitResult) else set()
        self.lost += len(dropped)
        for t, q in queued.items():  # besides drop-head, only expiry kills a queued entry
            self.lost += sum(1 for m in q if m not in self.store.content and (t, m) not in dropped)
        twin_result = None
        if self.twin is not None:
            twin_result = call(self.twin.core)
            self.twin.store.apply(self.twin.core.take_journal())
        return result, ops, twin_result

    def compare(self, result: Any, twin_result: Any) -> None:
        """(g): the restored core answers the same and journals the same changes."""
        if self.twin is None:
            return
        assert normalize(self.names, result) == normalize(self.twin.names, twin_result)
        assert store_view(self.store, self.names) == store_view(self.twin.store, self.twin.names)

    @rule(dt=st.integers(0, 6))
    def tick(self, dt: int) -> None:
        self.now += dt

    @initialize(requests=st.lists(REQUESTS, max_size=6))
    def start(self, requests: list[Request]) -> None:
        for request in requests:
            self.submit_one(*request)

    @rule(request=REQUESTS)
    def submit(self, request: Request) -> None:
        self.submit_one(*request)

    @rule(requests=st.lists(REQUESTS, min_size=2, max_size=5), dt=st.integers(0, 3))
    def burst(self, requests: list[Request], dt: int) -> None:
        for request in requests:
            self.submit_one(*request)
            self.now += dt

    def submit_one(self, message_id: str, recipients: list[str], ttl: int | None) -> None:
        known = self.core.mid_of(message_id)
        wanted = list(dict.fromkeys(recipients))
        queued = {t: self.store.alive_queue(t) for t in TARGETS}
        before = observe(self.core)
        result, ops, twin_result = self.apply(
            lambda c: c.submit(message_id, recipients, self.now, ttl)
        )
        if result.status == "accepted":
            self.accepted[message_id] += 1
            self.names[result.mid] = (message_id, self.accepted[message_id])
            if self.twin is not None:
                self.twin.names[twin_result.mid] = self.names[result.mid]
        self.compare(result, twin_result)

        if known is not None:  # (e)
            assert result == SubmitResult("duplicate", known)
            assert ops == [] and observe(self.core) == before
            return
        if not wanted:
            assert result == SubmitResult("rejected", None, "no_targets")
            assert ops == [] and observe(self.core) == before
            return
        full = [t for t in wanted if len(queued[t]) >= LIMIT]
        if full and self.overflow is OverflowPolicy.REJECT:  # (f)
            assert result == SubmitResult("rejected", None, "queue_full")
            assert ops == [] and observe(self.core) == before
            return
        assert result.status == "accepted"
        assert result.dropped == tuple(
            (t, m) for t in full for m in queued[t][: len(queued[t]) - LIMIT + 1]
        )
        for t in wanted:
            self.targeted[t].add(result.mid)
        # Coverage of the rare paths (see pytest --hypothesis-show-statistics).
        if result.dropped:
            event("submit dropped queue heads")
        elif any(isinstance(op, Dequeue) for op in ops):
            event("submit compacted a queue")

    @rule(
        who=st.sampled_from(TARGETS),
        cursor=st.sampled_from(["none", "matching", "other", "previous"]),
        max_n=st.sampled_from([0, 1, 2, 10**9]),
    )
    def pull(self, who: str, cursor: str, max_n: int) -> None:
        buf = self.buffer.get(who)
        sent = {
            "none": None,
            "matching": buf[0] if buf else None,
            "other": "bogus",
            "previous": self.old_record.get(who),
        }[cursor]
        new_record = f"r{self.records}"
        self.records += 1
        queued = self.store.alive_queue(who)
        result, ops, twin_result = self.apply(
            lambda c: c.pull(who, sent, max_n, self.now, new_record)
        )
        self.compare(result, twin_result)
        n = min(max_n, MAX_BATCH)

        if buf is not None and sent != buf[0]:
            assert result == PullResult(
                "resend",
                buf[0],
                tuple(m for m in buf[1] if m in self.store.content),
                True,
                (),
                buf[2],
                result.missed_ids,
                tuple(
                    self.store.details[m].message_id
                    for m in buf[1]
                    if m in self.store.details and self.store.details[m].recalled
                ),
            )
            assert all(isinstance(op, Counts | DeleteContent | SetGap) for op in ops)  # expiry only
            return
        assert not result.redelivered
        if buf is not None:
            assert result.kind == ("ack_fresh" if n > 0 else "ack_only")
            assert result.acked == tuple(m for m in buf[1] if m in result.acked)
            assert all(m not in self.store.content for m in buf[1] if m not in result.acked)
            self.acked_by[who].update(result.acked)
            self.old_record[who] = buf[0]
            self.reported += buf[2]
            del self.buffer[who]
        else:
            assert result.kind == ("fresh" if result.record_id else "empty")
            assert result.acked == ()
        # Only expiry can kill a queued entry, so what is alive now is what had to be taken.
        assert result.mids == tuple(m for m in queued if m in self.store.content)[:n]
        assert (result.record_id is None) == (not result.mids and not result.missed)
        if result.record_id is not None:
            self.buffer[who] = (new_record, result.mids, result.missed)
        if result.mids:
            assert result.record_id == new_record
            for m in result.mids:  # (d)
                expires = self.store.details[m].expires_at_ms
                assert expires is None or expires > self.now, "content past its TTL is never sent"
                assert m in self.targeted[who]
                assert m not in self.acked_by[who]
                assert m > self.last_handed[who]
                self.last_handed[who] = m

    @rule()
    def expire(self) -> None:
        due = {
            m
            for m, d in self.store.details.items()
            if d.alive and d.expires_at_ms is not None and d.expires_at_ms <= self.now
        }
        result, _, twin_result = self.apply(lambda c: c.expire(self.now))
        self.compare(result, twin_result)
        assert sorted(result) == sorted(due)
        for m in result:
            assert self.store.details[m].done_ms == self.now

    @rule(message_id=st.sampled_from(MESSAGE_IDS))
    def recall(self, message_id: str) -> None:
        mid = self.core.mid_of(message_id)
        before = self.store.details[mid].remaining if mid is not None else 0
        alive = mid is not None and self.store.details[mid].alive
        result, ops, twin_result = self.apply(lambda c: c.recall(message_id, self.now), recall=True)
        if self.twin is not None:
            assert result == twin_result
            assert store_view(self.store, self.names) == store_view(
                self.twin.store, self.twin.names
            )
        if mid is None:
            assert result is None and ops == []
            return
        if not alive:
            assert ops == []
            return
        assert result["state"] == "recalled" and result["pending"] == 0
        assert result["recalled"] == before
        assert mid not in self.store.content
        for t in TARGETS:  # nobody gets it any more, and nobody lost it (no gap)
            assert mid not in self.store.alive_queue(t)

    @rule(retention=st.sampled_from([0, 5, 30]))
    def purge(self, retention: int) -> None:
        due = {
            m
            for m, d in self.store.details.items()
            if d.done_ms is not None and d.done_ms <= self.now - retention
        }
        result, ops, twin_result = self.apply(lambda c: c.purge(self.now, retention))
        self.compare(result, twin_result)
        assert sorted(result) == sorted(due)
        assert ops == [Purge(m) for m in result]
        for m in result:
            assert self.core.mid_of(self.names[m][0]) is None

    @rule()
    def restore(self) -> None:
        core = self.store.restore(**self.config)
        assert core.take_journal() == []
        assert observe(core) == observe(self.core)
        self.twin = Twin(core, copy.deepcopy(self.store), dict(self.names))

    @invariant()
    def consistent(self) -> None:
        check_consistent(self.core, self.store)
        to_report = sum(g[0] for g in self.store.gaps.values())
        to_report += sum(b.missed for b in self.store.buffers.values())
        assert self.lost == self.reported + to_report  # (h)
        assert {
            t: (b.record_id, b.mids, b.missed) for t, b in self.store.buffers.items()
        } == self.buffer
        if self.twin is not None:
            check_consistent(self.twin.core, self.twin.store)
            assert observe(self.twin.core) == observe(self.core)


class RejectMachine(DirectedMachine):
    overflow = OverflowPolicy.REJECT


MACHINE_SETTINGS = settings(max_examples=150, stateful_step_count=50, deadline=None)
TestDropHeadInvariants = DirectedMachine.TestCase
TestDropHeadInvariants.settings = MACHINE_SETTINGS
TestRejectInvariants = RejectMachine.TestCase
TestRejectInvariants.settings = MACHINE_SETTINGS


# ----------------------------------------------------------------------------- recall


def test_recall_takes_a_message_back_from_queues_and_names_it_in_handed_out_batches() -> None:
    core = DirectedCore()
    fill(core, ("a", ["t", "u", "v"]), ("b", ["u"]))
    core.pull("t", None, 5, 0, "r1")
    core.pull("t", "r1", 0, 0, "r2")  # t acknowledged a
    core.pull("u", None, 5, 0, "r3")  # u holds a and b in its batch
    core.take_journal()
    status = core.recall("a", 5)
    assert status is not None
    assert (status["state"], status["acked"], status["recalled"], status["pending"]) == (
        "recalled",
        1,
        2,
        0,
    )
    assert core.take_journal() == [Counts(1, 0, 1, 0, 0, 2), DeleteContent(1, 5)]
    assert core.backlog("v") == 0
    v = core.pull("v", None, 5, 6, "r4")  # v never gets it, and it is no gap
    assert (v.kind, v.mids, v.missed) == ("empty", (), 0)
    resend = core.pull("u", None, 5, 7, "r5")
    assert (resend.mids, resend.recalled_ids) == ((2,), ("a",))
    ack = core.pull("u", "r3", 5, 8, "r6")
    assert (ack.acked, ack.recalled_ids) == ((2,), ("a",))
    core.take_journal()
    assert core.recall("a", 9) == status  # again: nothing changes
    assert core.take_journal() == []
    assert core.recall("nope", 9) is None
