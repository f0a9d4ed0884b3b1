"""The first hour of an operator, through the installed ``rabbitmq-bridge`` command: invalid
and misspelled settings, client commands without a worker, ports in use, a wrong virtual host,
the ``ready`` line and ``--version``."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import aio_pika
import pytest

from bench.harness.procs import WorkerProcess, free_port
from bridge.amqp.link import Link
from bridge.errors import BrokerUnavailable
from tests.conftest import delete_names
from tests.integration.delay import helpers as delay_helpers
from tests.integration.directed import helpers as directed_helpers

pytestmark = pytest.mark.integration

COMMAND = Path(sys.executable).parent / "rabbitmq-bridge"


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    return subprocess.run(
        [str(COMMAND), *args],
        env={**clean, "BRIDGE_LOG_FORMAT": "text", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wrong_url(vhost: str = "") -> str:
    return f"amqp://guest:guest@127.0.0.1:{free_port()}/{vhost}"  # nothing listens there


@pytest.mark.parametrize(
    ("variable", "value", "worker"),
    [
        ("BRIDGE_DIRECTED__QUEUE_LIMIT", "abc", "directed"),
        ("BRIDGE_DIRECTED__QUEUE_LIMIT", "-3", "directed"),
        ("BRIDGE_DIRECTED__OVERFLOW", "dropit", "directed"),
        ("BRIDGE_GATEWAY__PORT", "99999", "gateway"),
        ("BRIDGE_DELAY__LANES", "0", "delay"),
        ("BRIDGE_LOG_LEVEL", "LOUD", "directed"),
    ],
)
def test_check_and_run_refuse_an_invalid_setting_in_one_line(tmp_path, variable, value, worker):
    env = {variable: value, "BRIDGE_STATE_DIR": str(tmp_path), "BRIDGE_AMQP_URL": wrong_url()}
    check = run_cli("check", env=env)
    assert check.returncode == 2, check.stdout + check.stderr
    lines = [line for line in check.stdout.splitlines() if line.startswith("FAIL")]
    assert len(lines) == 1 and f"{variable}={value}: " in lines[0], check.stdout
    run = run_cli("run", worker, env=env)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.splitlines() == [
        f"rabbitmq-bridge: configuration error: {lines[0].split(maxsplit=2)[2]}"
    ]
    assert "Traceback" not in run.stdout + run.stderr


def test_check_finds_what_a_worker_refuses_to_be_built_with(tmp_path):
    env = {
        "BRIDGE_DIRECTED__SHARD_COUNT": "3",
        "HOSTNAME": "laptop",  # no StatefulSet ordinal, no SHARD_INDEX
        "BRIDGE_STATE_DIR": str(tmp_path),
        "BRIDGE_AMQP_URL": wrong_url(),
    }
    expected = "directed: shard_count is 3 but no shard index: set BRIDGE_DIRECTED__SHARD_INDEX"
    check = run_cli("check", env=env)
    assert check.returncode == 2 and expected in check.stdout, check.stdout
    run = run_cli("run", "directed", env=env)
    assert run.returncode == 2 and expected in run.stderr, run.stderr
    assert "broker" not in run.stdout + run.stderr


def test_every_problem_of_every_worker_is_listed(tmp_path):
    env = {
        "BRIDGE_DIRECTED__QUEUE_LIMIT": "abc",
        "BRIDGE_DELAY__LANES": "0",
        "BRIDGE_LOG_LEVEL": "LOUD",
        "BRIDGE_STATE_DIR": str(tmp_path),
    }
    run = run_cli("run", "all", env=env)
    assert run.returncode == 2
    names = sorted(line.split(": ")[2].split("=")[0] for line in run.stderr.splitlines())
    assert names == ["BRIDGE_DELAY__LANES", "BRIDGE_DIRECTED__QUEUE_LIMIT", "BRIDGE_LOG_LEVEL"]


def test_misspelled_setting_is_named_with_the_closest_valid_one(tmp_path):
    env = {
        "BRIDGE_DIRECTED__QUEUE_LIMT": "10",
        "BRIDGE_STATE_DIR": str(tmp_path),
        "BRIDGE_AMQP_URL": wrong_url(),
        # what Kubernetes sets for a Service named bridge-delay: not a misspelling
        "BRIDGE_DELAY_PORT": "tcp://10.0.0.7:9100",
        "BRIDGE_DELAY_SERVICE_HOST": "10.0.0.7",
    }
    check = run_cli("check", env=env)
    assert check.returncode == 1  # the broker is unreachable; a warning alone does not fail
    warnings = [line for line in check.stdout.splitlines() if line.startswith("warn")]
    assert warnings == [
        "warn settings   BRIDGE_DIRECTED__QUEUE_LIMT is not a setting of this program and is "
        "ignored; did you mean BRIDGE_DIRECTED__QUEUE_LIMIT?"
    ]


def test_worker_logs_misspelled_settings_and_one_ready_line(broker_url, tmp_path, unique):
    s = directed_helpers.directed_settings(unique)
    log = tmp_path / "worker.log"
    proc = WorkerProcess(
        ["directed"],
        broker_url=broker_url,
        state_dir=tmp_path,
        env={**directed_helpers.env_for(s), "BRIDGE_DIRECTED__OVERFLOWW": "reject"},
        log=log,
    )
    proc.start()
    try:
        proc.wait_ready()
        text = log.read_text()
    finally:
        proc.terminate()
        asyncio.run(directed_helpers.cleanup(broker_url, s))
    assert (
        "BRIDGE_DIRECTED__OVERFLOWW is not a setting of this program and is ignored; "
        "did you mean BRIDGE_DIRECTED__OVERFLOW?"
    ) in text
    ready = [line for line in text.splitlines() if "bridge.host: ready " in line]
    assert len(ready) == 1, text
    assert f"worker=directed http=127.0.0.1:{proc.port} " in ready[0]
    assert f"consumes={s.requests_queue}, {s.pull_queue}, {s.control_queue}" in ready[0]


def test_version():
    out = run_cli("--version", env={})
    assert out.returncode == 0
    assert out.stdout.strip() == f"rabbitmq-bridge {version('rabbitmq-bridge-workers')}"


async def _queue_depth(amqp, name: str) -> int:
    channel = await amqp.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await channel.close()


async def _control_queue(amqp, exchange: str, queue: str) -> None:
    """What a worker that once ran leaves behind: its control (or pull) exchange and queue,
    bound so that every request reaches the queue (a request routed nowhere comes back)."""
    channel = await amqp.channel()
    ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC)
    q = await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
    await q.bind(ex, routing_key="#")
    await channel.close()


@pytest.mark.parametrize(
    ("worker", "args", "exchange"),
    [
        ("directed", ["directed", "status", "m1"], "control_exchange"),
        ("directed", ["directed", "pull", "node-1"], "pull_exchange"),
        ("delay", ["delay", "counts"], "control_exchange"),
    ],
)
async def test_client_command_without_worker_says_so_and_its_request_expires(
    broker_url, amqp, tmp_path, unique, worker, args, exchange
):
    if worker == "directed":
        s = directed_helpers.directed_settings(unique)
        env = directed_helpers.env_for(s)
        queue = s.control_queue if exchange == "control_exchange" else s.pull_queue
    else:
        s = delay_helpers.delay_settings(unique)
        env = delay_helpers.env_for(s)
        queue = s.control_queue
    name = getattr(s, exchange)
    await _control_queue(amqp, name, queue)
    try:
        out = await asyncio.to_thread(
            run_cli,
            *args,
            "--timeout",
            "0.5",
            env={**env, "BRIDGE_AMQP_URL": broker_url, "BRIDGE_STATE_DIR": str(tmp_path)},
        )
        assert out.returncode == 1
        assert out.stderr.splitlines() == [
            f"rabbitmq-bridge: no {worker} worker answered on {name} within 0.5 s: "
            f'is "rabbitmq-bridge run {worker}" running?'
        ]
        # the request expired with its caller: a worker starting now finds nothing to answer
        depth = await _queue_depth(amqp, queue)
        for _ in range(200):
            if depth == 0:
                break
            await asyncio.sleep(0.05)
            depth = await _queue_depth(amqp, queue)
        assert depth == 0
    finally:
        await delete_names(broker_url, [name], [queue])


@pytest.mark.parametrize(
    ("worker", "args"),
    [
        ("directed", ["directed", "send", "--to", "node-1", "hi"]),
        ("delay", ["delay", "send", "--to", "amq.topic", "--delay-ms", "5", "hi"]),
    ],
)
def test_send_before_the_worker_ever_ran_says_so(broker_url, tmp_path, unique, worker, args):
    if worker == "directed":
        s = directed_helpers.directed_settings(unique)
        env, exchange = directed_helpers.env_for(s), s.requests_exchange
    else:
        d = delay_helpers.delay_settings(unique)
        env, exchange = delay_helpers.env_for(d), d.in_exchange
    out = run_cli(
        *args, env={**env, "BRIDGE_AMQP_URL": broker_url, "BRIDGE_STATE_DIR": str(tmp_path)}
    )
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        f"rabbitmq-bridge: exchange {exchange} does not exist: the {worker} worker declares it "
        f'when it starts; has "rabbitmq-bridge run {worker}" run against this broker and vhost, '
        f"with the same BRIDGE_{worker.upper()}__* names?"
    ]


async def test_delay_send_refuses_what_the_worker_would_dead_letter(
    broker_url, amqp, tmp_path, unique
):
    s = delay_helpers.delay_settings(unique)
    channel = await amqp.channel()
    ex = await channel.declare_exchange(s.in_exchange, aio_pika.ExchangeType.TOPIC)
    q = await channel.declare_queue(f"{unique}.probe", auto_delete=True)
    await q.bind(ex, routing_key="#")
    env = {
        **delay_helpers.env_for(s),
        "BRIDGE_AMQP_URL": broker_url,
        "BRIDGE_STATE_DIR": str(tmp_path),
        "BRIDGE_DELAY__HORIZON_MS": "60000",
    }
    try:
        for extra, reason in [
            (["--to", "amq.topic", "--delay-ms", "60001"], "beyond_horizon"),
            (["--delay-ms", "5"], "missing_target"),
        ]:
            out = await asyncio.to_thread(run_cli, "delay", "send", *extra, "hi", env=env)
            assert out.returncode == 2, out.stdout + out.stderr
            assert out.stdout == ""
            assert out.stderr.startswith(
                f"rabbitmq-bridge: the delay worker would refuse this ({reason}): "
            )
        assert await _queue_depth(amqp, q.name) == 0
        ok = await asyncio.to_thread(
            run_cli, "delay", "send", "--to", "amq.topic", "--delay-ms", "5", "hi", env=env
        )
        assert ok.returncode == 0 and '"sent": true' in ok.stdout
    finally:
        await channel.close()
        await delete_names(broker_url, [s.in_exchange], [])


@pytest.mark.parametrize("taken", ["http", "gateway"])
def test_port_in_use_is_found_before_the_broker(tmp_path, taken):
    http_port, gateway_port = free_port(), free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", http_port if taken == "http" else gateway_port))
        holder.listen()
        env = {
            # nothing listens there: a process that tried the broker first would retry forever
            "BRIDGE_AMQP_URL": wrong_url(),
            "BRIDGE_STATE_DIR": str(tmp_path),
            "BRIDGE_HTTP_HOST": "127.0.0.1",
            "BRIDGE_HTTP_PORT": str(http_port),
            "BRIDGE_GATEWAY__HOST": "127.0.0.1",
            "BRIDGE_GATEWAY__PORT": str(gateway_port),
        }
        out = run_cli("run", "gateway", env=env, timeout=30)
    variable, port = (
        ("BRIDGE_HTTP_PORT", http_port)
        if taken == "http"
        else ("BRIDGE_GATEWAY__PORT", gateway_port)
    )
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"rabbitmq-bridge: configuration error: {variable}={port}: cannot listen on "
        f"127.0.0.1:{port} (Address already in use); stop what listens there or choose "
        "another port"
    ]
    assert "broker" not in out.stdout + out.stderr


def test_one_port_named_twice_is_found_before_the_broker(tmp_path):
    port = str(free_port())
    env = {
        "BRIDGE_AMQP_URL": wrong_url(),
        "BRIDGE_STATE_DIR": str(tmp_path),
        "BRIDGE_HTTP_PORT": port,
        "BRIDGE_GATEWAY__PORT": port,
    }
    out = run_cli("run", "gateway", env=env, timeout=30)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"rabbitmq-bridge: configuration error: BRIDGE_GATEWAY__PORT={port}: the same port as "
        "BRIDGE_HTTP_PORT"
    ]


VHOST_MESSAGE = (
    "refused virtual host 'no-such-vhost': it does not exist or user 'guest' has no access to it"
)


def test_check_names_a_wrong_virtual_host(broker_url, tmp_path):
    url = broker_url.rstrip("/") + "/no-such-vhost"
    out = run_cli("check", env={"BRIDGE_AMQP_URL": url, "BRIDGE_STATE_DIR": str(tmp_path)})
    assert out.returncode == 1
    broker = [line for line in out.stdout.splitlines() if line.startswith("FAIL broker")]
    assert len(broker) == 1 and VHOST_MESSAGE in broker[0], out.stdout
    assert "InvalidFrameError" not in out.stdout


async def test_data_path_link_names_a_wrong_virtual_host(broker_url):
    link = Link(broker_url.rstrip("/") + "/no-such-vhost", name="vhost-probe")
    with pytest.raises(BrokerUnavailable) as info:
        await link.start()
    assert VHOST_MESSAGE in str(info.value)


async def test_delay_try_it_delivers_to_a_watch_and_logs_dead_letters_per_interval(
    broker_url, amqp, tmp_path, unique
):
    """docs/delay.md's first example, with a watch as the docs say; then messages nobody can
    receive: dead-lettered, and logged as a few counted lines, not one per message."""
    s = delay_helpers.delay_settings(unique)
    env = {
        **delay_helpers.env_for(s),
        "BRIDGE_AMQP_URL": broker_url,
        "BRIDGE_STATE_DIR": str(tmp_path),
    }
    log = tmp_path / "worker.log"
    worker = WorkerProcess(["delay"], broker_url=broker_url, state_dir=tmp_path, env=env, log=log)
    worker.start()
    watch = None
    try:
        worker.wait_ready()
        watch = await asyncio.to_thread(
            subprocess.Popen,
            [str(COMMAND), "delay", "watch", "amq.topic", f"{unique}.#", "--count", "1"],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert watch.stderr is not None
        assert watch.stderr.readline().startswith("watching amq.topic")  # bound from now on
        sent = await asyncio.to_thread(
            run_cli,
            "delay",
            "send",
            "--to",
            "amq.topic",
            "--routing-key",
            f"{unique}.a",
            "--delay-ms",
            "200",
            "hello",
            env=env,
        )
        assert sent.returncode == 0, sent.stderr
        out, _ = await asyncio.to_thread(watch.communicate, timeout=60)
        assert watch.returncode == 0
        assert f'"routing_key": "{unique}.a"' in out and '"body": "hello"' in out

        total = 100
        client = await delay_helpers.DelayClient(amqp, s).open()
        try:
            for i in range(total):
                await client.send(b"x", "amq.topic", delay_ms=0, routing_key=f"{unique}.nobody.{i}")
        finally:
            await client.close()
        dead = await delay_helpers.dead_letters(amqp, s, total, timeout=60)
        assert len(dead) == total
    finally:
        if watch is not None and watch.poll() is None:
            watch.kill()
        assert worker.terminate() == 0
        await delay_helpers.cleanup(broker_url, s, [], [])
    lines = [
        line
        for line in log.read_text().splitlines()
        if "due messages dead-lettered instead of delivered" in line
    ]
    assert lines and all("reason=unroutable target=amq.topic" in line for line in lines), lines
    assert sum(int(line.split(" count=")[1].split()[0]) for line in lines) == total
    assert len(lines) < total / 10  # counted, not one line per message
