"""``rabbitmq-bridge delay migrate``: the worker takes over a delayed-message plugin
exchange's name; producers and consumers change nothing and nothing the plugin held is lost.

The refusals run everywhere; the migration itself and its dry run need the real plugin
(rabbitmq-delayed-message-exchange) and skip, saying so, on a broker without it (CI's)."""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from typing import Any

import aio_pika
import aio_pika.exceptions
import pytest

from bench.harness.broker import delete_names
from bridge.ring import exchange_type_missing
from tests.broker_cli import cli_command, require_cli
from tests.integration.delay.helpers import delay_settings, delay_worker, env_for
from tests.integration.host.test_operator import run_cli
from workers.delay.config import DelaySettings
from workers.delay.migrate import BrokerCli, Migration

pytestmark = pytest.mark.integration


@pytest.fixture
async def plugin_broker(broker_url: str) -> str:
    """The broker, for the tests that need the delayed-message plugin (skipped without it,
    also under TEST_BROKER_REQUIRED=1: the brokers CI tests do not have it)."""
    conn = await aio_pika.connect(broker_url)
    name = f"t{os.getpid()}.{time.monotonic_ns()}.probe"
    try:
        channel = await conn.channel()
        await channel.declare_exchange(
            name, "x-delayed-message", auto_delete=True, arguments={"x-delayed-type": "direct"}
        )
        await channel.exchange_delete(name)
    except Exception as exc:
        if exchange_type_missing(exc) or "command_invalid" in str(exc).lower():
            pytest.skip(
                "the broker has no x-delayed-message exchange type "
                "(rabbitmq-delayed-message-exchange is not installed)"
            )
        raise
    finally:
        if not conn.is_closed:
            await conn.close()
    require_cli(broker_url)
    return broker_url


def names(unique: str, **overrides: Any) -> DelaySettings:
    legacy = f"{unique}.legacy"
    fields: dict[str, Any] = {"in_exchange": legacy, "default_target": f"{legacy}.due"}
    return delay_settings(unique, **{**fields, **overrides})


def migrate(broker_url: str, s: DelaySettings, *args: str, env: dict[str, str] | None = None):
    environment = {**env_for(s), "BRIDGE_AMQP_URL": broker_url}
    if s.default_target:
        environment["BRIDGE_DELAY__DEFAULT_TARGET"] = s.default_target
    environment.update(env or {})
    ctl = shlex.join(cli_command())
    return run_cli("delay", "migrate", *args, "--rabbitmqctl", ctl, env=environment, timeout=120)


def one_refusal(run, text: str) -> None:
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.splitlines() == [f"rabbitmq-bridge: delay migrate: {text}"], run.stderr
    assert "Traceback" not in run.stdout + run.stderr


async def exchange_type(exchange: str) -> str | None:
    from tests.broker_cli import rabbitmqctl

    out = await asyncio.to_thread(rabbitmqctl, "-q", "list_exchanges", "name", "type")
    for line in out.splitlines():
        parts = line.split("\t")
        if parts[0] == exchange:
            return parts[1]
    return None


# -- refusals, on any broker -------------------------------------------------------------


def test_refuses_an_exchange_that_does_not_exist(broker_url, unique):
    s = names(unique)
    run = migrate(broker_url, s, s.in_exchange)
    one_refusal(
        run,
        f"exchange {s.in_exchange} does not exist in vhost /: nothing to migrate (check the "
        "name and the vhost of BRIDGE_AMQP_URL)",
    )


@pytest.mark.parametrize("dry_run", [False, True])
async def test_refuses_an_exchange_that_is_not_the_plugins(broker_url, amqp, unique, dry_run):
    require_cli(broker_url)
    s = names(unique)
    channel = await amqp.channel()
    await channel.declare_exchange(s.in_exchange, "direct", durable=True)
    try:
        run = migrate(broker_url, s, s.in_exchange, *(["--dry-run"] if dry_run else []))
        one_refusal(
            run,
            f"exchange {s.in_exchange} is a direct exchange, not the delayed-message plugin's "
            "(x-delayed-message): nothing to migrate",
        )
        assert run.stdout == ""
        assert await exchange_type(s.in_exchange) == "direct"
        assert await exchange_type(s.default_target or "") is None
    finally:
        await delete_names(broker_url, [s.in_exchange], [])


