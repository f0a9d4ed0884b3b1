"""What the parts of the directed worker share: the pure core, the target groups, the store,
its group committer and the cache of recently stored content.

Order of effects, which is what makes a ``kill -9`` safe:

- a request is acknowledged to the broker only after the commit that holds its effect;
  a redelivered request is recognised by its ``message_id`` (or content digest) and not
  applied twice (:mod:`~workers.directed.requests`);
- a pull is answered only after the commit that holds its buffer/acknowledgement, so a
  target never sees a record id that a restart could forget (:mod:`~workers.directed.pulls`,
  from a :meth:`Ledger.on_committed` callback: no task per pull);
- a recall or a group change is answered only after its commit
  (:mod:`~workers.directed.control`).

The core journals its own changes (:meth:`DirectedCore.take_journal`); new contents and group
changes wait here for the same commit.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter

from bridge.store import GroupCommitter
from workers.directed.config import DirectedSettings
from workers.directed.core import DirectedCore
from workers.directed.groups import Groups
from workers.directed.model import DeleteContent, OverflowPolicy
from workers.directed.replies import Message, encode_message
from workers.directed.store import Batch, Content, DirectedStore

log = logging.getLogger("bridge.directed")


def now_ms() -> int:
    return int(time.time() * 1000)


class ContentCache:
    """Recently stored content, bounded by bytes, so most pulls never read the file; with
    each content, once a JSON reply carried it, its encoded form in that reply (the base64
    body and the properties), so the many targets of one message share one encoding."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        # mid -> [content, its encoded reply entry or None, bytes counted]
        self._items: OrderedDict[int, list[Any]] = OrderedDict()

    def put(self, mid: int, content: Content) -> None:
        size = len(content.body) + 64
        if size > self.max_bytes:
            return
        self.drop(mid)
        self._items[mid] = [content, None, size]
        self.bytes += size
        self._trim()

    def get(self, mid: int) -> Content | None:
        item = self._items.get(mid)
        if item is None:
            return None
        self._items.move_to_end(mid)
        content: Content = item[0]
        return content

    def encoded(self, mid: int, message_id: str) -> bytes | None:
        """The JSON reply entry of ``mid`` (:func:`~workers.directed.replies.encode_message`),
        encoded at its first use; None when the content is not cached."""
        item = self._items.get(mid)
        if item is None:
            return None
        self._items.move_to_end(mid)
        entry: bytes | None = item[1]
        if entry is None:
            content: Content = item[0]
            entry = item[1] = encode_message(message_id, content.body, content.props)
            item[2] += len(entry)
            self.bytes += len(entry)
            self._trim()
        return entry

    def drop(self, mid: int) -> None:
        item = self._items.pop(mid, None)
        if item is not None:
            self.bytes -= item[2]

    def _trim(self) -> None:
        while self.bytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.bytes -= old[2]


