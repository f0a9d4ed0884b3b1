"""The state of the ``directed`` worker's pure core and the questions asked of it.

For every accepted request a :class:`~workers.directed.model.Detail` (counters and expiry,
never the content), for every target an ordered queue of internal message ids ("mids") and at
most one ack buffer (the last batch handed out, under a record id). :class:`CoreState` holds
them, answers the read-only queries (a message's status, a target's, the targets that have
not acknowledged a message) and rebuilds itself from what the store kept after a restart
(:meth:`CoreState.restore`). The events that change it are those of its subclass
:class:`~workers.directed.core.DirectedCore`. No I/O and no clock.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Literal, Self

from workers.directed.model import (
    MISSED_IDS_LIMIT,
    Buffer,
    Counts,
    DeleteContent,
    Detail,
    MessageStatus,
    Op,
    OverflowPolicy,
)


class Target:
    """One target: its queue and its ack buffer.

    The queue is a deque of mids, not of (seq, mid) pairs: seqs are contiguous, so the head's
    seq is ``tail_seq - len(mids) + 1`` and 10,000 targets x 50 entries cost one pointer each.
    Mids are ascending along the queue (mids grow, entries leave only from the head).
    """

    __slots__ = ("alive", "buffer", "gap_ids", "mids", "missed", "tail_seq")

    def __init__(self) -> None:
        self.mids: deque[int] = deque()
        self.tail_seq = 0  # 0 while empty, so seqs restart at 1 exactly as restore() does
        # Entries whose content is alive. Kept exact (expiry updates it through _holders) so
        # the queue-limit check in submit is O(1) per target, even though dead entries stay
        # in the deque until they reach the head.
        self.alive = 0
        self.buffer: Buffer | None = None
        # The gap since the last batch was made: queued ids that were dropped (drop-head) or
        # expired before the target got them. The next batch carries it.
        self.missed = 0
        self.gap_ids: list[str] = []


class CoreState:
    """The core's state: messages (details, expiry and tombstone heaps) and targets (queues,
    buffers, gaps), with the queries that read it and the journal its events fill."""

    def __init__(
        self,
        *,
        queue_limit: int = 50,
        overflow: OverflowPolicy = OverflowPolicy.DROP_HEAD,
        max_batch: int = 100,
    ) -> None:
        if queue_limit < 1:
            raise ValueError(f"queue_limit must be >= 1, got {queue_limit}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._limit = queue_limit
        self._overflow = OverflowPolicy(overflow)
        self._max_batch = max_batch
        self._details: dict[int, Detail] = {}
        self._by_id: dict[str, int] = {}
        self._targets: dict[str, Target] = {}
        # Targets of each alive message that has a TTL, so that expiry can keep
        # Target.alive exact without scanning queues. Messages without TTL never need it.
        self._holders: dict[int, list[str]] = {}
        self._expiry: list[tuple[int, int]] = []  # heap of (expires_at_ms, mid)
        self._stale_expiry = 0  # heap entries of messages that finished before their TTL
        self._graveyard: list[tuple[int, int]] = []  # heap of (done_ms, mid) of tombstones
        self._next_mid = 1
        self._alive = 0
        self._journal: list[Op] = []
        # Messages whose counters changed since the journal was last taken; one Counts each
        # when it is taken, so 10,000 targets acknowledging (or dropping) the same message
        # journal one update.
        self._touched: dict[int, None] = {}
        self._gaps_touched: dict[str, None] = {}  # targets whose gap grew during this call

    # -- queries -----------------------------------------------------------------------------

    def status(self, message_id: str) -> MessageStatus | None:
        mid = self._by_id.get(message_id)
        if mid is None:
            return None
        d = self._details[mid]
        state: Literal["active", "done", "expired", "recalled"]
        if d.done_ms is None:
            state = "active"
        elif d.recalled:  # recall takes every remaining target at once, as expiry does
            state = "recalled"
        else:
            # Expiry takes every remaining target at once, so expired > 0 iff TTL ended it.
            state = "expired" if d.expired else "done"
        return MessageStatus(
            message_id=d.message_id,
            total=d.total,
            acked=d.acked,
            pending=d.remaining,
            expired=d.expired,
            dropped=d.dropped,
            recalled=d.recalled,
            state=state,
        )

    def backlog(self, target: str) -> int:
        """Alive entries queued for ``target``, not counting its unacknowledged buffer."""
        t = self._targets.get(target)
        return 0 if t is None else t.alive

    def target_status(self, target: str) -> dict[str, object]:
        """What ``target`` has: queued ids, the unacknowledged batch, the gap not yet
        acknowledged (in the batch and since)."""
        t = self._targets.get(target)
        if t is None:
            return {
                "target": target,
                "backlog": 0,
                "unacknowledged": 0,
                "missed": 0,
                "missed_ids": [],
            }
        buf = t.buffer
        missed = t.missed + (buf.missed if buf else 0)
        ids = (list(buf.missed_ids) if buf else []) + t.gap_ids
        return {
            "target": target,
            "backlog": t.alive,
            "unacknowledged": len(self._alive_only(buf.mids)) if buf else 0,
            "missed": missed,
            "missed_ids": ids[:MISSED_IDS_LIMIT],
        }

    def pending_targets(
        self, message_id: str, after: str | None, limit: int
    ) -> tuple[list[str], bool] | None:
        """Targets that have not acknowledged ``message_id`` (it is queued for them or in
        their unacknowledged batch), in name order after ``after``: (at most ``limit``
        names, whether more follow); None for an unknown message."""
        mid = self._by_id.get(message_id)
        if mid is None:
            return None
        if not self._details[mid].alive:
            return [], False
        page: list[str] = []
        for name in sorted(n for n in self._targets if after is None or n > after):
            t = self._targets[name]
            buf = t.buffer
            queued = bool(t.mids) and t.mids[0] <= mid <= t.mids[-1] and mid in t.mids
            if queued or (buf is not None and mid in buf.mids):
                if len(page) == limit:
                    return page, True
                page.append(name)
        return page, False

    def detail(self, mid: int) -> Detail | None:
        """A copy of the detail of ``mid`` (alive or tombstone), or None once purged."""
        d = self._details.get(mid)
        return None if d is None else replace(d)

    def mid_of(self, message_id: str) -> int | None:
        return self._by_id.get(message_id)

    def alive_message_id(self, mid: int) -> str | None:
        """The producer's id of ``mid`` while its content is alive (no copy: hot path)."""
        d = self._details.get(mid)
        return d.message_id if d is not None and d.done_ms is None else None

    def targets(self) -> list[str]:
        """Names of the targets with a queue or a buffer (a copy: safe to iterate anywhere)."""
        return list(self._targets)

    @property
    def alive_messages(self) -> int:
        """Messages whose content is still stored."""
        return self._alive

    @property
    def target_count(self) -> int:
        """Targets with a queue (possibly of dead entries only) or an ack buffer."""
        return len(self._targets)

    @property
    def tombstones(self) -> int:
        return len(self._details) - self._alive

    def take_journal(self) -> list[Op]:
        """The ops recorded since the last call, in the order the store must apply them."""
        self._journal_counts()
        ops, self._journal = self._journal, []
        return ops

    def _journal_counts(self) -> None:
        """Journal the counters of every message touched since the last time (and the
        deletion of the content of those that finished)."""
        if not self._touched:
            return
        emit = self._journal.append
        details = self._details
        for mid in self._touched:
            d = details[mid]
            emit(Counts(mid, d.remaining, d.acked, d.expired, d.dropped, d.recalled))
            # Only alive messages are ever touched, so a done one died since the last time.
            if d.done_ms is not None:
                emit(DeleteContent(mid, d.done_ms))
        self._touched.clear()

    # -- restart -----------------------------------------------------------------------------

    @classmethod
    def restore(
        cls,
        *,
        details: Iterable[Detail],
        queues: Mapping[str, Sequence[tuple[int, int]]],
        buffers: Mapping[str, Buffer],
        gaps: Mapping[str, tuple[int, Sequence[str]]] | None = None,
        queue_limit: int = 50,
        overflow: OverflowPolicy = OverflowPolicy.DROP_HEAD,
        max_batch: int = 100,
    ) -> Self:
        """Rebuild a core from the store: details, ``target -> [(seq, mid)]`` ascending, buffers.

        The journal starts empty. A smaller ``queue_limit`` than before is honoured lazily:
        drop-head trims a queue on its next submit, reject refuses until it drains.
        """
        core = cls(queue_limit=queue_limit, overflow=overflow, max_batch=max_batch)
        top = 0
        for src in details:
            d = replace(src)  # never share mutable state with the caller
            core._details[d.mid] = d
            core._by_id[d.message_id] = d.mid
            top = max(top, d.mid)
            if d.done_ms is not None:
                core._graveyard.append((d.done_ms, d.mid))
                continue
            core._alive += 1
            if d.expires_at_ms is not None:
                core._expiry.append((d.expires_at_ms, d.mid))
        for key, entries in queues.items():
            if not entries:
                continue
            first, last = entries[0][0], entries[-1][0]
            if last - first + 1 != len(entries):
                raise ValueError(f"queue of {key!r}: seqs {first}..{last} are not contiguous")
            t = core._targets[key] = Target()
            t.tail_seq = last
            prev = 0
            for _, mid in entries:
                if mid <= prev:
                    raise ValueError(f"queue of {key!r}: mids are not ascending at {mid}")
                prev = mid
                t.mids.append(mid)
                held = core._details.get(mid)
                if held is not None and held.done_ms is None:
                    t.alive += 1
                    if held.expires_at_ms is not None:
                        core._holders.setdefault(mid, []).append(key)
            top = max(top, prev)
        for key, buf in buffers.items():
            t = core._targets.get(key) or core._targets.setdefault(key, Target())
            t.buffer = Buffer(buf.record_id, tuple(buf.mids), buf.missed, tuple(buf.missed_ids))
            top = max(top, *t.buffer.mids, 0)
        for key, (missed, ids) in (gaps or {}).items():
            if missed:
                t = core._targets.get(key) or core._targets.setdefault(key, Target())
                t.missed, t.gap_ids = missed, list(ids)
        heapq.heapify(core._expiry)
        heapq.heapify(core._graveyard)
        # Past every mid still referenced anywhere, so a dead entry can never come back to
        # life as a new message (tombstones purged since may have had higher mids; reusing
        # those is harmless because nothing refers to them).
        core._next_mid = top + 1
        return core

    # -- shared by the events and the queries ----------------------------------------

    def _alive_only(self, mids: Iterable[int]) -> tuple[int, ...]:
        details = self._details
        return tuple(m for m in mids if (d := details.get(m)) is not None and d.done_ms is None)

    def _recalled_ids(self, buf: Buffer) -> tuple[str, ...]:
        details = self._details
        return tuple(
            d.message_id for m in buf.mids if (d := details.get(m)) is not None and d.recalled
        )