def test_refuses_settings_the_worker_could_not_run_with(broker_url, unique):
    s = names(unique)
    one_refusal(
        migrate(broker_url, s, f"{unique}.other"),
        f"BRIDGE_DELAY__IN_EXCHANGE is {s.in_exchange}, not {unique}.other: run it with the "
        f"settings the worker will run with (BRIDGE_DELAY__IN_EXCHANGE={unique}.other)",
    )
    untargeted = names(unique, default_target=None)
    one_refusal(
        migrate(broker_url, untargeted, s.in_exchange),
        f"BRIDGE_DELAY__DEFAULT_TARGET is not set: {s.in_exchange}'s producers send no "
        f"x-target-exchange; set it to the exchange that gets {s.in_exchange}'s bindings (e.g. "
        f"{s.in_exchange}.due)",
    )
    one_refusal(
        migrate(
            broker_url,
            s,
            s.in_exchange,
            env={"BRIDGE_DELAY__SHARD_COUNT": "2", "BRIDGE_DELAY__SHARD_INDEX": "0"},
        ),
        "BRIDGE_DELAY__SHARD_COUNT=2: migrate into one worker (SHARD_COUNT=1), shard afterwards",
    )


async def test_refuses_when_rabbitmqctl_does_not_answer(broker_url, amqp, unique):
    s = names(unique)
    channel = await amqp.channel()
    await channel.declare_exchange(s.in_exchange, "direct", durable=True)
    try:
        environment = {
            **env_for(s),
            "BRIDGE_AMQP_URL": broker_url,
            "BRIDGE_DELAY__DEFAULT_TARGET": s.default_target or "",
        }
        run = run_cli(
            "delay",
            "migrate",
            s.in_exchange,
            "--rabbitmqctl",
            "/nonexistent/rabbitmqctl",
            env=environment,
        )
        assert run.returncode == 2, run.stderr
        (line,) = run.stderr.splitlines()
        assert line.startswith(
            "rabbitmq-bridge: delay migrate: `/nonexistent/rabbitmqctl` failed ("
        ), line
        assert line.endswith(
            "give --rabbitmqctl a command that reaches the broker's node, e.g. "
            "'rabbitmqctl -n rabbit@host' or 'kubectl exec rabbitmq-0 -- rabbitmqctl'"
        )
    finally:
        await delete_names(broker_url, [s.in_exchange], [])


# -- against the real plugin ---------------------------------------------------------------


async def legacy_topology(amqp, s: DelaySettings, unique: str) -> dict[str, Any]:
    """What a team has: a plugin exchange (routing as topic), a consumer queue bound to it,
    an upstream exchange feeding it."""
    channel = await amqp.channel()
    x = await channel.declare_exchange(
        s.in_exchange, "x-delayed-message", durable=True, arguments={"x-delayed-type": "topic"}
    )
    orders = await channel.declare_queue(f"{unique}.orders", durable=True)
    await orders.bind(x, "order.*")
    upstream = await channel.declare_exchange(f"{unique}.up", "fanout", durable=True)
    await x.bind(upstream, "")
    return {"channel": channel, "x": x, "orders": orders, "upstream": upstream}