class Ledger:
    """The core, the groups and the store, and the few operations that keep them consistent."""

    def __init__(
        self,
        store: DirectedStore,
        core: DirectedCore,
        groups: Groups,
        *,
        cache_bytes: int,
        on_commit: Callable[[int, float], None],
    ) -> None:
        self.store = store
        self.core = core
        self.groups = groups
        self.cache = ContentCache(cache_bytes)
        self._contents: dict[int, Content] = {}
        self._groups: dict[str, list[str] | None] = {}
        # on_committed callbacks waiting for the same commit: they share one barrier, until
        # the committer takes the journal (then the next callback needs a later commit)
        self._round: list[Callable[[BaseException | None], None]] | None = None
        self.committer: GroupCommitter[Batch] = GroupCommitter(
            store.db, self._take, store.apply, on_commit=on_commit
        )

    @classmethod
    async def restore(
        cls,
        store: DirectedStore,
        settings: DirectedSettings,
        on_commit: Callable[[int, float], None],
    ) -> Ledger:
        """The state the store kept, in a new core (its committer not started yet)."""
        s = settings
        started = time.perf_counter()
        details, queues, buffers = await store.db.run(store.load)
        gaps = await store.db.run(store.load_gaps)
        groups = Groups(await store.db.run(store.load_groups), max_size=s.max_targets)
        core = DirectedCore.restore(
            details=details,
            queues=queues,
            buffers=buffers,
            gaps=gaps,
            queue_limit=s.queue_limit,
            overflow=OverflowPolicy(s.overflow),
            max_batch=s.max_batch,
        )
        log.info(
            "state restored",
            extra={
                "messages": len(details),
                "targets": len(queues),
                "seconds": round(time.perf_counter() - started, 3),
            },
        )
        return cls(store, core, groups, cache_bytes=s.cache_bytes, on_commit=on_commit)

    # -- the journal -------------------------------------------------------------------

    def add_content(self, mid: int, content: Content) -> None:
        """The content of an accepted message: written by the next commit, cached now."""
        self._contents[mid] = content
        self.cache.put(mid, content)

    def group_changed(self, name: str, members: list[str] | None) -> None:
        """A group's members after a change (None: the group is gone), for the next commit."""
        self._groups[name] = members

    async def committed(self) -> None:
        """Wait until everything journaled so far is committed."""
        await self.committer.barrier()

    def on_committed(self, callback: Callable[[BaseException | None], None]) -> None:
        """Call ``callback(None)`` once everything journaled so far is committed, or
        ``callback(error)`` if that commit was given up (the store is closing while commits
        fail). The callbacks of one commit share one barrier future: a pull waiting for its
        commit costs a list entry, not a future and a task."""
        if self._round is None:
            self._round = []
            self.committer.barrier().add_done_callback(functools.partial(_call_back, self._round))
        self._round.append(callback)

    def _take(self) -> list[Batch]:
        # The committer hands the barriers it holds their result after committing what this
        # returns: a callback added from now on needs the next commit.
        self._round = None
        ops = self.core.take_journal()
        if not ops and not self._contents and not self._groups:
            return []
        contents, self._contents = self._contents, {}
        groups, self._groups = self._groups, {}
        for op in ops:
            if isinstance(op, DeleteContent):
                self.cache.drop(op.mid)
        return [Batch(ops=ops, contents=contents, groups=groups)]

    # -- reads -------------------------------------------------------------------------

    async def messages(self, mids: tuple[int, ...]) -> list[Message]:
        """The alive messages of ``mids`` with their content, from the cache or the store."""
        found = await self._contents_of(mids)
        out = []
        for mid in mids:
            message_id = self.core.alive_message_id(mid)
            content = found.get(mid)
            if message_id is None or content is None:
                continue  # expired or deleted between the decision and the read
            out.append(Message(message_id, content.body, content.props))
        return out

    def encoded_cached(self, mids: tuple[int, ...]) -> list[bytes] | None:
        """The JSON reply entries of the alive messages of ``mids`` if every content is
        cached (the usual case: no I/O, no await), else None: use :meth:`encoded`."""
        out = []
        for mid in mids:
            message_id = self.core.alive_message_id(mid)
            if message_id is None:
                continue  # expired or deleted between the decision and the read
            entry = self.cache.encoded(mid, message_id)
            if entry is None:
                return None
            out.append(entry)
        return out

    async def encoded(self, mids: tuple[int, ...]) -> list[bytes]:
        """The JSON reply entries of the alive messages of ``mids``, reading from the store
        the contents the cache does not hold."""
        cached = self.encoded_cached(mids)
        if cached is not None:
            return cached
        return [encode_message(m.id, m.body, m.props) for m in await self.messages(mids)]

    async def _contents_of(self, mids: tuple[int, ...]) -> dict[int, Content]:
        found: dict[int, Content] = {}
        missing = []
        for mid in mids:
            content = self.cache.get(mid)
            if content is None:
                missing.append(mid)
            else:
                found[mid] = content
        if missing:
            loaded = await self.store.db.run(self.store.contents, missing)
            for mid, content in loaded.items():
                self.cache.put(mid, content)
            found.update(loaded)
        return found

    def summary(self) -> dict[str, Any]:
        """The admin summary, also the ``stats`` control query."""
        return {
            "messages": self.core.alive_messages,
            "targets": self.core.target_count,
            "commits": self.committer.commits,
            "commit_failing": self.committer.failing,
            "cache_bytes": self.cache.bytes,
        }

    # -- housekeeping ------------------------------------------------------------------

    async def housekeep(self, settings: DirectedSettings, expired: Counter) -> None:
        """Forever: finish what passed its TTL and forget old tombstones, then commit."""
        core = self.core
        while True:
            await asyncio.sleep(settings.housekeeping_interval_s)
            now = now_ms()
            done = core.expire(now)
            for mid in done:
                detail = core.detail(mid)
                if detail is not None:
                    expired.inc(detail.expired)
                self.cache.drop(mid)
            purged = core.purge(now, settings.dedup_retention_ms)
            if done or purged:
                await self.committed()


def _call_back(
    callbacks: list[Callable[[BaseException | None], None]], fut: asyncio.Future[None]
) -> None:
    error: BaseException | None
    if fut.cancelled():
        error = asyncio.CancelledError()
    else:
        error = fut.exception()
    for callback in callbacks:
        try:
            callback(error)
        except Exception:
            log.exception("on_committed callback failed")
