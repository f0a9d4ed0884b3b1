"""What the parts of the delay worker share: the store, its group committer, the journal of
changes waiting for the next commit, and the in-memory window of due-soon messages.

Order of effects, which is what makes a ``kill -9`` safe:

- an ingress delivery is acknowledged only after the commit that stored it (or after the
  broker confirmed its dead-letter);
- a stored message is deleted only after the broker confirmed its publish at the target (or
  its dead-letter); a crash in between re-publishes it after the restart with the same
  ``message_id`` (at-least-once);
- the window (:class:`~workers.delay.core.Scheduler`) holds hints ``(mid, topic, due, key)``
  for the near-term only; the row in SQLite is the truth, and a lane skips a hint whose row
  is gone. A hint admitted by the ingress may carry its committed row (see :meth:`admit`):
  rows never change, and a row is deleted only after its hint left the window.

Everything here runs on the worker's event loop, except :meth:`Ledger.admit_extra` (the
store's writer thread asks it during a commit).
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable, Iterable
from typing import Any

from bridge.store import GroupCommitter
from workers.delay.config import DelaySettings
from workers.delay.core import Entry, Scheduler
from workers.delay.store import DelayStore, Delete, Op, StoredMessage

# What a window entry's kept content costs beyond its properties and body (the entry's
# fields and the row object), counted against WINDOW_CONTENT_MB.
CONTENT_OVERHEAD = 200


def now_ms() -> int:
    return int(time.time() * 1000)


def ingress_linger_ms(settings: DelaySettings, due_in_ms: float, waiting: int) -> float:
    """How long a delivery due in ``due_in_ms`` may wait for its commit while ``waiting``
    others already wait for it: a twentieth of the time until it is due, between
    ``INGRESS_COMMIT_LINGER_MS`` and ``INGRESS_COMMIT_LINGER_MAX_MS`` (so its commit, and its
    entering the window, never costs it more than 5 % of its delay beyond the minimum), and
    nothing once a quarter of ``PREFETCH`` waits (the broker stops delivering at
    ``PREFETCH`` unacknowledged). Fewer, larger commits: each costs the writer about
    300 µs of CPU whatever it holds."""
    s = settings
    if waiting >= s.prefetch // 4:
        return 0.0
    return max(s.ingress_commit_linger_ms, min(s.ingress_commit_linger_max_ms, due_in_ms / 20))


def _consume_result(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: a failed background commit is logged by the committer


class Ledger:
    """The store, the journal and the window, and the few operations that keep them
    consistent with each other."""

    def __init__(
        self,
        store: DelayStore,
        settings: DelaySettings,
        *,
        next_mid: int,
        topic_counts: dict[str, int],
        on_commit_seconds: Callable[[float], None],
    ) -> None:
        s = settings
        self.settings = s
        self.store = store
        self.scheduler = Scheduler(lanes=s.lanes, batch=s.batch, pack=s.lane_pack)
        if s.lane_grow_ms > 0:
            self.scheduler.set_active_lanes(1)
        # stored messages per topic (committed), for metrics and the admin view
        self.topic_counts = topic_counts
        # mids whose publish was confirmed (or dead-lettered) and whose delete is not yet
        # committed: the loader and cancel must not treat them as pending.
        self.deleting: set[int] = set()
        self._journal: list[Op] = []
        self._next_mid = next_mid
        self._topics: dict[str, str] = {}  # one str object per topic name
        # the next commit that requests share (see _commit_within), when it is asked for
        self._linger: asyncio.Future[None] | None = None
        self._linger_at = 0.0
        self._linger_handle: asyncio.TimerHandle | None = None
        # shared commits asked for and not done yet (their waiters not run yet)
        self._sealed: set[asyncio.Future[None]] = set()
        self._loop = asyncio.get_running_loop()
        self._on_commit_seconds = on_commit_seconds
        # A message due now may enter a window capped by a backlog, up to this many extra.
        self._extra_cap = s.window_max_entries + max(1000, s.window_max_entries // 10)
        self._content_cap = int(s.window_content_mb * 1024 * 1024)
        store.admit_extra = self.admit_extra
        self.committer: GroupCommitter[Op] = GroupCommitter(
            store.db, self._take, store.apply, on_commit=self._on_commit
        )

    # -- the journal -------------------------------------------------------------------

    def next_mid(self) -> int:
        mid = self._next_mid
        self._next_mid += 1
        return mid

    def append(self, op: Op) -> None:
        """Journal ``op`` for the next commit (see :meth:`commit_soon` and :meth:`stored`)."""
        self._journal.append(op)

    def commit_soon(self) -> asyncio.Future[None]:
        """A commit of everything journaled so far, without waiting for the linger."""
        fut = self.committer.barrier()
        fut.add_done_callback(_consume_result)
        return fut

    def stored(self, linger_ms: float) -> asyncio.Future[None]:
        """A future resolved once everything journaled so far is committed, by a commit
        asked for at most ``linger_ms`` from now (see :func:`ingress_linger_ms`).

        Deliveries arriving meanwhile share one barrier (and one commit): far fewer futures,
        writer-thread round trips and commits (WAL pages, fsyncs) than one per delivery.
        """
        return self._commit_within(linger_ms)

    def _commit_within(self, ms: float) -> asyncio.Future[None]:
        """A future resolved once everything journaled so far is committed, by a commit
        asked for at most ``ms`` from now. Requests whose waits overlap share one commit:
        a commit's cost in the writer thread is mostly per commit (the pages it rewrites in
        the WAL, its fsync), not per row."""
        loop = self._loop
        at = loop.time() + ms / 1000
        fut = self._linger
        if fut is not None and self._linger_at <= at:
            return fut
        if fut is None:
            fut = self._linger = loop.create_future()
        elif self._linger_handle is not None:
            self._linger_handle.cancel()  # wanted sooner than planned
        self._linger_at = at
        self._linger_handle = loop.call_at(at, self._seal, fut)
        return fut

    def _seal(self, fut: asyncio.Future[None]) -> None:
        if self._linger is fut:
            self._linger = None
            self._linger_handle = None
        self._sealed.add(fut)
        fut.add_done_callback(self._sealed.discard)
        barrier = self.committer.barrier()  # covers everything journaled before now

        def done(b: asyncio.Future[None]) -> None:
            if fut.done():
                return
            if b.cancelled():
                fut.cancel()
            elif b.exception() is not None:
                fut.set_exception(b.exception())  # type: ignore[arg-type]
            else:
                fut.set_result(None)

        barrier.add_done_callback(done)

    async def commit_now(self) -> None:
        """Commit what is journaled now, the shared commit that waits for its time included,
        and return once the waiters of every shared commit asked so far have run.

        The ingress acknowledges a delivery in such a waiter: on shutdown this runs before
        the acknowledgements are flushed and the link closes, else a delivery stored but not
        acknowledged is delivered again by the broker and stored twice. Awaiting the very
        futures the waiters were added to makes them run first (callbacks run in order).
        """
        fut = self._linger
        if fut is not None:
            if self._linger_handle is not None:
                self._linger_handle.cancel()
            self._seal(fut)
        if self._sealed:
            await asyncio.wait(list(self._sealed))

    async def close(self) -> None:
        """Commit what is journaled (see :meth:`commit_now`), then stop the committer."""
        await self.commit_now()
        await self.committer.close()

    def delete_done(self, rows: Iterable[tuple[int, str]]) -> None:
        """Messages confirmed at their target (or dead-lettered): delete their rows, in a
        commit within ``DELETE_COMMIT_DELAY_MS`` (shared with the ingress's). Until that
        commit, the loader and cancel skip them."""
        rows = list(rows)
        if not rows:
            return
        mids = [mid for mid, _ in rows]
        self.deleting.update(mids)
        self._journal.append(Delete(rows))
        fut = self._commit_within(self.settings.delete_commit_delay_ms)
        fut.add_done_callback(_consume_result)
        fut.add_done_callback(lambda _: self.deleting.difference_update(mids))

    def _take(self) -> list[Op]:
        ops, self._journal = self._journal, []
        return ops

    def _on_commit(self, items: int, seconds: float) -> None:
        self._on_commit_seconds(seconds)
        for topic, delta in self.store.last_deltas.items():
            count = self.topic_counts.get(topic, 0) + delta
            if count > 0:
                self.topic_counts[topic] = count
            else:
                self.topic_counts.pop(topic, None)

    # -- the window --------------------------------------------------------------------

    def admit(
        self,
        mid: int,
        due_ms: int,
        topic: str,
        key: str | None,
        content: StoredMessage | None = None,
    ) -> None:
        """Put a stored message into the window (unless it is there or being deleted).

        ``content``: the committed row itself (the ingress has it in hand), kept with the
        entry while the window's content stays within ``WINDOW_CONTENT_MB``; its lane then
        publishes it without a store read. That is safe because a row is never changed, and
        every delete of a row removes its entry from the window first (cancel, replace by
        key), or comes after its lane sent it."""
        scheduler = self.scheduler
        if mid in scheduler or mid in self.deleting:
            return
        entry = Entry(mid, self._topics.setdefault(topic, topic), due_ms, key)
        if content is not None:
            size = CONTENT_OVERHEAD + len(content.properties) + len(content.body)
            if scheduler.content_bytes + size <= self._content_cap:
                entry.content = content
                entry.content_bytes = size
        replaced = scheduler.add(entry)
        if replaced is not None:  # a same-key race; the row may already be gone
            self._journal.append(Delete([(replaced.mid, replaced.topic)]))
            self.commit_soon()

    def admit_extra(self, due_ms: int) -> bool:
        # Runs on the writer thread: a message due within the window while the window is
        # capped (a backlog after downtime) still goes into memory, so it does not wait
        # behind the backlog; bounded by _extra_cap.
        return (
            due_ms <= now_ms() + self.settings.window_ms and len(self.scheduler) < self._extra_cap
        )

    async def load_step(self) -> int:
        """Move the next chunk of due-soon rows from the store into the window."""
        s, store, scheduler = self.settings, self.store, self.scheduler
        until = now_ms() + s.window_ms
        if store.window_end[0] >= until:
            return 0
        limit = min(s.load_chunk, s.window_max_entries - len(scheduler))
        if limit <= 0:
            return 0
        rows = await store.db.run(store.load, until, limit)
        for row in rows:
            self.admit(row.mid, row.due_ms, row.topic, row.key)
        return len(rows)

    @property
    def stored_total(self) -> int:
        return sum(self.topic_counts.values())

    def top_topics(self, n: int) -> list[tuple[str, int]]:
        """The ``n`` topics with the most stored messages."""
        if n <= 0:
            return []
        return heapq.nlargest(n, dict(self.topic_counts).items(), key=lambda kv: kv[1])
