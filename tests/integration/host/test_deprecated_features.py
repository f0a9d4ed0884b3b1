"""Nothing the workers declare or use is a deprecated feature of the broker (RabbitMQ 4.x).

The three workers run in this process and carry every flow of ``bridge demo`` end to end
(a directed message pulled by its targets, delayed messages on two topics, gateway round
trips through two backends); while they still run, the broker answers which deprecated
features are in use (``rabbitmq-diagnostics check_if_any_deprecated_features_are_used``:
transient non-exclusive queues, classic queue mirroring, queue master locators, RAM nodes),
and none may be. The broker must answer it: RabbitMQ has the command from 3.13 on, an older
broker skips the test with the reason. Global QoS is denied from 4.0 on (the broker ignores
the flag and logs an error): no worker asks for it (``bridge/amqp/consumer.py`` and
aio-pika's ``set_qos`` send ``global=false``), and the broker's check cannot see it.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import aio_pika
import pytest

from bridge.demo import FlowResult, Progress, Tour, delete_names, demo_names
from tests.broker_cli import BrokerCliError, diagnostics, rabbitmqctl, require_cli
from tests.conftest import running_host

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FIRST_WITH_THE_CHECK = (3, 13)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split("-")[0].split(".") if part)


def _transient_nonexclusive_queues() -> list[str]:
    """The queues that make ``transient_nonexcl_queues`` count as used, for the message."""
    rows = json.loads(
        rabbitmqctl("list_queues", "name", "durable", "exclusive", "-q", "--formatter", "json")
    )
    return sorted(r["name"] for r in rows if not r["durable"] and not r["exclusive"])


async def test_workers_use_no_deprecated_broker_feature(broker_url: str, tmp_path: Path) -> None:
    require_cli(broker_url, "rabbitmq-diagnostics")
    status = json.loads(diagnostics("status", "--formatter", "json"))
    version = str(status.get("rabbitmq_version", "0"))
    if _version(version) < FIRST_WITH_THE_CHECK:
        pytest.skip(
            f"RabbitMQ {version} cannot say which deprecated features are in use "
            "(check_if_any_deprecated_features_are_used arrived in 3.13)"
        )
    names = demo_names("demo-t" + uuid.uuid4().hex[:8])
    workers = [part.worker for part in names.parts]
    connection = await aio_pika.connect_robust(broker_url)
    ctx = Tour(connection, broker_url, Progress())
    try:
        async with running_host(broker_url, tmp_path, workers):
            try:
                for part in names.parts:
                    flow = part.flow
                    result = FlowResult(flow)
                    await asyncio.wait_for(part.run(ctx, result), 60)
                    assert result.error is None, f"{flow}: {result.error}"
                # while every queue, consumer and channel of the workers exists
                try:
                    await asyncio.to_thread(
                        diagnostics, "check_if_any_deprecated_features_are_used"
                    )
                except BrokerCliError as exc:
                    transient = await asyncio.to_thread(_transient_nonexclusive_queues)
                    pytest.fail(
                        f"RabbitMQ {version} reports deprecated features in use while the "
                        f"workers run: {exc}; transient non-exclusive queues: {transient}"
                    )
            finally:
                for cleanup in reversed(ctx.cleanups):
                    await asyncio.wait_for(cleanup(), 10)
    finally:
        await connection.close()
        await delete_names(broker_url, names)