async def drain(
    queue, count: int, timeout: float = 30.0
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    got: list[aio_pika.abc.AbstractIncomingMessage] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        message = await queue.get(fail=False)
        if message is None:
            await asyncio.sleep(0.05)
            continue
        await message.ack()
        got.append(message)
    return got


async def test_migration_keeps_what_the_plugin_held_and_producers_unchanged(
    plugin_broker, amqp, tmp_path, unique
):
    s = names(unique)
    t = await legacy_topology(amqp, s, unique)
    try:
        for i in range(3):  # held by the plugin when the migration starts
            await t["x"].publish(
                aio_pika.Message(b"old", message_id=f"old-{i}", headers={"x-delay": 1500}),
                "order.created",
            )
        run = await asyncio.to_thread(migrate, plugin_broker, s, s.in_exchange, "--wait", "60")
        assert run.returncode == 0, run.stdout + run.stderr
        assert "5. done:" in run.stdout and "4. done:" in run.stdout, run.stdout
        assert await exchange_type(s.in_exchange) == "topic"
        assert await exchange_type(s.default_target or "") == "topic"
        old = await drain(t["orders"], 3)  # delivered by the plugin before the swap
        assert sorted(m.message_id or "" for m in old) == ["old-0", "old-1", "old-2"]

        # the same producer code: the same exchange names, x-delay, routing keys
        channel = await amqp.channel()
        x = await channel.get_exchange(s.in_exchange)
        await x.publish(
            aio_pika.Message(b"new", message_id="new-1", headers={"x-delay": 300}),
            "order.created",
        )
        upstream = await channel.get_exchange(f"{unique}.up")
        await upstream.publish(
            aio_pika.Message(b"new", message_id="new-2", headers={"x-delay": 300}), "order.paid"
        )
        async with delay_worker(plugin_broker, tmp_path, s, amqp):
            new = await drain(t["orders"], 2)
            assert sorted(m.message_id or "" for m in new) == ["new-1", "new-2"]
            assert all("x-delay" not in (m.headers or {}) for m in new)
        assert await drain(t["orders"], 1, timeout=0.5) == []  # nothing twice
    finally:
        await delete_names(
            plugin_broker,
            [s.in_exchange, s.default_target or "", f"{unique}.up"],
            [f"{unique}.orders", s.in_queue],
        )


async def test_dry_run_prints_the_steps_and_changes_nothing(plugin_broker, amqp, unique):
    s = names(unique)
    await legacy_topology(amqp, s, unique)
    try:
        run = await asyncio.to_thread(migrate, plugin_broker, s, s.in_exchange, "--dry-run")
        assert run.returncode == 0, run.stderr
        x, due = s.in_exchange, s.default_target
        assert run.stdout.splitlines() == [
            f"migrate exchange {x} in vhost / (x-delayed-message, x-delayed-type topic, "
            f"durable) to the delay worker; the plugin holds 0 delayed message(s) for {x} now",
            f"1. declare exchange {due} (topic, durable) and copy {x}'s 1 binding(s) onto it:",
            f"   {due} -> queue {unique}.orders ('order.*')",
            f"2. declare queue {s.in_queue} (quorum) if missing",
            f"3. check that the plugin holds no message for {x} (else stop: use --wait)",
            f"4. delete exchange {x} (its bindings go with it: consumers now receive through "
            f"{due}) and at once declare it again (topic, durable), bind queue {s.in_queue} to "
            f"it '#' and bind again into it: {unique}.up -> exchange {x} ('')",
            f"5. count again: a message the plugin took for {x} after step 3 is routed by it, "
            f"when due, into the new {x}, with the plugin's negative x-delay: the worker "
            f"delivers it at once through {due}",
            f"6. then start the worker with BRIDGE_DELAY__IN_EXCHANGE={x} "
            f"BRIDGE_DELAY__IN_QUEUE={s.in_queue} BRIDGE_DELAY__DEFAULT_TARGET={due}: what "
            f"producers publish to {x} meanwhile waits in {s.in_queue}",
        ]
        assert await exchange_type(x) == "x-delayed-message"
        assert await exchange_type(due or "") is None
    finally:
        await delete_names(plugin_broker, [s.in_exchange, f"{unique}.up"], [f"{unique}.orders"])


async def test_refuses_while_the_plugin_holds_messages_and_changes_nothing(
    plugin_broker, amqp, unique
):
    s = names(unique)
    t = await legacy_topology(amqp, s, unique)
    try:
        await t["x"].publish(
            aio_pika.Message(b"held", headers={"x-delay": 600_000}), "order.created"
        )
        for args in ([], ["--dry-run"]):
            run = await asyncio.to_thread(migrate, plugin_broker, s, s.in_exchange, *args)
            assert run.stderr.splitlines() == [
                f"rabbitmq-bridge: delay migrate: the plugin still holds 1 delayed message(s) "
                f"for {s.in_exchange}; nothing was changed: run again with --wait (it waits "
                "until the plugin has delivered them; producers that keep delaying must pause "
                "meanwhile)"
            ]
            assert run.returncode == 2
        assert await exchange_type(s.in_exchange) == "x-delayed-message"
        assert await exchange_type(s.default_target or "") is None
    finally:
        await delete_names(plugin_broker, [s.in_exchange, f"{unique}.up"], [f"{unique}.orders"])


async def test_refuses_when_another_worker_consumes_the_ingress_queue(plugin_broker, amqp, unique):
    s = names(unique)
    await legacy_topology(amqp, s, unique)
    channel = await amqp.channel()
    queue = await channel.declare_queue(
        s.in_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )

    async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        pass

    await queue.consume(ignore)
    try:
        run = await asyncio.to_thread(migrate, plugin_broker, s, s.in_exchange)
        one_refusal(
            run,
            f"queue {s.in_queue} has 1 consumer(s): a delay worker with "
            f"BRIDGE_DELAY__IN_QUEUE={s.in_queue} runs for another exchange; give this one its "
            "own BRIDGE_DELAY__IN_QUEUE (and control, dead-letter names and state directory)",
        )
        assert await exchange_type(s.in_exchange) == "x-delayed-message"
    finally:
        await channel.close()
        await delete_names(
            plugin_broker, [s.in_exchange, f"{unique}.up"], [f"{unique}.orders", s.in_queue]
        )


async def test_a_producer_that_keeps_publishing_through_the_swap_loses_nothing(
    plugin_broker, amqp, tmp_path, unique
):
    """Short delays published all along, as the plugin's producers do (confirms, no
    mandatory: the plugin returns every delayed message under mandatory). Every confirmed
    message is delivered once, by the plugin before the swap or by the worker after it;
    a publish while X is missing is refused (404), an error the producer sees.

    Known gap (docs/delay.md): the swap is two broker round trips long (X deleted, then
    declared; then bound): a message the plugin routes while X is missing goes nowhere, and a
    publish between X's declaration and its binding is unroutable. The test allows losses
    only there: confirmed at most 0.2 s before the last refusal or 0.1 s after it."""
    s = names(unique)
    t = await legacy_topology(amqp, s, unique)
    confirmed: dict[str, float] = {}  # message id -> when it was published
    refusals: list[float] = []
    stop = asyncio.Event()

    async def producer() -> None:
        channel = await amqp.channel(publisher_confirms=True)
        n = 0
        while not stop.is_set():
            n += 1
            sent = time.monotonic()
            try:
                x = await channel.get_exchange(s.in_exchange, ensure=False)
                await x.publish(
                    aio_pika.Message(b"p", message_id=f"p-{n}", headers={"x-delay": 30}),
                    "order.created",
                    mandatory=False,
                )
                confirmed[f"p-{n}"] = sent
            except aio_pika.exceptions.AMQPError:
                refusals.append(sent)
                channel = await amqp.channel(publisher_confirms=True)
            await asyncio.sleep(0.05)

    task = asyncio.create_task(producer())
    try:
        await asyncio.sleep(1.0)
        run = await asyncio.to_thread(migrate, plugin_broker, s, s.in_exchange, "--wait", "60")
        assert run.returncode == 0, run.stdout + run.stderr
        async with delay_worker(plugin_broker, tmp_path, s, amqp):
            await asyncio.sleep(1.0)
            stop.set()
            await task
            got = await drain(t["orders"], len(confirmed), timeout=30)
            ids = [m.message_id or "" for m in got]
            assert len(ids) == len(set(ids)), "a message was delivered twice"
            assert set(ids) <= set(confirmed)
            # the plugin's deliveries carry its negative x-delay, the worker's none: the swap
            # came after the last message the plugin delivered (and after any 404)
            by_plugin = [
                confirmed[m.message_id or ""] for m in got if "x-delay" in (m.headers or {})
            ]
            assert by_plugin and len(by_plugin) < len(got), "not both paths delivered"
            swapped = max(refusals or by_plugin)
            missing = {mid: sent - swapped for mid, sent in confirmed.items() if mid not in ids}
            assert all(-0.2 <= after <= 0.1 for after in missing.values()), (
                f"lost outside the moment of the swap: {missing}; {len(confirmed)} confirmed, "
                f"{len(got)} delivered, {len(refusals)} refused; {run.stdout}"
            )
            assert len(confirmed) - len(missing) > 20
    finally:
        stop.set()
        await task
        await delete_names(
            plugin_broker,
            [s.in_exchange, s.default_target or "", f"{unique}.up"],
            [f"{unique}.orders", s.in_queue],
        )


@pytest.mark.parametrize("kind", ["topic", "direct"])
async def test_what_the_plugin_took_after_the_last_count_reaches_the_consumers(
    plugin_broker, amqp, tmp_path, unique, kind
):
    """Step 5: messages the plugin took after step 3's count (here: published after the plan
    counted and before the swap) are routed by the plugin, when due, into the new X with its
    former type and a negative x-delay; the worker's queue takes them and the worker delivers
    them at once through X.due. For a direct type only the binding keys X had route."""
    s = names(unique)
    channel = await amqp.channel()
    x = await channel.declare_exchange(
        s.in_exchange, "x-delayed-message", durable=True, arguments={"x-delayed-type": kind}
    )
    orders = await channel.declare_queue(f"{unique}.orders", durable=True)
    await orders.bind(x, "order.created")
    lines: list[str] = []
    conn = await aio_pika.connect_robust(plugin_broker)
    try:
        migration = Migration(
            conn, plugin_broker, s, BrokerCli(shlex.join(cli_command()), "/"), lines.append
        )
        plan = await migration.plan(s.in_exchange)
        assert plan.delayed == 0
        for i in range(3):  # taken by the plugin after the count, due after the swap
            await x.publish(
                aio_pika.Message(b"late", message_id=f"late-{i}", headers={"x-delay": 2000}),
                "order.created",
            )
        await migration.run(plan, None)
        assert plan.delayed == 3, lines
        assert any(line.startswith("5. done: the plugin holds 3 message(s)") for line in lines)
        async with delay_worker(plugin_broker, tmp_path, s, amqp):
            got = await drain(orders, 3)
            assert sorted(m.message_id or "" for m in got) == ["late-0", "late-1", "late-2"]
            assert all("x-delay" not in (m.headers or {}) for m in got)
            assert await drain(orders, 1, timeout=1.0) == []  # nothing twice
    finally:
        await conn.close()
        await channel.close()
        await delete_names(
            plugin_broker, [s.in_exchange, s.default_target or ""], [orders.name, s.in_queue]
        )
