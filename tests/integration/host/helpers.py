"""Shared pieces of the host's integration tests: a worker process started on a state file
it did not write (a corrupt file, another program's SQLite), as the workers' tests use it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest


def foreign(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        db.execute("INSERT INTO invoices VALUES (1, 9.5)")
    db.close()


def corrupt(path: Path) -> None:
    path.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))


# The bad state files, each with what the refusal says
BAD_STATE_FILES = pytest.mark.parametrize(
    ("make", "message"),
    [(corrupt, "is not a usable SQLite database"), (foreign, "did not create")],
    ids=["corrupt", "foreign"],
)


def refused_at_start(
    worker: str,
    worker_env: dict[str, str],
    broker_url: str,
    tmp_path: Path,
    make: Callable[[Path], None],
    message: str,
    cleanup: Callable[[], Awaitable[None]],
) -> None:
    """``rabbitmq-bridge run <worker>`` on the state file ``make`` wrote exits non-zero,
    says ``message`` and names the file, and leaves it as it was, alone in its directory."""
    state = tmp_path / "state"
    (state / worker).mkdir(parents=True)
    path = state / worker / f"{worker}.sqlite3"
    make(path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    env = {
        **os.environ,
        **worker_env,
        "BRIDGE_AMQP_URL": broker_url,
        "BRIDGE_STATE_DIR": str(state),
        "BRIDGE_HTTP_PORT": "0",
        "BRIDGE_LOG_FORMAT": "text",
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bridge.cli", "run", worker],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        asyncio.run(cleanup())
    assert done.returncode != 0
    assert message in done.stderr and str(path) in done.stderr, done.stderr[-2000:]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before, "the file must stay as is"
    assert sorted(p.name for p in path.parent.iterdir()) == [f"{worker}.sqlite3"]
