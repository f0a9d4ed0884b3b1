"""Pure core of the ``delay`` worker: which topic sends next.

``Scheduler`` holds the near-term window of pending messages and hands out sender lanes.
A topic (the adapter's business topic) holds at most one lane at a time, for at most
``batch`` messages; idle lanes go round-robin to topics with due messages, so 100,000 due at
once on one topic cannot make another topic's message late (seed 004).
A lane's turn may carry several topics' small batches together, up to ``pack`` messages in
all (one socket write for all of them instead of one per topic; each batch is completed
on its own); a topic is still on one lane at a time, in order.

Time is integer epoch milliseconds. No I/O: the adapters own the store and the channels,
feed events in (``add``, ``remove``, ``complete``) and act on what comes out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from heapq import heapify, heappop, heappush, nsmallest
from typing import Literal


@dataclass(slots=True)
class Entry:
    """One pending message in the window. ``mid`` is the store rowid, increasing with arrival.

    ``content`` is the adapter's (the stored message, if kept in memory); the scheduler adds
    up the ``content_bytes`` of what it holds (:attr:`Scheduler.content_bytes`).

    Once added, an entry belongs to the scheduler: changing its fields would orphan it.
    """

    mid: int
    topic: str
    due_ms: int
    key: str | None = None
    content: object = None
    content_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Assignment:
    """Lane ``lane`` is to publish ``entries`` (all of ``topic``, in order) and then complete().

    One assign() may give a lane several assignments (a packed turn, one per topic); each is
    completed on its own."""

    lane: int
    topic: str
    entries: tuple[Entry, ...]


# Where a topic is in its cycle. IDLE topics with pending entries sit in the armed heap;
# WAITING ones are due and queued for a lane; RETURNED ones just gave a lane back and are
# queued behind everything that became due meanwhile, at the next assign().
_IDLE, _WAITING, _RETURNED, _LANE, _GONE = range(5)


class _Topic:
    __slots__ = ("armed_due", "heap", "lane", "name", "pending", "state")

    def __init__(self, name: str) -> None:
        self.name = name
        # (due_ms, mid) of pending entries. Removal is lazy: a pair whose entry is gone, in
        # flight, or changed is skipped when it surfaces, so remove() stays O(1).
        self.heap: list[tuple[int, int]] = []
        self.pending = 0
        self.state = _IDLE
        self.armed_due: int | None = None
        self.lane: int | None = None


class _Lane:
    __slots__ = ("size", "topic")

    def __init__(self, topic: _Topic, size: int) -> None:
        self.topic = topic
        self.size = size


class Scheduler:
    """Per-topic due index and sender-lane assignment for the in-memory window.

    Costs: add, remove and each assigned entry O(log n) in the topic's size; assign's search
    for due topics is O(log t) per topic, never a scan of entries.
    """

    def __init__(self, *, lanes: int = 8, batch: int = 500, pack: int = 1) -> None:
        if lanes < 1 or batch < 1 or pack < 1:
            raise ValueError(
                f"lanes, batch and pack must be >= 1, got lanes={lanes} batch={batch} pack={pack}"
            )
        self._n_lanes = lanes
        self._batch = batch
        # A lane turn whose first topic took fewer than this many entries takes more waiting
        # topics, until the turn holds this many (see the module).
        self._pack = pack
        self._entries: dict[int, Entry] = {}  # pending and in flight
        self._flight: dict[int, int] = {}  # mid -> lane; at most lanes * batch items
        self._topics: dict[str, _Topic] = {}
        # (earliest due, topic name) of IDLE topics; stale items are skipped by armed_due.
        self._armed: list[tuple[int, str]] = []
        self._waiting: deque[_Topic] = deque()
        self._returned: list[_Topic] = []
        self._lanes: list[list[_Lane]] = [[] for _ in range(lanes)]  # a batch per topic
        self._free: list[int] = list(range(lanes))  # heap: lowest idle lane first
        # Lanes numbered >= this get no new batch (the adapter starts lanes as needed).
        self._active = lanes
        # key -> the pending entry a newer message with that key replaces.
        self._keyed: dict[str, int] = {}
        # key -> mids in flight, so cancel can answer "already being sent".
        self._flight_keys: dict[str, set[int]] = {}
        # key -> every mid held with that key (pending, in flight, or retried after a newer
        # same-key message took the key), so the adapter knows which stored rows to spare.
        self._by_key: dict[str, set[int]] = {}
        self.content_bytes = 0  # of the entries held (pending and in flight)

    # ---- events

    def add(self, entry: Entry) -> Entry | None:
        """Take ``entry`` into the window; return the entry the adapter must delete, if any.

        A pending entry with the same key is replaced by the newer message (higher mid), which
        may be ``entry`` itself losing to a newer one already here. A same-key entry in flight
        is being sent already, so ``entry`` is simply added.
        """
        if entry.mid in self._entries:
            raise ValueError(f"mid {entry.mid} is already scheduled")
        replaced: Entry | None = None
        if entry.key is not None:
            old_mid = self._keyed.get(entry.key)
            if old_mid is not None:
                if old_mid > entry.mid:
                    return entry
                replaced = self._entries[old_mid]
                self._drop_pending(replaced)
            self._keyed[entry.key] = entry.mid
            self._by_key.setdefault(entry.key, set()).add(entry.mid)
        self._entries[entry.mid] = entry
        self.content_bytes += entry.content_bytes
        topic = self._topics.get(entry.topic)
        if topic is None:
            topic = self._topics[entry.topic] = _Topic(entry.topic)
        self._push(topic, entry)
        return replaced

    def remove(self, mid: int) -> Literal["removed", "in_flight", "unknown"]:
        """Cancel by id. In flight means a lane is publishing it; the adapter says so."""
        entry = self._entries.get(mid)
        if entry is None:
            return "unknown"
        if mid in self._flight:
            return "in_flight"
        self._drop_pending(entry)
        return "removed"

    def remove_key(self, key: str) -> tuple[Literal["removed", "in_flight", "unknown"], int | None]:
        """Cancel by ``x-delay-key``; returns the outcome and the mid it concerns."""
        mid = self._keyed.get(key)
        if mid is not None:
            self._drop_pending(self._entries[mid])
            return "removed", mid
        flying = self._flight_keys.get(key)
        if flying:
            return "in_flight", max(flying)
        return "unknown", None

    def assign(self, now_ms: int) -> list[Assignment]:
        """Give idle lanes to due topics, round-robin; each gets up to ``batch`` due entries.
        A lane whose first topic took fewer than ``pack`` entries takes the next waiting
        topics too, up to ``pack`` entries in all (the last one may get fewer than it has
        due: it waits for its next turn with the rest)."""
        self._refresh(now_ms)
        out: list[Assignment] = []
        while self._free and self._free[0] < self._active and self._waiting:
            lane = self._free[0]
            taken = self._take(lane, now_ms, self._batch)
            if taken is None:
                continue
            heappop(self._free)
            out.append(taken)
            total = len(taken.entries)
            while total < self._pack and self._waiting:
                taken = self._take(lane, now_ms, min(self._batch, self._pack - total))
                if taken is not None:
                    out.append(taken)
                    total += len(taken.entries)
        return out

    def _take(self, lane: int, now_ms: int, limit: int) -> Assignment | None:
        """The next waiting topic's due entries (at most ``limit``) for ``lane``; None if
        the topic popped from the waiting line has nothing due any more."""
        topic = self._waiting.popleft()
        if topic.state != _WAITING:
            return None
        head = self._head(topic)
        if head is None or head > now_ms:
            # Its due entries were cancelled while it waited (or the clock went back).
            topic.state = _IDLE
            if head is not None:
                self._arm(topic, head)
            return None
        batch: list[Entry] = []
        heap = topic.heap
        while len(batch) < limit:
            head = self._head(topic)
            if head is None or head > now_ms:
                break
            entry = self._entries[heappop(heap)[1]]
            self._flight[entry.mid] = lane
            key = entry.key
            if key is not None:
                if self._keyed.get(key) == entry.mid:
                    del self._keyed[key]
                self._flight_keys.setdefault(key, set()).add(entry.mid)
            batch.append(entry)
        topic.pending -= len(batch)
        topic.state = _LANE
        topic.lane = lane
        self._lanes[lane].append(_Lane(topic, len(batch)))
        return Assignment(lane, topic.name, tuple(batch))

    def complete(self, lane: int, done: Iterable[int], retry: Iterable[int] = ()) -> None:
        """Lane ``lane`` finished one of its batches: ``done`` mids leave, ``retry`` mids are
        pending again. The lane is free once every batch of its turn is complete.

        Together ``done`` and ``retry`` must name exactly one batch of the lane; anything else
        is an adapter bug and raises ValueError without changing state. Retried entries keep
        their due time, so they go out first when the topic next gets a lane.
        """
        done = list(done)
        retry = list(retry)
        record = self._record(lane, done[0] if done else retry[0] if retry else None)
        seen: set[int] = set()
        for mid in (*done, *retry):
            if (
                mid in seen
                or self._flight.get(mid) != lane
                or self._entries[mid].topic != record.topic.name
            ):
                raise ValueError(f"mid {mid!r} is not in lane {lane}'s batch or named twice")
            seen.add(mid)
        if len(seen) != record.size:
            raise ValueError(
                f"lane {lane} sent {record.size} entries, complete() named {len(seen)}"
            )

        topic = record.topic
        for mid in done:
            del self._flight[mid]
            entry = self._entries.pop(mid)
            self.content_bytes -= entry.content_bytes
            if entry.key is not None:
                self._unfly_key(entry.key, mid)
                self._unkey(entry.key, mid)
        for mid in retry:
            del self._flight[mid]
            entry = self._entries[mid]
            if entry.key is not None:
                self._unfly_key(entry.key, mid)
                # If a newer same-key message arrived while this one was in flight, that one
                # owns the key now; this one was promised as "being sent" and stays an
                # obligation rather than becoming replaceable again.
                self._keyed.setdefault(entry.key, mid)
            heappush(topic.heap, (entry.due_ms, mid))
            topic.pending += 1

        records = self._lanes[lane]
        records.remove(record)
        if not records:
            heappush(self._free, lane)
        topic.lane = None
        if topic.pending:
            topic.state = _RETURNED
            self._returned.append(topic)
        else:
            self._forget(topic)

    def _record(self, lane: int, mid: int | None) -> _Lane:
        """The batch of ``lane`` that holds ``mid`` (the batch of its topic)."""
        if (
            not (isinstance(lane, int) and not isinstance(lane, bool) and 0 <= lane < self._n_lanes)
            or not self._lanes[lane]
        ):
            raise ValueError(f"lane {lane!r} holds no batch")
        entry = None if mid is None else self._entries.get(mid)
        if entry is not None:
            for record in self._lanes[lane]:
                if record.topic.name == entry.topic:
                    return record
        raise ValueError(f"mid {mid!r} is not in lane {lane}'s batch or named twice")

    # ---- views

    def next_due_ms(self) -> int | None:
        """Earliest due among pending entries that assign() could hand out.

        Entries of a topic that holds a lane are left out: they wait for that lane's
        complete(), which wakes the adapter anyway. A value <= now while every active lane is
        busy likewise means "wait for a complete()" (or for the adapter to add a lane).
        """
        best = self._armed_top()
        for topic in (*self._waiting, *self._returned):
            if topic.state in (_WAITING, _RETURNED):
                head = self._head(topic)
                if head is not None and (best is None or head < best):
                    best = head
        return best

    def counts(self) -> dict[str, tuple[int, int | None]]:
        """topic -> (entries pending and not in flight, earliest due among them)."""
        return {name: (t.pending, self._head(t)) for name, t in self._topics.items()}

    def pending(self, topic: str, after: tuple[int, int] | None, limit: int) -> list[Entry]:
        """One page of ``topic``'s pending entries (not in flight), in (due_ms, mid) order.

        ``after`` is ``(due_ms, mid)`` of the previous page's last entry. It is a position, not
        an id, so paging keeps working while that entry is sent or cancelled. O(n log limit).
        """
        t = self._topics.get(topic)
        if t is None or limit <= 0:
            return []
        # A set, because a mid removed and re-added with the same due can appear twice.
        pairs = {p for p in t.heap if (after is None or p > after) and self._valid(t, *p)}
        return [self._entries[mid] for _, mid in nsmallest(limit, pairs)]

    def topics_waiting(self, now_ms: int) -> list[str]:
        """Topics with entries due at ``now_ms`` and no lane, in the order they will get one."""
        self._refresh(now_ms)
        return [t.name for t in self._waiting if t.state == _WAITING]

    def lane_of(self, topic: str) -> int | None:
        t = self._topics.get(topic)
        return None if t is None else t.lane

    @property
    def active_lanes(self) -> int:
        return self._active

    def set_active_lanes(self, n: int) -> None:
        """Use only lanes ``0..n-1`` for new batches; a higher lane finishes its batch.

        The pool stays ``lanes`` big: the adapter may start with few active lanes and add one
        when a due topic has waited too long, so a light load spread over many topics does
        not wake many threads (which costs more than it buys in one Python process).
        """
        if not 1 <= n <= self._n_lanes:
            raise ValueError(f"active lanes must be 1..{self._n_lanes}, got {n}")
        self._active = n

    def has_idle_lane(self) -> bool:
        """Whether assign() could hand a batch to some lane now."""
        return bool(self._free) and self._free[0] < self._active

    def busy_lanes(self) -> set[int]:
        return {i for i, records in enumerate(self._lanes) if records}

    def __len__(self) -> int:
        """Entries held: pending plus in flight."""
        return len(self._entries)

    def __contains__(self, mid: object) -> bool:
        """Whether ``mid`` is held (pending or in flight)."""
        return mid in self._entries

    def entry(self, mid: int) -> Entry | None:
        """The held entry with this mid (pending or in flight), if any."""
        return self._entries.get(mid)

    def in_flight(self, mid: int) -> bool:
        return mid in self._flight

    def key_mids(self, key: str) -> frozenset[int]:
        """Every held mid carrying ``key``: the pending owner, those in flight, and those that
        went back to pending after a failed publish while a newer same-key message arrived.

        After ``remove_key(key)`` these are the messages a newer same-key message must not
        replace (they were promised as "being sent"); the adapter spares their stored rows.
        """
        return frozenset(self._by_key.get(key, ()))

    # ---- internals

    def _valid(self, topic: _Topic, due: int, mid: int) -> bool:
        entry = self._entries.get(mid)
        return (
            entry is not None
            and entry.due_ms == due
            and entry.topic == topic.name
            and mid not in self._flight
        )

    def _head(self, topic: _Topic) -> int | None:
        """Earliest due of the topic's pending entries, dropping stale pairs on the way."""
        heap = topic.heap
        while heap:
            due, mid = heap[0]
            if self._valid(topic, due, mid):
                return due
            heappop(heap)
        return None

    def _push(self, topic: _Topic, entry: Entry) -> None:
        heappush(topic.heap, (entry.due_ms, entry.mid))
        topic.pending += 1
        # Only an IDLE topic lives in the armed heap; the others are re-examined when they
        # leave the waiting line or give their lane back.
        if topic.state == _IDLE and (topic.armed_due is None or entry.due_ms < topic.armed_due):
            self._arm(topic, entry.due_ms)

    def _arm(self, topic: _Topic, due: int) -> None:
        topic.armed_due = due
        heappush(self._armed, (due, topic.name))
        # Re-arming leaves the old item behind; rebuild before stale items dominate.
        if len(self._armed) > 64 and len(self._armed) > 2 * len(self._topics):
            self._armed = [
                (t.armed_due, t.name)
                for t in self._topics.values()
                if t.state == _IDLE and t.armed_due is not None
            ]
            heapify(self._armed)

    def _armed_top(self) -> int | None:
        """Make the armed heap's top valid and exact; return its due."""
        # self._armed is re-read each turn: _arm() may rebuild it.
        while self._armed:
            due, name = self._armed[0]
            topic = self._topics.get(name)
            if topic is None or topic.state != _IDLE or topic.armed_due != due:
                heappop(self._armed)
                continue
            head = self._head(topic)
            if head == due:
                return due
            # Its earliest entry was cancelled: the armed due is too early; re-arm exactly.
            heappop(self._armed)
            topic.armed_due = None
            if head is not None:
                self._arm(topic, head)
        return None

    def _refresh(self, now_ms: int) -> None:
        """Queue topics that became due, then those that gave a lane back, in that order."""
        while (due := self._armed_top()) is not None and due <= now_ms:
            topic = self._topics[heappop(self._armed)[1]]
            topic.armed_due = None
            topic.state = _WAITING
            self._waiting.append(topic)
        # After the loop above, so a topic returning its lane goes behind every topic that
        # became due while it held the lane: the round-robin the seed's isolation relies on.
        returned, self._returned = self._returned, []
        for topic in returned:
            if topic.state != _RETURNED:
                continue
            head = self._head(topic)
            if head is None:  # unreachable: an empty topic is forgotten
                continue
            if head <= now_ms:
                topic.state = _WAITING
                self._waiting.append(topic)
            else:
                topic.state = _IDLE
                self._arm(topic, head)

    def _drop_pending(self, entry: Entry) -> None:
        del self._entries[entry.mid]
        self.content_bytes -= entry.content_bytes
        if entry.key is not None:
            if self._keyed.get(entry.key) == entry.mid:
                del self._keyed[entry.key]
            self._unkey(entry.key, entry.mid)
        topic = self._topics[entry.topic]
        topic.pending -= 1
        if topic.pending == 0:
            topic.heap.clear()
            if topic.lane is None:
                self._forget(topic)
        elif len(topic.heap) > 64 and len(topic.heap) > 2 * topic.pending:
            # Lazy removal leaves pairs behind; compact so cancels cannot grow memory.
            topic.heap = list({p for p in topic.heap if self._valid(topic, *p)})
            heapify(topic.heap)

    def _forget(self, topic: _Topic) -> None:
        # Queue and heap items still pointing at it are skipped by their state checks.
        topic.state = _GONE
        topic.heap.clear()
        del self._topics[topic.name]

    def _unkey(self, key: str, mid: int) -> None:
        held = self._by_key[key]
        held.discard(mid)
        if not held:
            del self._by_key[key]

    def _unfly_key(self, key: str, mid: int) -> None:
        flying = self._flight_keys[key]
        flying.discard(mid)
        if not flying:
            del self._flight_keys[key]
