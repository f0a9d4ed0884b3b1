"""The directed worker under test: a subprocess with unique names and a client connected to it."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import aio_pika

from bench.harness.broker import delete_names
from bench.harness.procs import WorkerProcess
from bench.harness.report import broker_url, unique
from workers.directed.client import DirectedClient
from workers.directed.config import DirectedSettings

NAME_FIELDS = (
    "requests_exchange",
    "requests_queue",
    "pull_exchange",
    "pull_queue",
    "control_exchange",
    "control_queue",
    "dead_exchange",
    "dead_queue",
)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def names_for(token: str) -> dict[str, str]:
    return {field: f"{token}.{field.replace('_', '.')}" for field in NAME_FIELDS}


def worker_env(names: dict[str, str], queue_type: str, synchronous: str) -> dict[str, str]:
    env = {f"BRIDGE_DIRECTED__{k.upper()}": v for k, v in names.items()}
    env["BRIDGE_DIRECTED__PULL_QUEUE_TYPE"] = queue_type
    env["BRIDGE_DIRECTED__SYNCHRONOUS"] = synchronous
    return env


class Directed:
    """A worker subprocess with unique names, and a client connected to it."""

    def __init__(
        self, root: Path, queue_type: str, synchronous: str = "FULL", tree: Path | None = None
    ) -> None:
        self.token = unique("bench-directed")
        self.names = names_for(self.token)
        self.settings = DirectedSettings(**self.names, pull_queue_type=queue_type)  # type: ignore[arg-type]
        self.state = root / self.token
        self.worker = WorkerProcess(
            ["directed"],
            state_dir=self.state,
            env=worker_env(self.names, queue_type, synchronous),
            tree=tree,
        )
        self.conn: Any = None
        self.client: DirectedClient | None = None

    @property
    def db_path(self) -> Path:
        return self.state / "directed" / "directed.sqlite3"

    async def __aenter__(self) -> Directed:
        await asyncio.to_thread(lambda: self.worker.start().wait_ready(60))
        self.conn = await aio_pika.connect_robust(broker_url())
        self.client = await DirectedClient(self.conn, self.settings).open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            if self.client is not None:
                await self.client.close()
            if self.conn is not None:
                await self.conn.close()
        await asyncio.to_thread(self.worker.stop)
        n = self.names
        await delete_names(
            broker_url(),
            [n["requests_exchange"], n["pull_exchange"], n["control_exchange"], n["dead_exchange"]],
            [n["requests_queue"], n["pull_queue"], n["control_queue"], n["dead_queue"]],
        )

    async def metrics(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.worker.metrics)

    async def send_committed(
        self, body: bytes, targets: list[str], message_id: str
    ) -> dict[str, float]:
        """Publish one request; time until confirmed, applied (status) and committed."""
        client = self.client
        assert client is not None
        t0 = time.perf_counter()
        await client.send(body, targets, message_id=message_id)
        t_confirm = time.perf_counter()
        polls = 0
        while True:
            p0 = time.perf_counter()
            reply = await client.status(message_id)
            polls += 1
            if "status" in reply:
                break
            if time.perf_counter() - t0 > 60:
                raise RuntimeError(f"request {message_id} not applied after 60 s: {reply}")
        t_applied = time.perf_counter()
        # A pull is answered only after the commit barrier that follows it, so a max=0 pull
        # sent after the status answered returns once the request's effect is on disk.
        await client.pull(targets[0], None, max=0)
        t_committed = time.perf_counter()
        return {
            "publish_confirm_ms": ms(t_confirm - t0),
            "applied_ms": ms(t_applied - t0),
            "committed_ms": ms(t_committed - t0),
            "status_polls": polls,
            "last_status_rtt_ms": ms(t_applied - p0),
        }


def db_size(path: Path) -> dict[str, Any]:
    """Checkpoint the WAL (from a second connection, which WAL mode allows) and measure."""
    conn = sqlite3.connect(path, timeout=30)
    try:
        for _ in range(50):
            busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            if not busy:
                break
            time.sleep(0.05)
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        tables = {
            name: int(size)
            for name, size in conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name")
        }
    finally:
        conn.close()
    wal = Path(str(path) + "-wal")
    return {
        "bytes": pages * page_size,
        "used_bytes": (pages - free) * page_size,
        "file_bytes": path.stat().st_size + (wal.stat().st_size if wal.exists() else 0),
        "tables": tables,
    }
