"""One owner per stateful queue, with real worker processes: a second `directed`, `delay`,
shard (same index) or gateway (same INSTANCE) on the same broker is refused, stays not
ready, says so in one log line with the fix, processes nothing, and takes over once the
owner is gone (kill -9).

Every wait is on a condition with a generous deadline; nothing asserts how long it took.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from bench.harness.procs import WorkerProcess, free_port
from tests.conftest import delete_names
from tests.integration.delay.helpers import cleanup as delay_cleanup
from tests.integration.delay.helpers import delay_settings, make_sink
from tests.integration.delay.helpers import env_for as delay_env
from tests.integration.directed.helpers import cleanup as directed_cleanup
from tests.integration.directed.helpers import directed_settings
from tests.integration.directed.helpers import env_for as directed_env
from tests.integration.gateway.helpers import SERVER_HEARTBEAT_S, gateway_settings
from tests.integration.gateway.helpers import env_for as gateway_env
from workers.delay.client import DelayClient
from workers.directed.client import DirectedClient
from workers.gateway.backend import BackendServer
from workers.gateway.client import GatewayClient

pytestmark = pytest.mark.integration

DEADLINE = 60.0  # generous: the machine is shared
REFUSED = "another process owns it"


async def until(check: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + DEADLINE
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def readyz(proc: WorkerProcess) -> tuple[int, dict[str, Any]]:
    try:
        status, body = proc.http("/readyz", 5.0)
    except OSError:
        return 0, {}
    return status, json.loads(body)


def metric(proc: WorkerProcess, name: str) -> float:
    """The sum of a metric's samples on the process's /metrics."""
    status, body = proc.http("/metrics", 5.0)
    assert status == 200
    total = 0.0
    for line in body.decode().splitlines():
        if re.match(rf"{re.escape(name)}(\{{|\s)", line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def http_pull(proc: WorkerProcess, target: str) -> tuple[int, dict[str, Any]]:
    """A pull over the directed worker's HTTP API (token ``s3cret`` for every target)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{proc.port}/directed/v1/targets/{target}/pull",
        data=json.dumps({"record_id": None, "max": 10}).encode(),
        headers={"Authorization": "Bearer s3cret", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def refusals(proc: WorkerProcess) -> list[str]:
    return [line for line in proc.log.read_text().splitlines() if REFUSED in line]


async def refused(proc: WorkerProcess, queue: str, fix: str) -> None:
    """The process is up, refused: not ready for that reason, one log line with the fix."""
    await until(lambda: refusals(proc), "the refusal logged")

    def says_why() -> bool:  # "starting" until the worker's start returned
        status, body = readyz(proc)
        assert status in (0, 503), body
        return REFUSED in json.dumps(body)

    await until(says_why, "/readyz 503 with the reason")
    lines = refusals(proc)
    assert len(lines) == 1, lines
    assert queue in lines[0] and fix in lines[0], lines[0]
    text = proc.log.read_text()
    assert "bridge.host: ready " not in text and "started, not ready yet" in text, text
    assert proc.proc is not None and proc.proc.poll() is None


def process(name: str, workers: list[str], broker_url: str, tmp: Path, env: dict[str, str]) -> Any:
    return WorkerProcess(
        workers,
        broker_url=broker_url,
        state_dir=tmp / f"state-{name}",  # each its own disk
        env={"BRIDGE_DRAIN_SECONDS": "3", **env},
        log=tmp / f"{name}.log",
    )


async def test_second_directed_worker_waits_and_takes_over(broker_url, tmp_path, unique):
    s = directed_settings(unique)
    env = {**directed_env(s), "BRIDGE_DIRECTED__HTTP_TOKENS": '{"*": "s3cret"}'}
    first = process("first", ["directed"], broker_url, tmp_path, env)
    second = process("second", ["directed"], broker_url, tmp_path, env)
    conn = await aio_pika.connect_robust(broker_url)
    try:
        first.start()
        await asyncio.to_thread(first.wait_ready, DEADLINE)
        second.start()
        await refused(second, s.requests_queue, "SHARD_INDEX")
        client = await DirectedClient(conn, s).open()
        for i in range(20):
            await client.send(b"x", ["t1"], message_id=f"m{i}")
        reply = await client.pull("t1", None, max=50, timeout=30)
        assert len(reply["messages"]) == 20  # all in the first one's store
        await client.pull("t1", reply["record_id"], max=0, timeout=30)  # acknowledged there
        assert (await client.status("m0", timeout=30))["status"]["acked"] == 1
        assert await asyncio.to_thread(metric, second, "bridge_directed_requests_total") == 0
        assert await asyncio.to_thread(metric, second, "bridge_directed_pulls_total") == 0
        # nor over HTTP: its store is not the one the targets use
        status, answer = await asyncio.to_thread(http_pull, second, "t1")
        assert status == 503 and "another process owns" in answer["error"]["message"], answer
        assert len(refusals(second)) == 1  # retried meanwhile, quietly

        await asyncio.to_thread(first.kill9)
        await asyncio.to_thread(second.wait_ready, DEADLINE)
        await client.send(b"y", ["t2"], message_id="after")
        reply = await client.pull("t2", None, max=50, wait_ms=5000, timeout=30)
        assert [m["id"] for m in reply["messages"]] == ["after"]
        status, answer = await asyncio.to_thread(http_pull, second, "t2")
        assert status == 200 and answer["record_id"] == reply["record_id"], answer
        await until(  # counted after the commit, which the pull need not wait for
            lambda: metric(second, "bridge_directed_requests_total") == 1, "counted by the second"
        )
        await client.close()
    finally:
        for proc in (first, second):
            if proc.proc is not None and proc.proc.poll() is None:
                proc.terminate()
        await conn.close()
        await directed_cleanup(broker_url, s)


async def test_second_delay_worker_waits_and_takes_over(broker_url, amqp, tmp_path, unique):
    s = delay_settings(unique, lanes=2)
    env = delay_env(s)
    first = process("first", ["delay"], broker_url, tmp_path, env)
    second = process("second", ["delay"], broker_url, tmp_path, env)
    sink = await make_sink(amqp, unique, "target")
    client = await DelayClient(amqp, s).open()
    try:
        first.start()
        await asyncio.to_thread(first.wait_ready, DEADLINE)
        second.start()
        await refused(second, s.in_queue, "SHARD_INDEX")
        for i in range(10):
            await client.send(b"x", sink.exchange, delay_ms=0, message_id=f"m{i}")
        await sink.wait_for(10, timeout=DEADLINE)

        async def owner_empty() -> bool:  # answered by the owner; deletes commit after delivery
            return (await client.counts(timeout=30)).get("total") == 0

        await until(owner_empty, "the owner's store empty")
        assert await asyncio.to_thread(metric, second, "bridge_delay_received_total") == 0
        assert await asyncio.to_thread(metric, second, "bridge_delay_published_total") == 0
        assert len(refusals(second)) == 1

        await asyncio.to_thread(first.kill9)
        await asyncio.to_thread(second.wait_ready, DEADLINE)
        await client.send(b"y", sink.exchange, delay_ms=0, message_id="after")
        await sink.wait_for(11, timeout=DEADLINE)
        assert sink.ids()[-1] == "after"
        await until(  # counted when the lane reports, after the target got it
            lambda: metric(second, "bridge_delay_published_total") == 1, "counted by the second"
        )
    finally:
        await client.close()
        for proc in (first, second):
            if proc.proc is not None and proc.proc.poll() is None:
                proc.terminate()
        await delay_cleanup(broker_url, s, [sink.exchange], [sink.queue])


async def test_two_directed_shards_with_the_same_index(chx_broker, tmp_path, unique):
    broker_url = chx_broker
    s = directed_settings(unique, shard_count=2)
    env = {
        **directed_env(s),
        "BRIDGE_DIRECTED__SHARD_COUNT": "2",
        "BRIDGE_DIRECTED__SHARD_INDEX": "1",
        "BRIDGE_DIRECTED__PULL_SHARDS_EXCHANGE": f"{unique}.directed.pull.shards",
    }
    first = process("first", ["directed"], broker_url, tmp_path, env)
    second = process("second", ["directed"], broker_url, tmp_path, env)
    own = f"{s.requests_queue}.shard-1"
    try:
        first.start()
        await asyncio.to_thread(first.wait_ready, DEADLINE)
        second.start()
        await refused(second, own, "shard 1 of 2 runs twice")
        conn = await aio_pika.connect_robust(broker_url)
        try:
            client = await DirectedClient(conn, s).open()
            await client.send(b"x", ["a", "b", "c", "d"], message_id="m1")
            await until(
                lambda: metric(first, "bridge_directed_requests_total") == 1, "applied by shard 1"
            )
            assert await asyncio.to_thread(metric, second, "bridge_directed_requests_total") == 0
            await client.close()
        finally:
            await conn.close()
        await asyncio.to_thread(first.kill9)
        await asyncio.to_thread(second.wait_ready, DEADLINE)
        assert len(refusals(second)) == 1
    finally:
        for proc in (first, second):
            if proc.proc is not None and proc.proc.poll() is None:
                proc.terminate()
        await directed_cleanup(broker_url, s)
        await delete_names(
            broker_url,
            [f"{unique}.directed.pull.shards"],
            [
                f"{q}.shard-{i}"
                for q in (s.requests_queue, s.pull_queue, s.control_queue)
                for i in range(2)
            ],
        )


async def test_second_gateway_with_the_same_instance(broker_url, tmp_path, unique):
    s = gateway_settings(unique)
    ports = {"first": free_port(), "second": free_port()}

    def gateway(name: str) -> WorkerProcess:
        return process(
            name,
            ["gateway"],
            broker_url,
            tmp_path,
            {
                **gateway_env(s),  # BRIDGE_GATEWAY__INSTANCE: the same for both
                "BRIDGE_GATEWAY__PORT": str(ports[name]),
                "BRIDGE_GATEWAY__PEERS": "false",
                "BRIDGE_GATEWAY__SERVER_TTL_S": "10",
            },
        )

    first, second = gateway("first"), gateway("second")
    server = BackendServer(broker_url, "s1", settings=s, heartbeat_s=SERVER_HEARTBEAT_S)
    try:
        first.start()
        await asyncio.to_thread(first.wait_ready, DEADLINE)
        await server.start()
        second.start()
        await refused(second, s.reply_queue, "BRIDGE_GATEWAY__INSTANCE")
        with pytest.raises(OSError):  # not listening: its clients could get no reply
            await GatewayClient.connect("127.0.0.1", ports["second"])
        client = await GatewayClient.connect("127.0.0.1", ports["first"])
        assert await client.request(b"one") == b"one"
        await client.bye()

        await asyncio.to_thread(first.kill9)
        await asyncio.to_thread(second.wait_ready, DEADLINE)
        client = await GatewayClient.connect("127.0.0.1", ports["second"])
        assert await client.request(b"two", timeout=30) == b"two"
        await client.bye()
        assert len(refusals(second)) == 1
    finally:
        await server.stop()
        for proc in (first, second):
            if proc.proc is not None and proc.proc.poll() is None:
                proc.terminate()
        await delete_names(
            broker_url,
            [s.servers_exchange],
            [s.undeliverable_queue, s.reply_queue, s.server_queue("s1")],
        )
