"""Test harness: find a RabbitMQ, give each test unique names, run workers in-process.

Broker, in order: ``BRIDGE_AMQP_URL`` / ``AMQP_URL``; a testcontainers RabbitMQ when a
Docker engine answers (image ``TEST_BROKER_IMAGE``, default ``rabbitmq:4.3``); the
local broker on 127.0.0.1:5672. With none, integration tests skip with the reason, unless
``TEST_BROKER_REQUIRED=1`` (CI), where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from bench.harness.broker import delete_names

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"
CONTAINER_IMAGE = "rabbitmq:4.3"

# The tests' own variables are named outside BRIDGE_, where every worker warns about a
# variable that is no setting. Their former names are refused rather than ignored.
RENAMED = {
    "BRIDGE_REQUIRE_BROKER": "TEST_BROKER_REQUIRED",
    "BRIDGE_TEST_RABBITMQCTL": "TEST_BROKER_RABBITMQCTL",
    "BRIDGE_TEST_RABBITMQ_DIAGNOSTICS": "TEST_BROKER_RABBITMQ_DIAGNOSTICS",
    "BRIDGE_TEST_RABBITMQ_IMAGE": "TEST_BROKER_IMAGE",
    "BRIDGE_CI_RABBITMQ43_DIR": "TEST_BROKER_RABBITMQ43_DIR",
}


def pytest_configure(config: pytest.Config) -> None:
    stale = [f"{old} is now {new}" for old, new in RENAMED.items() if old in os.environ]
    if stale:
        raise pytest.UsageError("renamed test variables: " + "; ".join(stale))


def _reachable(url: str, timeout: float = 1.0) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "localhost", parts.port or 5672), timeout):
            return True
    except OSError:
        return False


def _docker_answers() -> bool:
    if not os.path.exists("/var/run/docker.sock") and not os.environ.get("DOCKER_HOST"):
        return False
    try:
        import docker

        client = docker.from_env(timeout=2)
    except Exception:
        return False
    try:
        client.ping()
        return True
    except Exception:
        return False
    finally:
        client.close()


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    required = os.environ.get("TEST_BROKER_REQUIRED") == "1"
    explicit = os.environ.get("BRIDGE_AMQP_URL") or os.environ.get("AMQP_URL")
    if explicit:
        if not _reachable(explicit, 5):
            pytest.fail(
                f"BRIDGE_AMQP_URL/AMQP_URL is set but {explicit.split('@')[-1]} does not answer"
            )
        yield explicit
        return
    if _docker_answers():
        from testcontainers.rabbitmq import RabbitMqContainer

        image = os.environ.get("TEST_BROKER_IMAGE") or CONTAINER_IMAGE
        with RabbitMqContainer(image) as container:
            # sharded workers need the consistent-hash exchange (ships with RabbitMQ)
            container.exec("rabbitmq-plugins enable rabbitmq_consistent_hash_exchange")
            params = container.get_connection_params()
            yield f"amqp://guest:guest@{params.host}:{params.port}/"
        return
    if _reachable(LOCAL_URL):
        yield LOCAL_URL
        return
    reason = (
        "no RabbitMQ: BRIDGE_AMQP_URL/AMQP_URL unset, no Docker engine answers, "
        "nothing listens on 127.0.0.1:5672"
    )
    if required:
        pytest.fail(reason + " (TEST_BROKER_REQUIRED=1)")
    pytest.skip(reason)


@pytest.fixture
async def chx_broker(broker_url: str) -> str:
    """The broker, for tests of sharded workers: it must have the consistent-hash exchange."""
    from bridge.errors import ConfigError
    from bridge.ring import ensure_chx_exchange

    name = "t" + uuid.uuid4().hex[:10] + ".chx-probe"
    try:
        await ensure_chx_exchange(broker_url, "tests", name)
    except ConfigError as exc:
        if os.environ.get("TEST_BROKER_REQUIRED") == "1":
            pytest.fail(f"{exc} (TEST_BROKER_REQUIRED=1)")
        pytest.skip(str(exc))
    await delete_names(broker_url, [name], [])
    return broker_url


@pytest.fixture
def unique() -> str:
    """A short unique token for exchange and queue names of one test."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
async def amqp(broker_url: str) -> AsyncIterator[Any]:
    import aio_pika

    conn = await aio_pika.connect_robust(broker_url)
    try:
        yield conn
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def running_host(
    broker_url: str, state_dir: Path, workers: list[Any], *, ready: bool = True, **host: Any
) -> AsyncIterator[Any]:
    """Run workers in this event loop, wait until /readyz would say ready (or, with
    ``ready=False``, until every worker started), stop after."""
    from bridge.host import Host
    from bridge.settings import HostSettings

    settings = HostSettings(
        **{
            "amqp_url": broker_url,
            "state_dir": state_dir,
            "http_port": 0,
            "drain_seconds": 5,
            **host,
        }
    )
    h = Host(settings, workers, install_signals=False)
    task = asyncio.get_running_loop().create_task(h.run())
    try:
        for _ in range(300):
            if task.done():
                task.result()
            if h.readiness()[0] or (not ready and len(h.started) == len(workers)):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"host not ready: {h.readiness()}")
        yield h
    finally:
        h.request_stop()
        await asyncio.wait_for(task, 30)


async def get_messages(amqp: Any, queue: str, count: int, timeout: float = 10.0) -> list[Any]:
    """Up to ``count`` messages taken from ``queue`` (acknowledged), within ``timeout`` seconds."""
    channel = await amqp.channel()
    q = await channel.get_queue(queue)
    out: list[Any] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while len(out) < count:
        message = await q.get(no_ack=True, fail=False)
        if message is None:
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
            continue
        out.append(message)
    await channel.close()
    return out
