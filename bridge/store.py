"""SQLite helpers shared by stateful workers: file checks, WAL, schema version, one writer
thread, and group commit.

Every write happens on one dedicated thread (SQLite allows one writer; a thread keeps the
event loop free while the disk syncs). :class:`GroupCommitter` turns many events into one
transaction: callers mutate their in-memory core, then await :meth:`GroupCommitter.barrier`,
which resolves once everything journaled before the call is committed. If a commit fails
(disk full, read-only volume) the same batch is retried with backoff and nothing is
acknowledged meanwhile; the worker reports not-ready with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Generic, TypeVar

from bridge.errors import StoreError

log = logging.getLogger("bridge.store")

T = TypeVar("T")
R = TypeVar("R")

_META = "CREATE TABLE IF NOT EXISTS bridge_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"


class Database:
    """One SQLite file owned by one worker, written from a single thread."""

    def __init__(
        self,
        path: Path,
        *,
        worker: str,
        schema_version: int,
        schema: Sequence[str],
        synchronous: str = "FULL",
        identity: dict[str, str] | None = None,
        identity_defaults: dict[str, str] | None = None,
        identity_hint: str = "see docs on changing it safely",
        migrations: Mapping[int, Sequence[str]] | None = None,
    ) -> None:
        """``identity``: values the file must have been created with (a shard's index and
        count); ``identity_defaults``: what an existing file that predates a key is assumed to
        have; ``identity_hint``: what the refusal tells the operator to do; ``migrations``:
        for each older version ``v``, the statements that take a file from ``v`` to ``v + 1``
        (run in one transaction with the schema, before it)."""
        self.path = Path(path)
        self.worker = worker
        self._identity_defaults = identity_defaults or {}
        self._identity_hint = identity_hint
        self._migrations = dict(migrations or {})
        self.migrated_from: int | None = None  # the version an older file was migrated from
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{worker}-store")
        self.conn = self._executor.submit(
            self._open, schema_version, list(schema), synchronous, identity or {}
        ).result()

    def _open(
        self, version: int, schema: list[str], synchronous: str, identity: dict[str, str]
    ) -> sqlite3.Connection:
        existed = self.path.exists() and self.path.stat().st_size > 0
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            # Read before any write: a foreign or corrupt file must stay byte-for-byte as is.
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"{self.path} is not a usable SQLite database ({exc}); it was left untouched. "
                "Move it away to start empty, or point BRIDGE_STATE_DIR at the right volume."
            ) from exc
        try:
            if existed and "bridge_meta" not in tables:
                raise StoreError(
                    f"{self.path} is a SQLite file that this project did not create "
                    f"(tables: {', '.join(sorted(tables)) or 'none'}); refusing to touch it. "
                    "Point BRIDGE_STATE_DIR elsewhere or move the file away."
                )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={synchronous}")
            conn.execute("PRAGMA temp_store=MEMORY")
            conn.execute("PRAGMA cache_size=-65536")
            conn.execute(_META)
            meta = dict(conn.execute("SELECT key, value FROM bridge_meta").fetchall())
            if meta.get("worker", self.worker) != self.worker:
                raise StoreError(
                    f"{self.path} belongs to worker {meta['worker']!r}, not {self.worker!r}"
                )
            found = int(meta.get("schema_version", version))
            if found > version:
                raise StoreError(
                    f"{self.path} has schema version {found}, newer than this release ({version}); "
                    "run the newer release or restore a backup"
                )
            for key, expected in identity.items():
                found_value = meta.get(key, self._identity_defaults.get(key) if existed else None)
                if found_value is not None and found_value != expected:
                    raise StoreError(
                        f"{self.path} was created with {key}={found_value}, but this process runs "
                        f"with {key}={expected}; {self._identity_hint}"
                    )
            missing = [v for v in range(found, version) if v not in self._migrations]
            if missing:
                raise StoreError(
                    f"{self.path} has schema version {found}, and this release ({version}) "
                    f"cannot migrate it (no step from version {missing[0]}); run the release "
                    "that wrote it, or move the file away to start empty"
                )
            conn.execute("BEGIN IMMEDIATE")
            for step in range(found, version):
                for statement in self._migrations[step]:
                    conn.execute(statement)
            if found < version:
                self.migrated_from = found
                log.info(
                    "state store migrated",
                    extra={"path": str(self.path), "from": found, "to": version},
                )
            for statement in schema:
                conn.execute(statement)
            rows = {"worker": self.worker, "schema_version": str(version), **identity}
            conn.executemany("INSERT OR REPLACE INTO bridge_meta VALUES (?, ?)", rows.items())
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"{self.path} cannot be opened as a state store: {exc}") from exc
        except StoreError:
            conn.close()
            raise
        return conn

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        """Run ``fn(conn, *args)`` on the writer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, self.conn, *args)

    def run_sync(self, fn: Callable[..., R], *args: Any) -> R:
        return self._executor.submit(fn, self.conn, *args).result()

    def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                total += p.stat().st_size
        return total

    def close(self) -> None:
        def _close(conn: sqlite3.Connection) -> None:
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.DatabaseError:
                pass
            conn.close()

        try:
            self._executor.submit(_close, self.conn).result()
        finally:
            self._executor.shutdown(wait=True)


def transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], R]) -> R:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
        # Inside the try: a full or read-only disk usually fails here, when the pages reach
        # the WAL, and a transaction left open would make every retry's BEGIN fail.
        conn.execute("COMMIT")
    except BaseException:
        # SQLITE_FULL and SQLITE_IOERR may have rolled back already; a second ROLLBACK
        # would raise "no transaction is active" and hide the real error.
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    return result


class GroupCommitter(Generic[T]):
    """Commits whatever ``take()`` returns in one transaction per round.

    ``take()`` runs on the event loop and hands over everything journaled so far;
    ``apply(conn, items)`` runs on the writer thread inside a transaction. A failed commit is
    retried (same items first) until it succeeds: the in-memory state is already ahead of
    the file, so dropping the batch would lose acknowledged work.
    """

    def __init__(
        self,
        db: Database,
        take: Callable[[], list[T]],
        apply: Callable[[sqlite3.Connection, list[T]], Any],
        *,
        on_commit: Callable[[int, float], None] | None = None,
    ) -> None:
        self.db = db
        self.take = take
        self.apply = apply
        self.on_commit = on_commit
        self.failing: str | None = None
        self.failures = 0  # failed attempts (each retry counts): the metric alerts watch
        self.commits = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._carry: list[T] = []
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._loop(), name=f"{self.db.worker}-commit"
        )

    def barrier(self) -> asyncio.Future[None]:
        """A future resolved once everything journaled before this call is committed."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._wake.set()
        return fut

    async def _loop(self) -> None:
        backoff = 0.05
        while True:
            await self._wake.wait()
            self._wake.clear()
            waiters, self._waiters = self._waiters, []
            items = self._carry + self.take()
            self._carry = []
            while True:
                started = time.perf_counter()
                try:
                    if items:
                        await self.db.run(transaction_apply, self.apply, items)
                    break
                except Exception as exc:  # disk full, read-only, I/O error: keep the batch
                    reason = f"{type(exc).__name__}: {exc}"
                    self.failures += 1
                    if self.failing != reason:
                        log.error(
                            "state commit failed; not acknowledging until it succeeds",
                            extra={
                                "worker": self.db.worker,
                                "error": reason,
                                "path": str(self.db.path),
                            },
                        )
                    self.failing = reason
                    if self._closed:
                        for fut in waiters:
                            if not fut.done():
                                fut.set_exception(StoreError(reason))
                        return
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    items = items + self.take()
            if self.failing is not None:
                log.info("state commits succeed again", extra={"worker": self.db.worker})
            self.failing = None
            backoff = 0.05
            self.commits += 1
            if self.on_commit is not None and items:
                self.on_commit(len(items), time.perf_counter() - started)
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
            if self._closed and not self._waiters:
                return

    async def close(self) -> None:
        """Commit what is pending, then stop."""
        self._closed = True
        await self.barrier()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


def transaction_apply(
    conn: sqlite3.Connection,
    apply: Callable[[sqlite3.Connection, list[Any]], Any],
    items: list[Any],
) -> Any:
    return transaction(conn, lambda c: apply(c, items))
