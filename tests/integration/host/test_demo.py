"""``rabbitmq-bridge demo`` as a user runs it: a subprocess against the test broker that must succeed
and leave no exchange, queue or state directory behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import uuid
from pathlib import Path

import aio_pika
import aiormq
import pytest

from bridge.demo import demo_names

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]


async def run_demo(broker_url: str, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "BRIDGE_AMQP_URL": broker_url, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge.cli",
        "demo",
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 100)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def existing(broker_url: str, exchanges: list[str], queues: list[str]) -> list[str]:
    """Names a passive declare finds (a queue exclusive to another connection counts)."""
    found = []
    conn = await aio_pika.connect(broker_url)
    try:
        for kind, name in [("exchange", e) for e in exchanges] + [("queue", q) for q in queues]:
            channel = await conn.channel()
            try:
                if kind == "exchange":
                    await channel.declare_exchange(name, passive=True)
                else:
                    await channel.declare_queue(name, passive=True)
                found.append(name)
            except aiormq.exceptions.ChannelNotFoundEntity:
                pass
            except aiormq.exceptions.ChannelLockedResource:
                found.append(name)
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()
    finally:
        await conn.close()
    return found


async def test_demo_runs_every_flow_and_leaves_nothing_behind(broker_url):
    prefix = "demo-t" + uuid.uuid4().hex[:8]
    code, out, err = await run_demo(broker_url, "--prefix", prefix)
    assert code == 0, out + err
    for flow in ("directed", "delay", "gateway"):
        assert re.search(rf"^{flow} .* OK$", out, re.M), out
    assert "all flows OK" in out
    assert "redelivered: true" in out
    assert re.search(r"status: total 5, acked 5, pending 0, state done", out)
    assert re.search(r"hot: 300/300 arrived", out) and re.search(r"cold: 5/5 arrived", out)

    names = demo_names(prefix)
    assert all(n.startswith(prefix + ".") for n in names.exchanges() + names.queues())
    assert await existing(broker_url, names.exchanges(), names.queues()) == []
    state = re.search(r"state in (\S+)", out)
    assert state is not None
    assert not await asyncio.to_thread(Path(state.group(1)).exists)


async def test_demo_refuses_names_that_exist_and_deletes_nothing(broker_url):
    prefix = "demo-t" + uuid.uuid4().hex[:8]
    taken = demo_names(prefix).part("delay").hot_exchange
    conn = await aio_pika.connect(broker_url)
    try:
        channel = await conn.channel()
        await channel.declare_exchange(taken, aio_pika.ExchangeType.TOPIC)
        code, out, err = await run_demo(broker_url, "--prefix", prefix)
        assert code == 1, out + err
        assert "already exist" in err and "another --prefix" in err
        assert await existing(broker_url, [taken], []) == [taken]
    finally:
        channel = await conn.channel()
        await channel.exchange_delete(taken)
        await conn.close()


async def test_demo_prefix_must_start_with_demo(broker_url):
    code, _, err = await run_demo(broker_url, "--prefix", "directed")
    assert code == 1 and "must start with 'demo'" in err
