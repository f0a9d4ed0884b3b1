"""Pure core of the ``directed`` worker: who still needs which message, and what a pull returns.

Owns, for every accepted request, a :class:`Detail` (counters and expiry, never the content),
for every target an ordered queue of internal message ids ("mids") and at most one ack buffer
(the last batch handed out, under a record id). Events come in with the current time as integer
milliseconds (:meth:`DirectedCore.submit`, :meth:`~DirectedCore.pull`,
:meth:`~DirectedCore.expire`, :meth:`~DirectedCore.purge`); decisions go out as return values,
and every state change is recorded as an :data:`Op` in a journal that the SQLite store applies,
in order, in one transaction (:meth:`~DirectedCore.take_journal`). After a restart
:meth:`DirectedCore.restore` rebuilds the core from what the store kept. No I/O and no clock.

De-duplication by ``message_id`` lasts while the message is alive plus the retention window of
its tombstone: once :meth:`~DirectedCore.purge` forgets it, the same id is accepted as new.
"""

from __future__ import annotations

import enum
import heapq
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, TypeAlias, TypedDict


class OverflowPolicy(enum.StrEnum):
    """What a submit does to a target whose queue already holds ``queue_limit`` live ids."""

    DROP_HEAD = "drop-head"
    REJECT = "reject"


@dataclass(slots=True)
class Detail:
    """Bookkeeping of one message; its content lives in the store under ``mid``.

    ``acked + expired + dropped + recalled + remaining == total`` at all times.
    """

    mid: int
    message_id: str
    total: int
    remaining: int
    acked: int = 0
    expired: int = 0
    dropped: int = 0
    created_ms: int = 0
    expires_at_ms: int | None = None
    # Set when the content may go (remaining reached 0, or the TTL passed); the Detail stays
    # as a tombstone for status queries and de-duplication until purged.
    done_ms: int | None = None
    # targets that had not acknowledged it when it was recalled
    recalled: int = 0

    @property
    def alive(self) -> bool:
        return self.done_ms is None


# At most this many message ids of a gap are kept (and reported in ``missed_ids``); the
# count ``missed`` goes on beyond.
MISSED_IDS_LIMIT = 100


@dataclass(slots=True, frozen=True)
class Buffer:
    """The batch last handed to a target, kept until the target echoes ``record_id``.

    ``missed``/``missed_ids``: the gap the batch reports (ids dropped or expired from the
    target's queue before it got them), acknowledged with the batch. A batch may carry a gap
    and no message."""

    record_id: str
    mids: tuple[int, ...]
    missed: int = 0
    missed_ids: tuple[str, ...] = ()


# -- journal ---------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class NewMessage:
    """A request was accepted; its counters start at ``remaining=total`` and 0 elsewhere."""

    mid: int
    message_id: str
    total: int
    created_ms: int
    expires_at_ms: int | None


@dataclass(slots=True, frozen=True)
class Enqueue:
    """``mid`` appended at the tail of ``target``'s queue under ``seq``.

    ``seq`` is the previous tail + 1, or 1 when the queue is empty.
    """

    target: str
    seq: int
    mid: int


@dataclass(slots=True, frozen=True)
class Dequeue:
    """Every entry of ``target`` with ``seq <= upto_seq`` is removed."""

    target: str
    upto_seq: int


@dataclass(slots=True, frozen=True)
class SetBuffer:
    target: str
    record_id: str
    mids: tuple[int, ...]
    missed: int = 0
    missed_ids: tuple[str, ...] = ()


@dataclass(slots=True, frozen=True)
class SetGap:
    """The target's gap not yet handed out in a batch is now ``missed`` (absolute; 0 clears)."""

    target: str
    missed: int
    missed_ids: tuple[str, ...]


@dataclass(slots=True, frozen=True)
class ClearBuffer:
    target: str


