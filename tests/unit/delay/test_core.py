"""Pure core of the delay worker (workers.delay.core): sender-lane scheduling."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from workers.delay.core import Assignment, Entry, Scheduler

NOW = 1_700_000_000_000
HORIZON = 60_000


# ---------------------------------------------------------------- scheduler tables


def _sched(lanes: int = 2, batch: int = 500) -> Scheduler:
    return Scheduler(lanes=lanes, batch=batch)


def _shape(assignments: list[Assignment]) -> list[tuple[int, str, list[int]]]:
    return [(a.lane, a.topic, [e.mid for e in a.entries]) for a in assignments]


def _finish(s: Scheduler, assignments: list[Assignment]) -> None:
    for a in assignments:
        s.complete(a.lane, [e.mid for e in a.entries])


ASSIGN_CASES: list[
    tuple[str, int, list[tuple[int, str, int]], int, list[tuple[int, str, list[int]]]]
] = [
    # (name, lanes, [(mid, topic, due)], now, expected [(lane, topic, mids)])
    ("nothing due", 2, [(1, "a", 10)], 9, []),
    ("due exactly now", 2, [(1, "a", 10)], 10, [(0, "a", [1])]),
    ("one lane per topic", 2, [(1, "a", 0), (2, "a", 0)], 5, [(0, "a", [1, 2])]),
    (
        "earliest due topic first",
        1,
        [(1, "a", 5), (2, "b", 3)],
        5,
        [(0, "b", [2])],
    ),
    ("same due: by name", 1, [(1, "b", 5), (2, "a", 5)], 5, [(0, "a", [2])]),
    (
        "two lanes two topics, third waits",
        2,
        [(1, "a", 1), (2, "b", 2), (3, "c", 3)],
        3,
        [(0, "a", [1]), (1, "b", [2])],
    ),
    (
        "due order then mid within a topic; future left",
        1,
        [(1, "a", 9), (2, "a", 4), (3, "a", 4), (4, "a", 11)],
        10,
        [(0, "a", [2, 3, 1])],
    ),
    ("future topic not assigned", 2, [(1, "a", 1), (2, "b", 100)], 50, [(0, "a", [1])]),
]


@pytest.mark.parametrize(
    ("lanes", "entries", "now", "expected"),
    [c[1:] for c in ASSIGN_CASES],
    ids=[c[0] for c in ASSIGN_CASES],
)
def test_assign_table(
    lanes: int,
    entries: list[tuple[int, str, int]],
    now: int,
    expected: list[tuple[int, str, list[int]]],
) -> None:
    s = _sched(lanes=lanes)
    for mid, topic, due in entries:
        assert s.add(Entry(mid, topic, due)) is None
    got = s.assign(now)
    assert _shape(got) == expected
    assert s.busy_lanes() == {lane for lane, _, _ in expected}
    for lane, topic, _ in expected:
        assert s.lane_of(topic) == lane
    for a in got:
        assert all(e.due_ms <= now for e in a.entries)


def test_never_early() -> None:
    s = _sched()
    s.add(Entry(1, "a", 100))
    assert s.next_due_ms() == 100
    for now in (0, 50, 99):
        assert s.assign(now) == []
    assert _shape(s.assign(100)) == [(0, "a", [1])]
    assert s.next_due_ms() is None


def test_batch_bound_and_topic_keeps_one_lane() -> None:
    s = _sched(lanes=3, batch=3)
    for mid in range(1, 8):
        s.add(Entry(mid, "a", 0))
    first = s.assign(0)
    assert _shape(first) == [(0, "a", [1, 2, 3])]
    assert s.assign(0) == [], "the topic already holds a lane"
    assert s.counts() == {"a": (4, 0)}
    _finish(s, first)
    second = s.assign(0)
    assert _shape(second) == [(0, "a", [4, 5, 6])]
    _finish(s, second)
    assert _shape(s.assign(0)) == [(0, "a", [7])]


def test_a_turn_packs_small_batches_of_several_topics() -> None:
    s = Scheduler(lanes=2, batch=4, pack=5)
    for mid, topic in enumerate(("a", "a", "b", "c", "c", "c", "d"), start=1):
        s.add(Entry(mid, topic, 0))
    got = s.assign(0)
    # lane 0: a's two, b's one, then c gets the room left (2 of its 3); lane 1: d, and c
    # keeps its lane 0 (a topic is on one lane at a time): its third waits
    assert _shape(got) == [
        (0, "a", [1, 2]),
        (0, "b", [3]),
        (0, "c", [4, 5]),
        (1, "d", [7]),
    ]
    assert s.busy_lanes() == {0, 1}
    assert s.counts()["c"] == (1, 0)
    # each batch completes on its own; the lane is free after its last
    s.complete(0, [3])
    s.complete(0, [1, 2])
    assert s.busy_lanes() == {0, 1}
    assert s.assign(0) == [], "lane 0 still holds c's batch"
    s.complete(0, [4], retry=[5])
    assert s.busy_lanes() == {1}
    assert _shape(s.assign(0)) == [(0, "c", [5, 6])]


def test_a_full_batch_is_not_packed() -> None:
    s = Scheduler(lanes=1, batch=3, pack=3)
    for mid in range(1, 5):
        s.add(Entry(mid, "hot", 0))
    s.add(Entry(5, "cold", 1))
    assert _shape(s.assign(1)) == [(0, "hot", [1, 2, 3])]


def test_complete_names_one_batch_of_a_packed_turn() -> None:
    s = Scheduler(lanes=1, batch=4, pack=4)
    s.add(Entry(1, "a", 0))
    s.add(Entry(2, "b", 0))
    s.assign(0)
    with pytest.raises(ValueError):
        s.complete(0, [1, 2])
    with pytest.raises(ValueError):
        s.complete(0, [])
    s.complete(0, [2])
    s.complete(0, [1])
    assert s.busy_lanes() == set()


def test_round_robin_between_due_topics() -> None:
    s = _sched(lanes=1, batch=2)
    mid = 0
    for topic in ("a", "b", "c"):
        for _ in range(6):
            mid += 1
            s.add(Entry(mid, topic, 0))
    order = []
    while True:
        got = s.assign(1)
        if not got:
            break
        order.append(got[0].topic)
        _finish(s, got)
    assert order == ["a", "b", "c"] * 3


def test_returned_topic_goes_behind_topics_that_became_due_meanwhile() -> None:
    s = _sched(lanes=1, batch=1)
    s.add(Entry(1, "hot", 0))
    s.add(Entry(2, "hot", 0))
    s.add(Entry(3, "cold", 10))
    assert _shape(s.assign(0)) == [(0, "hot", [1])]
    # cold becomes due while hot holds the only lane, and nobody calls assign() meanwhile:
    # hot's earlier due must not let it jump the line.
    s.complete(0, [1])
    assert s.topics_waiting(20) == ["cold", "hot"]
    assert _shape(s.assign(20)) == [(0, "cold", [3])]
    s.complete(0, [3])
    assert _shape(s.assign(20)) == [(0, "hot", [2])]


def test_returned_topic_behind_topic_seen_waiting_during_its_lane() -> None:
    s = _sched(lanes=1, batch=1)
    for mid in (1, 2):
        s.add(Entry(mid, "hot", 0))
    s.add(Entry(3, "cold", 10))
    s.assign(0)
    assert s.assign(10) == [] and s.topics_waiting(10) == ["cold"]
    s.complete(0, [1])
    assert [a.topic for a in s.assign(11)] == ["cold"]


def test_fairness_hot_topic_with_100k_due_and_ten_cold_topics() -> None:
    s = _sched(lanes=2)
    for mid in range(100_000):
        s.add(Entry(mid, "hot", 0))
    for i in range(10):
        s.add(Entry(200_000 + i, f"cold{i}", 1))
    sequence: list[str] = []  # topics in the order they were given a lane
    now = 5
    while sequence.count("hot") < 2:
        got = s.assign(now)
        assert all(len(a.entries) <= 500 for a in got)
        sequence += [a.topic for a in got]
        _finish(s, got)
        now += 1
    # every cold topic had its lane before the hot topic's second batch
    second_hot = [i for i, topic in enumerate(sequence) if topic == "hot"][1]
    assert sequence[0] == "hot"
    assert sorted(sequence[1:second_hot]) == [f"cold{i}" for i in range(10)]
    assert len(s) == 100_000 - 2 * 500


def test_pending_topic_waits_if_its_due_entries_are_cancelled() -> None:
    s = _sched(lanes=1, batch=1)
    s.add(Entry(1, "a", 0))
    s.add(Entry(2, "b", 0))
    s.add(Entry(3, "b", 50))
    s.assign(0)
    assert s.topics_waiting(0) == ["b"]
    assert s.remove(2) == "removed"
    s.complete(0, [1])
    assert s.assign(10) == [] and s.next_due_ms() == 50
    assert _shape(s.assign(50)) == [(0, "b", [3])]


def test_next_due_ignores_topics_holding_a_lane() -> None:
    s = _sched(lanes=2, batch=1)
    s.add(Entry(1, "a", 0))
    s.add(Entry(2, "a", 0))
    s.add(Entry(3, "b", 30))
    s.assign(0)
    assert s.next_due_ms() == 30
    s.complete(0, [1])
    assert s.next_due_ms() == 0


def test_retry_returns_with_original_due_and_goes_first() -> None:
    s = _sched(lanes=1, batch=2)
    for mid, due in ((1, 5), (2, 6), (3, 7)):
        s.add(Entry(mid, "a", due))
    s.assign(10)
    s.complete(0, done=[1], retry=[2])
    assert s.counts() == {"a": (2, 6)}
    assert _shape(s.assign(10)) == [(0, "a", [2, 3])]


# ---- replacement and cancel

REPLACE_CASES: list[tuple[str, str, bool]] = [
    # (name, state of the older same-key entry when the newer one arrives, replaced?)
    ("pending is replaced", "pending", True),
    ("in flight is not replaced", "in_flight", False),
    ("completed is gone", "done", False),
    ("cancelled is gone", "removed", False),
]


@pytest.mark.parametrize(
    ("state", "replaced"), [c[1:] for c in REPLACE_CASES], ids=[c[0] for c in REPLACE_CASES]
)
def test_replacement_by_key(state: str, replaced: bool) -> None:
    s = _sched()
    old = Entry(1, "a", 0, key="k")
    s.add(old)
    if state in ("in_flight", "done"):
        s.assign(0)
    if state == "done":
        s.complete(0, [1])
    if state == "removed":
        assert s.remove(1) == "removed"
    new = Entry(2, "a", 50, key="k")
    assert s.add(new) is (old if replaced else None)
    expected_len = {"pending": 1, "in_flight": 2, "done": 1, "removed": 1}[state]
    assert len(s) == expected_len
    assert s.remove_key("k") == ("removed", 2)


def test_replacement_across_topics_and_out_of_order() -> None:
    s = _sched()
    old = Entry(5, "a", 10, key="k", content_bytes=100)
    s.add(old)
    late = Entry(3, "b", 10, key="k", content_bytes=10)
    assert s.add(late) is late, "an older message loses to a newer one already here"
    assert len(s) == 1
    assert s.content_bytes == 100, "the loser's content is not counted"
    newer = Entry(9, "b", 20, key="k", content_bytes=1)
    assert s.add(newer) is old
    assert s.content_bytes == 1
    assert s.counts() == {"b": (1, 20)}
    assert _shape(s.assign(20)) == [(0, "b", [9])]


def test_in_flight_then_newer_then_retry_keeps_both() -> None:
    s = _sched(lanes=1)
    s.add(Entry(1, "a", 0, key="k"))
    s.assign(0)
    s.add(Entry(2, "a", 5, key="k"))
    assert s.remove_key("k") == ("removed", 2)
    assert s.remove_key("k") == ("in_flight", 1)
    s.add(Entry(3, "a", 5, key="k"))
    s.complete(0, done=[], retry=[1])
    # entry 1 was promised as "being sent"; entry 3 still owns the key
    assert s.remove_key("k") == ("removed", 3)
    assert _shape(s.assign(5)) == [(0, "a", [1])]


def test_active_lanes_limit_new_batches_only() -> None:
    s = _sched(lanes=3)
    for t in "abc":
        s.add(Entry(ord(t), t, 0))
    s.set_active_lanes(1)
    assert _shape(s.assign(0)) == [(0, "a", [97])]
    assert not s.has_idle_lane() and s.topics_waiting(0) == ["b", "c"]
    s.set_active_lanes(3)
    assert s.has_idle_lane()
    assert _shape(s.assign(0)) == [(1, "b", [98]), (2, "c", [99])]
    s.set_active_lanes(1)  # lanes 1 and 2 finish their batches normally
    s.complete(2, [99])
    s.complete(1, [98])
    s.add(Entry(100, "d", 0))
    assert not s.has_idle_lane() and s.assign(0) == []
    s.complete(0, [97])
    assert _shape(s.assign(0)) == [(0, "d", [100])]
    with pytest.raises(ValueError):
        s.set_active_lanes(0)
    with pytest.raises(ValueError):
        s.set_active_lanes(4)


def test_key_mids_spares_in_flight_and_retried_obligations() -> None:
    s = _sched(lanes=1)
    assert s.key_mids("k") == frozenset()
    s.add(Entry(1, "a", 0, key="k"))
    assert s.key_mids("k") == {1}
    s.assign(0)
    s.add(Entry(2, "a", 5, key="k"))
    assert s.key_mids("k") == {1, 2}
    assert s.remove_key("k") == ("removed", 2)
    assert s.key_mids("k") == {1}, "in flight: a newer same-key message must spare it"
    s.add(Entry(3, "a", 5, key="k"))
    s.complete(0, done=[], retry=[1])
    assert s.remove_key("k") == ("removed", 3)
    assert s.key_mids("k") == {1}, "retried after a newer message: still an obligation"
    assert 1 in s and s.entry(1) is not None and not s.in_flight(1)
    s.assign(5)
    assert s.in_flight(1)
    s.complete(0, done=[1])
    assert s.key_mids("k") == frozenset() and 1 not in s and s.entry(1) is None


REMOVE_CASES = [
    ("pending", "removed"),
    ("in_flight", "in_flight"),
    ("done", "unknown"),
    ("never", "unknown"),
]


@pytest.mark.parametrize(("state", "outcome"), REMOVE_CASES)
def test_remove_and_remove_key(state: str, outcome: str) -> None:
    for by_key in (False, True):
        s = _sched()
        if state != "never":
            s.add(Entry(1, "a", 0, key="k"))
        if state in ("in_flight", "done"):
            s.assign(0)
        if state == "done":
            s.complete(0, [1])
        if by_key:
            assert s.remove_key("k") == (outcome, None if outcome == "unknown" else 1)
        else:
            assert s.remove(1) == outcome
        assert len(s) == {"pending": 0, "in_flight": 1, "done": 0, "never": 0}[state]


# ---- adapter bugs


def test_complete_rejects_adapter_bugs_without_changing_state() -> None:
    s = _sched(lanes=2)
    s.add(Entry(1, "a", 0))
    s.add(Entry(2, "a", 0))
    s.add(Entry(3, "b", 0))
    s.assign(0)
    bad: list[tuple[object, list[int], list[int]]] = [
        (-1, [1, 2], []),
        (2, [1, 2], []),
        ("0", [1, 2], []),
        (None, [1, 2], []),
        (0, [1], []),  # missing mid 2
        (0, [1, 2, 3], []),  # 3 is lane 1's
        (0, [1, 2, 99], []),  # unknown mid
        (0, [1, 2], [2]),  # named twice
        (0, [1, 1, 2], []),
    ]
    for lane, done, retry in bad:
        with pytest.raises(ValueError):
            s.complete(lane, done, retry)  # type: ignore[arg-type]
    assert len(s) == 3 and s.busy_lanes() == {0, 1}
    s.complete(0, [1, 2])
    with pytest.raises(ValueError):
        s.complete(0, [1, 2])  # lane 0 is idle now
    s.complete(1, [3])
    assert len(s) == 0 and s.counts() == {}


def test_duplicate_mid_and_bad_config() -> None:
    s = _sched()
    s.add(Entry(1, "a", 0))
    with pytest.raises(ValueError):
        s.add(Entry(1, "b", 0))
    with pytest.raises(ValueError):
        Scheduler(lanes=0)
    with pytest.raises(ValueError):
        Scheduler(batch=0)
    with pytest.raises(ValueError):
        Scheduler(pack=0)


# ---- views and housekeeping


def test_pending_pages_by_position() -> None:
    s = _sched()
    for mid, due in ((1, 30), (2, 10), (3, 20), (4, 10), (5, 40)):
        s.add(Entry(mid, "a", due))
    page = s.pending("a", None, 2)
    assert [e.mid for e in page] == [2, 4]
    last = page[-1]
    assert s.remove(last.mid) == "removed", "the cursor survives its entry leaving"
    page = s.pending("a", (last.due_ms, last.mid), 2)
    assert [e.mid for e in page] == [3, 1]
    assert [e.mid for e in s.pending("a", (30, 1), 10)] == [5]
    assert s.pending("zzz", None, 10) == [] and s.pending("a", None, 0) == []
    s.assign(20)
    assert [e.mid for e in s.pending("a", None, 10)] == [1, 5], "in-flight entries are not listed"


def test_counts_and_lane_views() -> None:
    s = _sched(lanes=2, batch=1)
    s.add(Entry(1, "a", 0))
    s.add(Entry(2, "a", 7))
    s.add(Entry(3, "b", 9))
    assert s.counts() == {"a": (2, 0), "b": (1, 9)}
    s.assign(0)
    assert s.counts() == {"a": (1, 7), "b": (1, 9)}
    assert s.lane_of("a") == 0 and s.lane_of("b") is None and s.lane_of("nope") is None
    assert s.busy_lanes() == {0}
    s.remove(2)
    assert s.counts() == {"a": (0, None), "b": (1, 9)}, "a holds a lane with nothing pending"
    s.complete(0, [1])
    assert s.counts() == {"b": (1, 9)}


def test_many_cancels_compact_the_topic_heap() -> None:
    s = _sched(lanes=1, batch=1000)
    for mid in range(1000):
        s.add(Entry(mid, "a", mid % 50))
    for mid in range(1000):
        if mid % 100:
            assert s.remove(mid) == "removed"
    assert [e.mid for e in s.assign(10**6)[0].entries] == list(range(0, 1000, 100))


def test_many_earlier_adds_across_topics_stay_correct() -> None:
    # Every add lowers its topic's earliest due, leaving stale items in the armed heap.
    s = _sched(lanes=4, batch=10_000)
    mid = 0
    for due in range(500, 0, -1):
        for topic in ("a", "b", "c"):
            mid += 1
            s.add(Entry(mid, topic, due))
    assert s.next_due_ms() == 1
    assert s.assign(0) == []
    got = s.assign(250)
    assert sorted(a.topic for a in got) == ["a", "b", "c"]
    assert all(len(a.entries) == 250 for a in got)


# ---------------------------------------------------------------- state machine

TOPICS = ("a", "b", "c")
KEYS = ("k1", "k2", "k3")


class SchedulerMachine(RuleBasedStateMachine):
    """Drives Scheduler against a plain model; the model decides what must come out."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1_000
        self.next_mid = 1
        self.mids: list[int] = []
        self.entries: dict[int, Entry] = {}  # pending and in flight
        self.flight: dict[int, int] = {}  # mid -> lane
        self.lanes: dict[int, list[tuple[str, list[int]]]] = {}  # lane -> [(topic, mids)]
        self.keyed: dict[str, int] = {}
        self.accepted: set[int] = set()
        self.completed: list[int] = []
        self.retried: set[int] = set()
        self.order: dict[str, list[Entry]] = {}

    @initialize(lanes=st.integers(1, 3), batch=st.integers(1, 4), pack=st.integers(1, 6))
    def setup(self, lanes: int, batch: int, pack: int) -> None:
        self.n_lanes = lanes
        self.active = lanes
        self.batch = batch
        self.pack = pack
        self.s = Scheduler(lanes=lanes, batch=batch, pack=pack)

    def _pending(self, topic: str | None = None) -> list[Entry]:
        return sorted(
            (
                e
                for m, e in self.entries.items()
                if m not in self.flight and (topic is None or e.topic == topic)
            ),
            key=lambda e: (e.due_ms, e.mid),
        )

    def _lane_topics(self) -> set[str]:
        """Topics with a batch out on a lane."""
        return {topic for batches in self.lanes.values() for topic, _ in batches}

    @rule(
        topic=st.sampled_from(TOPICS),
        offset=st.integers(0, 40),
        key=st.none() | st.sampled_from(KEYS),
        content_bytes=st.integers(0, 500),
    )
    def add(self, topic: str, offset: int, key: str | None, content_bytes: int) -> None:
        entry = Entry(self.next_mid, topic, self.now + offset, key, content_bytes=content_bytes)
        self.next_mid += 1
        self.mids.append(entry.mid)
        got = self.s.add(entry)
        if key is not None and key in self.keyed:
            old = self.keyed[key]
            assert got is self.entries[old]
            del self.entries[old]
            self.accepted.discard(old)
        else:
            assert got is None
        if key is not None:
            self.keyed[key] = entry.mid
        self.entries[entry.mid] = entry
        self.accepted.add(entry.mid)

    def _forget_pending(self, mid: int) -> None:
        entry = self.entries.pop(mid)
        self.accepted.discard(mid)
        if entry.key is not None and self.keyed.get(entry.key) == mid:
            del self.keyed[entry.key]

    @precondition(lambda self: self.mids)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        mid = data.draw(st.sampled_from(self.mids))
        got = self.s.remove(mid)
        if mid not in self.entries:
            assert got == "unknown"
        elif mid in self.flight:
            assert got == "in_flight"
        else:
            assert got == "removed"
            self._forget_pending(mid)

    @rule(key=st.sampled_from((*KEYS, "never-used")))
    def remove_key(self, key: str) -> None:
        status, mid = self.s.remove_key(key)
        if key in self.keyed:
            assert (status, mid) == ("removed", self.keyed[key])
            self._forget_pending(self.keyed[key])
        elif any(self.entries[m].key == key for m in self.flight):
            assert status == "in_flight"
            assert mid in self.flight and self.entries[mid].key == key
        else:
            assert (status, mid) == ("unknown", None)

    @rule(data=st.data())
    def set_active(self, data: st.DataObject) -> None:
        self.active = data.draw(st.integers(1, self.n_lanes))
        self.s.set_active_lanes(self.active)
        assert self.s.active_lanes == self.active

    @rule(delta=st.integers(0, 30))
    def advance(self, delta: int) -> None:
        self.now += delta

    @rule()
    def assign(self) -> None:
        self._check_assign(self.s.assign(self.now))

    def _check_assign(self, got: list[Assignment]) -> None:
        turns: dict[int, int] = {}  # lane -> entries of the turn this assign() gave it
        for a in got:
            if a.lane in turns:  # packed into the lane's new turn
                limit = min(self.batch, self.pack - turns[a.lane])
                assert limit > 0, "a turn packed beyond pack"
            else:
                assert a.lane not in self.lanes, "a busy lane got another turn"
                limit = self.batch
            assert a.lane < self.active, "an inactive lane got a batch"
            assert a.topic not in self._lane_topics(), "a topic holds two lanes"
            due = [e for e in self._pending(a.topic) if e.due_ms <= self.now]
            assert list(a.entries) == due[:limit]
            assert a.entries, "an empty batch wastes a lane"
            self.lanes.setdefault(a.lane, []).append((a.topic, [e.mid for e in a.entries]))
            turns[a.lane] = turns.get(a.lane, 0) + len(a.entries)
            for e in a.entries:
                assert e.due_ms <= self.now, "assigned early"
                self.flight[e.mid] = a.lane
                if e.key is not None and self.keyed.get(e.key) == e.mid:
                    del self.keyed[e.key]
        # work-conserving: no idle active lane while a lane-less topic has something due
        idle = [lane for lane in range(self.active) if lane not in self.lanes]
        assert self.s.has_idle_lane() == bool(idle)
        # a new turn with room left packed every lane-less topic with something due
        if idle or any(total < self.pack for total in turns.values()):
            busy = self._lane_topics()
            assert not [e for e in self._pending() if e.due_ms <= self.now and e.topic not in busy]

    @precondition(lambda self: self.lanes)
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        lane = data.draw(st.sampled_from(sorted(self.lanes)))
        batches = self.lanes[lane]
        topic, mids = batches.pop(data.draw(st.integers(0, len(batches) - 1)))
        if not batches:
            del self.lanes[lane]
        retry = set(data.draw(st.lists(st.sampled_from(mids), unique=True, max_size=len(mids))))
        done = [m for m in mids if m not in retry]
        self.s.complete(lane, done, sorted(retry))
        for mid in mids:
            del self.flight[mid]
        for mid in done:
            entry = self.entries.pop(mid)
            assert mid in self.accepted and mid not in self.completed
            self.completed.append(mid)
            self.order.setdefault(topic, []).append(entry)
        for mid in retry:
            self.retried.add(mid)
            key = self.entries[mid].key
            if key is not None:
                self.keyed.setdefault(key, mid)

    @precondition(lambda self: self.lanes)
    @rule(data=st.data())
    def complete_wrongly(self, data: st.DataObject) -> None:
        lane = data.draw(st.sampled_from(sorted(self.lanes)))
        batches = self.lanes[lane]
        _, mids = batches[0]
        cases = [
            (lane, mids[1:], []),
            (lane, [*mids, 10**9], []),
            (lane, mids, mids[:1]),
            (self.n_lanes, mids, []),
        ]
        if len(batches) > 1:  # two topics' batches of one turn named as one
            cases.append((lane, [*mids, *batches[1][1]], []))
        wrong = data.draw(st.sampled_from(cases))
        try:
            self.s.complete(*wrong)
        except ValueError:
            pass
        else:
            raise AssertionError(f"complete{wrong} was accepted")

    @invariant()
    def views_match_model(self) -> None:
        if not hasattr(self, "s"):
            return
        assert len(self.s) == len(self.entries)
        # the content the window keeps is counted exactly, however entries leave
        assert self.s.content_bytes == sum(e.content_bytes for e in self.entries.values())
        assert self.s.busy_lanes() == set(self.lanes)
        for lane, batches in self.lanes.items():
            for topic, _ in batches:
                assert self.s.lane_of(topic) == lane
        busy = self._lane_topics()
        free_dues = [e.due_ms for e in self._pending() if e.topic not in busy]
        assert self.s.next_due_ms() == (min(free_dues) if free_dues else None)
        expected: dict[str, tuple[int, int | None]] = {t: (0, None) for t in busy}
        for e in self._pending():
            count, first = expected.get(e.topic, (0, None))
            expected[e.topic] = (count + 1, e.due_ms if first is None else first)
        assert self.s.counts() == expected
        for key in KEYS:
            assert self.s.key_mids(key) == {m for m, e in self.entries.items() if e.key == key}
        for mid in self.mids[-5:]:
            assert (mid in self.s) == (mid in self.entries)
            assert self.s.in_flight(mid) == (mid in self.flight)
            assert self.s.entry(mid) is self.entries.get(mid)

    def teardown(self) -> None:
        if not hasattr(self, "s"):
            return
        self.s.set_active_lanes(self.n_lanes)
        self.active = self.n_lanes
        self.now = 10**15
        for _ in range(10_000):
            got = self.s.assign(self.now)
            self._check_assign(got)
            if not self.lanes:
                break
            for lane, batches in list(self.lanes.items()):
                for topic, mids in batches:
                    self.s.complete(lane, mids)
                    for mid in mids:
                        del self.flight[mid]
                        self.completed.append(mid)
                        self.order.setdefault(topic, []).append(self.entries.pop(mid))
                self.lanes.pop(lane, None)
        assert len(self.s) == 0 and not self.entries
        assert len(self.completed) == len(set(self.completed)), "completed twice"
        assert set(self.completed) == self.accepted, "lost or extra entries"
        for topic, done in self.order.items():
            firsts = [(e.due_ms, e.mid) for e in done if e.mid not in self.retried]
            assert firsts == sorted(firsts), f"{topic} completed out of order"


SchedulerMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSchedulerMachine = SchedulerMachine.TestCase
