"""Taking over the name of an existing exchange of another type (the delayed-message plugin's
``x-delayed-message`` exchange, stood in for by a ``direct`` one: the plugin is not installed
here, and any other type gets the same 406 from the broker)."""

from __future__ import annotations

import aio_pika
import aio_pika.exceptions
import pytest

from bench.harness.broker import delete_names
from bench.harness.procs import free_port
from bridge.amqp import check_exchanges
from bridge.errors import ConfigError
from tests.integration.delay.helpers import delay_settings, env_for
from tests.integration.host.test_operator import run_cli

pytestmark = pytest.mark.integration


async def exists(amqp, exchange: str) -> bool:
    channel = await amqp.channel()
    try:
        await channel.declare_exchange(exchange, passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return False
    await channel.close()
    return True


async def test_run_over_an_exchange_of_another_type_says_what_to_do_and_declares_nothing(
    broker_url, amqp, tmp_path, unique
):
    s = delay_settings(unique, in_exchange=f"{unique}.legacy")
    channel = await amqp.channel()
    await channel.declare_exchange(s.in_exchange, "direct", durable=True)
    env = {
        **env_for(s),
        "BRIDGE_AMQP_URL": broker_url,
        "BRIDGE_STATE_DIR": str(tmp_path),
        "BRIDGE_HTTP_PORT": str(free_port()),
    }
    try:
        run = run_cli("run", "delay", env=env)
        assert run.returncode == 2, run.stdout + run.stderr
        errors = [line for line in run.stderr.splitlines() if "error" in line.lower()]
        assert errors == [
            f"rabbitmq-bridge: configuration error: BRIDGE_DELAY__IN_EXCHANGE={s.in_exchange}: "
            "that exchange already exists with type direct, the worker needs a durable topic "
            "exchange; nothing was declared. Delete it if nothing else uses it, or give the "
            "worker another name."
        ], run.stderr
        assert "Traceback" not in run.stdout + run.stderr
        for name in (s.dead_exchange, s.control_exchange):
            assert not await exists(amqp, name), f"{name} was declared"
        assert not (tmp_path / "delay" / "delay.sqlite3").exists()
    finally:
        await delete_names(broker_url, [s.in_exchange, s.dead_exchange, s.control_exchange], [])


async def test_every_conflict_is_one_line_with_the_advice_for_its_type(broker_url, amqp, unique):
    channel = await amqp.channel()
    await channel.declare_exchange(f"{unique}.a", "direct", durable=True)
    await channel.declare_exchange(f"{unique}.b", "topic", durable=False)
    await channel.declare_exchange(f"{unique}.ok", "fanout", durable=True)
    try:
        with pytest.raises(ConfigError) as caught:
            await check_exchanges(
                broker_url,
                [
                    (f"{unique}.a", "topic", "A"),
                    (f"{unique}.b", "topic", "B"),
                    (f"{unique}.ok", "fanout", "OK"),
                    (f"{unique}.new", "topic", "NEW"),
                ],
                {"direct": "drain and delete it first"},
            )
        a, b = caught.value.problems
        assert a.startswith(f"A={unique}.a: that exchange already exists with type direct")
        assert a.endswith("nothing was declared. drain and delete it first")
        assert b.startswith(f"B={unique}.b: that exchange already exists with inequivalent ")
        assert "durable" in b
        assert not await exists(amqp, f"{unique}.new")  # checked, not declared
    finally:
        await delete_names(broker_url, [f"{unique}.a", f"{unique}.b", f"{unique}.ok"], [])


async def test_sharded_run_over_a_shards_exchange_of_another_type_is_one_line(
    broker_url, amqp, tmp_path, unique
):
    s = delay_settings(unique, shards_exchange=f"{unique}.shards")
    channel = await amqp.channel()
    await channel.declare_exchange(s.shards_exchange, "fanout", durable=True)
    env = {
        **env_for(s),
        "BRIDGE_DELAY__SHARDS_EXCHANGE": s.shards_exchange,
        "BRIDGE_DELAY__SHARD_COUNT": "2",
        "BRIDGE_DELAY__SHARD_INDEX": "0",
        "BRIDGE_AMQP_URL": broker_url,
        "BRIDGE_STATE_DIR": str(tmp_path),
        "BRIDGE_HTTP_PORT": str(free_port()),
    }
    try:
        run = run_cli("run", "delay", env=env)
        assert run.returncode == 2, run.stdout + run.stderr
        assert "Traceback" not in run.stdout + run.stderr
        errors = [line for line in run.stderr.splitlines() if "error" in line.lower()]
        assert errors == [
            f"rabbitmq-bridge: configuration error: BRIDGE_DELAY__SHARDS_EXCHANGE="
            f"{s.shards_exchange}: that exchange already exists with type fanout, the worker "
            "needs a durable x-consistent-hash exchange; nothing was declared. Delete it if "
            "nothing else uses it, or give the worker another name."
        ], run.stderr
        for name in (s.in_exchange, s.dead_exchange, s.control_exchange):
            assert not await exists(amqp, name), f"{name} was declared"
    finally:
        await delete_names(
            broker_url, [s.shards_exchange, s.in_exchange, s.dead_exchange, s.control_exchange], []
        )