@dataclass(slots=True, frozen=True)
class Counts:
    """The new absolute counters of a detail (so replaying twice is harmless)."""

    mid: int
    remaining: int
    acked: int
    expired: int
    dropped: int
    recalled: int = 0


@dataclass(slots=True, frozen=True)
class DeleteContent:
    """No target needs the content any more; the detail stays as a tombstone."""

    mid: int
    done_ms: int


@dataclass(slots=True, frozen=True)
class Purge:
    """The tombstone is forgotten; its ``message_id`` may be submitted again."""

    mid: int


Op: TypeAlias = (
    NewMessage
    | Enqueue
    | Dequeue
    | SetBuffer
    | SetGap
    | ClearBuffer
    | Counts
    | DeleteContent
    | Purge
)


# -- results ---------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class SubmitResult:
    status: Literal["accepted", "duplicate", "rejected"]
    mid: int | None
    reason: str | None = None
    # (target, mid) pairs pushed out of full queues by this submit (drop-head policy).
    dropped: tuple[tuple[str, int], ...] = ()


@dataclass(slots=True, frozen=True)
class PullResult:
    kind: Literal["fresh", "ack_fresh", "resend", "ack_only", "empty"]
    record_id: str | None  # None when nothing is buffered for the target after this pull
    mids: tuple[int, ...]  # alive messages to send; the adapter looks up their content
    redelivered: bool
    acked: tuple[int, ...]  # messages this pull acknowledged
    # the gap the batch reports: ids dropped or expired before the target got them
    missed: int = 0
    missed_ids: tuple[str, ...] = ()
    # ids of the batch's messages recalled after it was handed out (resend, acknowledgement)
    recalled_ids: tuple[str, ...] = ()


class MessageStatus(TypedDict):
    message_id: str
    total: int
    acked: int
    pending: int
    expired: int
    dropped: int
    recalled: int
    state: Literal["active", "done", "expired", "recalled"]


class _Target:
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


