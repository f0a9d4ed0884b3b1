"""Shared pieces of the directed integration tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench.harness.broker import delete_names
from bench.harness.procs import WorkerProcess, settings_env
from tests.conftest import get_messages, running_host
from workers.directed.client import DirectedClient
from workers.directed.config import DirectedSettings
from workers.directed.worker import DirectedWorker


def directed_settings(unique: str, **overrides: Any) -> DirectedSettings:
    names = {
        "requests_exchange": f"{unique}.directed.requests",
        "requests_queue": f"{unique}.directed.requests",
        "pull_exchange": f"{unique}.directed.pull",
        "pull_queue": f"{unique}.directed.pull",
        "control_exchange": f"{unique}.directed.control",
        "control_queue": f"{unique}.directed.control",
        "dead_exchange": f"{unique}.directed.dead",
        "dead_queue": f"{unique}.directed.dead",
        "housekeeping_interval_s": 0.1,
    }
    names.update(overrides)
    return DirectedSettings(**names)


ENV_FIELDS = (
    "requests_exchange",
    "requests_queue",
    "pull_exchange",
    "pull_queue",
    "control_exchange",
    "control_queue",
    "dead_exchange",
    "dead_queue",
    "queue_limit",
    "overflow",
    "housekeeping_interval_s",
)


def env_for(settings: DirectedSettings) -> dict[str, str]:
    """The same settings as BRIDGE_DIRECTED__* variables, for a worker subprocess."""
    return settings_env("directed", settings, ENV_FIELDS)


async def cleanup(url: str, s: DirectedSettings) -> None:
    await delete_names(
        url,
        [s.requests_exchange, s.pull_exchange, s.control_exchange, s.dead_exchange],
        [s.requests_queue, s.pull_queue, s.control_queue, s.dead_queue],
    )


@contextlib.asynccontextmanager
async def directed(
    broker_url: str, state: Path, settings: DirectedSettings, amqp: Any
) -> AsyncIterator[tuple[DirectedWorker, DirectedClient]]:
    worker = DirectedWorker(settings)
    try:
        async with running_host(broker_url, state, [worker]):
            client = await DirectedClient(amqp, settings).open()
            try:
                yield worker, client
            finally:
                await client.close()
    finally:
        await cleanup(broker_url, settings)


async def wait_applied(
    client: DirectedClient, message_id: str, timeout: float = 10.0
) -> dict[str, Any]:
    """Poll the status query until the worker has applied the request."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        reply = await client.status(message_id)
        if "status" in reply:
            return reply["status"]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"request {message_id} not applied: {reply}")
        await asyncio.sleep(0.05)


async def dead_letters(
    amqp: Any, settings: DirectedSettings, count: int, timeout: float = 10.0
) -> list[Any]:
    return await get_messages(amqp, settings.dead_queue, count, timeout)


def directed_process(broker_url: str, tmp_path: Path, settings: DirectedSettings) -> WorkerProcess:
    """``rabbitmq-bridge run directed`` as a process of its own, with ``settings``, its state
    in ``tmp_path/state`` and its log in ``tmp_path/worker.log`` (not started)."""
    return WorkerProcess(
        ["directed"],
        broker_url=broker_url,
        state_dir=tmp_path / "state",
        env=env_for(settings),
        log=tmp_path / "worker.log",
    )
