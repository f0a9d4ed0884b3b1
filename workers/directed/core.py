"""Pure core of the ``directed`` worker: who still needs which message, and what a pull returns.

Events come in with the current time as integer milliseconds (:meth:`DirectedCore.submit`,
:meth:`~DirectedCore.pull`, :meth:`~DirectedCore.expire`, :meth:`~DirectedCore.recall`,
:meth:`~DirectedCore.purge`); decisions go out as return values, and every state change is
recorded as an :data:`~workers.directed.model.Op` in a journal that the SQLite store applies,
in order, in one transaction (:meth:`~workers.directed.state.CoreState.take_journal`). The
state, its queries and its restore after a restart are :mod:`workers.directed.state`'s. No I/O
and no clock.

De-duplication by ``message_id`` lasts while the message is alive plus the retention window of
its tombstone: once :meth:`~DirectedCore.purge` forgets it, the same id is accepted as new.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from typing import Literal

from workers.directed.model import (
    Buffer,
    ClearBuffer,
    Counts,
    DeleteContent,
    Dequeue,
    Detail,
    Enqueue,
    MessageStatus,
    NewMessage,
    OverflowPolicy,
    PullResult,
    Purge,
    SetBuffer,
    SetGap,
    SubmitResult,
)
from workers.directed.state import MISSED_IDS_LIMIT, CoreState, Target


class DirectedCore(CoreState):
    """State machine of targeted distribution with cursor-style acknowledgement.

    Not thread-safe; the adapter calls it from one event loop and commits
    :meth:`take_journal` before it answers anyone on the strength of a decision.
    """

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
                t = queues[key] = Target()
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
        acked = () if buf is None else self._acknowledge(t, buf, now_ms)
        mark = len(self._journal)
        made = self._take(target, t, n, new_record_id) if n > 0 else None
        if buf is not None and (made is None or buf.missed):
            # A new batch replaces the acknowledged one (SetBuffer): one write instead of a
            # delete and an insert, unless the old one's gap has to go too.
            self._journal.insert(mark, ClearBuffer(target))
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

    # -- internals ---------------------------------------------------------------------------

    def _take(self, key: str, t: Target, n: int, record_id: str) -> Buffer | None:
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

    def _acknowledge(self, t: Target, buf: Buffer, now_ms: int) -> tuple[int, ...]:
        """The messages of ``buf`` acknowledged by ``t``; the caller journals the buffer's
        end (a :class:`ClearBuffer`, or the :class:`SetBuffer` of the next batch)."""
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
        return tuple(acked)

    def _drop_head(self, key: str, t: Target, now_ms: int, dropped: list[tuple[str, int]]) -> None:
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

    def _compact(self, key: str, t: Target) -> None:
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

    def _missed(self, key: str, t: Target, message_id: str) -> None:
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