class DirectedCore:
    """State machine of targeted distribution with cursor-style acknowledgement.

    Not thread-safe; the adapter calls it from one event loop and commits
    :meth:`take_journal` before it answers anyone on the strength of a decision.
    """

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
        self._targets: dict[str, _Target] = {}
        # Targets of each alive message that has a TTL, so that expiry can keep
        # _Target.alive exact without scanning queues. Messages without TTL never need it.
        self._holders: dict[int, list[str]] = {}
        self._expiry: list[tuple[int, int]] = []  # heap of (expires_at_ms, mid)
        self._stale_expiry = 0  # heap entries of messages that finished before their TTL
        self._graveyard: list[tuple[int, int]] = []  # heap of (done_ms, mid) of tombstones
        self._next_mid = 1
        self._alive = 0
        self._journal: list[Op] = []
        # Messages whose counters changed during the current call; one Counts each at the
        # end, so dropping the same old message from 10,000 queues journals one update.
        self._touched: dict[int, None] = {}
        self._gaps_touched: dict[str, None] = {}  # targets whose gap grew during this call

    # -- events ------------------------------------------------------------------------------

    def submit(
        self, message_id: str, targets: Sequence[str], now_ms: int, ttl_ms: int | None
    ) -> SubmitResult:
        """Accept a request for ``targets``; ``ttl_ms`` None means the content never expires.

        Does not expire anything itself: call :meth:`expire` first so that content whose TTL
        just passed does not count toward a full queue.
        """
        known = self._by_id.get(message_id)
        if known is not None:
            return SubmitResult("duplicate", known)
        if isinstance(targets, str):
            raise TypeError("targets must be a sequence of target names, not one str")
        keys = list(dict.fromkeys(targets))
        if not keys:
            return SubmitResult("rejected", None, "no_targets")
        queues = self._targets
        limit = self._limit
        drop_head = self._overflow is OverflowPolicy.DROP_HEAD
        if not drop_head:
            for key in keys:
                t = queues.get(key)
                if t is not None and t.alive >= limit:
                    return SubmitResult("rejected", None, "queue_full")

        mid = self._next_mid
        self._next_mid = mid + 1
        expires = None if ttl_ms is None else now_ms + ttl_ms
        self._details[mid] = Detail(
            mid, message_id, len(keys), len(keys), created_ms=now_ms, expires_at_ms=expires
        )
        self._by_id[message_id] = mid
        self._alive += 1
        emit = self._journal.append
        emit(NewMessage(mid, message_id, len(keys), now_ms, expires))
        dropped: list[tuple[str, int]] = []
        for key in keys:
            t = queues.get(key)
            if t is None:
                t = queues[key] = _Target()
            else:
                if drop_head and t.alive >= limit:
                    self._drop_head(key, t, now_ms, dropped)
                if len(t.mids) - t.alive > limit:
                    self._compact(key, t)
            t.mids.append(mid)
            seq = t.tail_seq = t.tail_seq + 1
            t.alive += 1
            emit(Enqueue(key, seq, mid))
        if expires is not None:
            self._holders[mid] = keys
            heapq.heappush(self._expiry, (expires, mid))
        self._flush()
        return SubmitResult("accepted", mid, dropped=tuple(dropped))

    def pull(
        self, target: str, record_id: str | None, max_n: int, now_ms: int, new_record_id: str
    ) -> PullResult:
        """One pull of ``target``; ``new_record_id`` names the batch if a new one is made."""
        self.expire(now_ms)
        n = min(max_n, self._max_batch)
        t = self._targets.get(target)
        if t is None:
            return PullResult("empty", None, (), False, ())
        buf = t.buffer
        if buf is not None and record_id != buf.record_id:
            return PullResult(
                "resend",
                buf.record_id,
                self._alive_only(buf.mids),
                True,
                (),
                buf.missed,
                buf.missed_ids,
                self._recalled_ids(buf),
            )
        recalled_ids = () if buf is None else self._recalled_ids(buf)
        acked = () if buf is None else self._acknowledge(target, t, buf, now_ms)
        made = self._take(target, t, n, new_record_id) if n > 0 else None
        if not t.mids and t.buffer is None and not t.missed:
            del self._targets[target]
        self._flush()
        kind: Literal["fresh", "ack_fresh", "ack_only", "empty"]
        if buf is None:
            kind = "fresh" if made else "empty"
        else:
            kind = "ack_fresh" if n > 0 else "ack_only"
        if made is None:
            return PullResult(kind, None, (), False, acked, recalled_ids=recalled_ids)
        return PullResult(
            kind,
            new_record_id,
            made.mids,
            False,
            acked,
            made.missed,
            made.missed_ids,
            recalled_ids,
        )

    def recall(self, message_id: str, now_ms: int) -> MessageStatus | None:
        """Take ``message_id`` back from every target that has not acknowledged it: queued
        entries die (and are skipped), a batch already handed out names it in ``recalled``
        on its next pull. The message finishes (state ``recalled``). Recalling a finished
        message changes nothing. None for an unknown message."""
        mid = self._by_id.get(message_id)
        if mid is None:
            return None
        d = self._details[mid]
        if d.alive and d.remaining:
            for t in self._targets.values():  # no index of holders: a rare, operator call
                if t.mids and t.mids[0] <= mid <= t.mids[-1] and mid in t.mids:
                    t.alive -= 1
            d.recalled += d.remaining
            d.remaining = 0
            self._touched[mid] = None
            self._die(d, now_ms)
            self._flush()
        return self.status(message_id)

    def expire(self, now_ms: int) -> list[int]:
        """Finish every alive message whose TTL passed by ``now_ms``; returns their mids.

        Their queue and buffer entries stay where they are and are skipped when reached.
        """
        heap = self._expiry
        details = self._details
        queues = self._targets
        expired: list[int] = []
        while heap and heap[0][0] <= now_ms:
            _, mid = heapq.heappop(heap)
            d = details.get(mid)
            if d is None or d.done_ms is not None:
                self._stale_expiry -= 1
                continue
            for key in self._holders.pop(mid, ()):
                t = queues.get(key)
                # Ascending mids + removal only at the head: the entry is still queued iff
                # the head is not past it (otherwise the target took or dropped it).
                if t is not None and t.mids and t.mids[0] <= mid:
                    t.alive -= 1
                    self._missed(key, t, d.message_id)
            d.expired += d.remaining
            d.remaining = 0
            self._touched[mid] = None
            self._die(d, now_ms, by_ttl=True)
            expired.append(mid)
        self._flush()
        return expired

    def purge(self, now_ms: int, retention_ms: int) -> list[int]:
        """Forget tombstones with ``done_ms <= now_ms - retention_ms``; returns their mids."""
        cutoff = now_ms - retention_ms
        grave = self._graveyard
        purged: list[int] = []
        while grave and grave[0][0] <= cutoff:
            _, mid = heapq.heappop(grave)
            d = self._details.pop(mid, None)
            if d is None:
                continue
            if self._by_id.get(d.message_id) == mid:
                del self._by_id[d.message_id]
            self._journal.append(Purge(mid))
            purged.append(mid)
        return purged

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
        ops, self._journal = self._journal, []
        return ops

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
    ) -> DirectedCore:
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
            t = core._targets[key] = _Target()
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
            t = core._targets.get(key) or core._targets.setdefault(key, _Target())
            t.buffer = Buffer(buf.record_id, tuple(buf.mids), buf.missed, tuple(buf.missed_ids))
            top = max(top, *t.buffer.mids, 0)
        for key, (missed, ids) in (gaps or {}).items():
            if missed:
                t = core._targets.get(key) or core._targets.setdefault(key, _Target())
                t.missed, t.gap_ids = missed, list(ids)
        heapq.heapify(core._expiry)
        heapq.heapify(core._graveyard)
        # Past every mid still referenced anywhere, so a dead entry can never come back to
        # life as a new message (tombstones purged since may have had higher mids; reusing
        # those is harmless because nothing refers to them).
        core._next_mid = top + 1
        return core

    # -- internals ---------------------------------------------------------------------------

    def _alive_only(self, mids: Iterable[int]) -> tuple[int, ...]:
        details = self._details
        return tuple(m for m in mids if (d := details.get(m)) is not None and d.done_ms is None)

    def _take(self, key: str, t: _Target, n: int, record_id: str) -> Buffer | None:
        """Move up to ``n`` alive mids from the head of the queue, and the gap, into a new
        buffer (None when there is neither)."""
        mids = t.mids
        details = self._details
        taken: list[int] = []
        popped = False
        while mids:
            mid = mids[0]
            d = details.get(mid)
            if d is not None and d.done_ms is None:
                if len(taken) == n:
                    break
                taken.append(mid)
            # Dead entries at the head go with the batch, so the next pull starts on a live one.
            mids.popleft()
            popped = True
        if popped:
            self._journal.append(Dequeue(key, t.tail_seq - len(mids)))
            if not mids:
                t.tail_seq = 0
        if not taken and not t.missed:
            return None
        t.alive -= len(taken)
        buf = t.buffer = Buffer(record_id, tuple(taken), t.missed, tuple(t.gap_ids))
        self._journal.append(SetBuffer(key, record_id, buf.mids, buf.missed, buf.missed_ids))
        if t.missed:
            t.missed, t.gap_ids = 0, []
            self._gaps_touched.pop(key, None)
            self._journal.append(SetGap(key, 0, ()))
        return buf

    def _acknowledge(self, key: str, t: _Target, buf: Buffer, now_ms: int) -> tuple[int, ...]:
        details = self._details
        acked: list[int] = []
        for mid in buf.mids:
            d = details.get(mid)
            if d is None or d.done_ms is not None:
                continue  # expired while buffered: already counted as expired, not acked
            d.remaining -= 1
            d.acked += 1
            self._touched[mid] = None
            acked.append(mid)
            if d.remaining == 0:
                self._die(d, now_ms)
        t.buffer = None
        self._journal.append(ClearBuffer(key))
        return tuple(acked)

    def _drop_head(self, key: str, t: _Target, now_ms: int, dropped: list[tuple[str, int]]) -> None:
        """Remove the oldest alive entries (and dead ones before them) until there is room."""
        mids = t.mids
        details = self._details
        limit = self._limit
        while t.alive >= limit:
            mid = mids.popleft()
            d = details.get(mid)
            if d is None or d.done_ms is not None:
                continue
            t.alive -= 1
            d.remaining -= 1
            d.dropped += 1
            self._touched[mid] = None
            dropped.append((key, mid))
            self._missed(key, t, d.message_id)
            if d.remaining == 0:
                self._die(d, now_ms)
        self._journal.append(Dequeue(key, t.tail_seq - len(mids)))
        if not mids:
            t.tail_seq = 0

    def _compact(self, key: str, t: _Target) -> None:
        """Rewrite a queue without its dead entries.

        Dead entries behind an alive head (a target that never pulls, receiving messages that
        expire) would otherwise pile up without bound; the journal can only cut a queue at the
        head, so the queue is emptied and its alive entries enqueued again, in order. This
        runs only once more than ``queue_limit`` entries are dead, so it is O(1) amortized.
        """
        alive = self._alive_only(t.mids)
        self._journal.append(Dequeue(key, t.tail_seq))
        t.mids = deque(alive)
        t.tail_seq = 0
        for mid in alive:
            t.tail_seq += 1
            self._journal.append(Enqueue(key, t.tail_seq, mid))

    def _die(self, d: Detail, now_ms: int, *, by_ttl: bool = False) -> None:
        d.done_ms = now_ms
        self._alive -= 1
        heapq.heappush(self._graveyard, (now_ms, d.mid))
        if d.expires_at_ms is None or by_ttl:
            return
        self._holders.pop(d.mid, None)
        self._stale_expiry += 1
        # Finished before its TTL: its heap entry is now garbage. Rebuild the heap when
        # garbage is most of it, so a long TTL with fast acknowledgements stays small.
        if self._stale_expiry > 64 and 2 * self._stale_expiry > len(self._expiry):
            details = self._details
            self._expiry = [
                e for e in self._expiry if (x := details.get(e[1])) is not None and x.alive
            ]
            heapq.heapify(self._expiry)
            self._stale_expiry = 0

    def _recalled_ids(self, buf: Buffer) -> tuple[str, ...]:
        details = self._details
        return tuple(
            d.message_id for m in buf.mids if (d := details.get(m)) is not None and d.recalled
        )

    def _missed(self, key: str, t: _Target, message_id: str) -> None:
        """``key`` lost a queued id before it got it: part of its next batch's gap."""
        t.missed += 1
        if len(t.gap_ids) < MISSED_IDS_LIMIT:
            t.gap_ids.append(message_id)
        self._gaps_touched[key] = None

    def _flush(self) -> None:
        """Journal the counters of every message touched by this call (and their deletion),
        and the grown gaps of targets."""
        emit = self._journal.append
        if self._touched:
            details = self._details
            for mid in self._touched:
                d = details[mid]
                emit(Counts(mid, d.remaining, d.acked, d.expired, d.dropped, d.recalled))
                # Only alive messages are ever touched, so a done one died during this call.
                if d.done_ms is not None:
                    emit(DeleteContent(mid, d.done_ms))
            self._touched.clear()
        if self._gaps_touched:
            for key in self._gaps_touched:
                gap = self._targets.get(key)
                if gap is not None:
                    emit(SetGap(key, gap.missed, tuple(gap.gap_ids)))
            self._gaps_touched.clear()
