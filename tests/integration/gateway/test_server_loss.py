"""BRIDGE_GATEWAY__ON_SERVER_LOSS: the clients of a server that dies (a real echo-server
process killed with -9, so it misses its heartbeats) or deregisters are moved to a live
server (connect with x-moved-from) or closed (ERROR server_gone)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bench.harness.procs import settings_env
from tests.integration.gateway.helpers import (
    Gateway,
    gateway_settings,
    read_to_eof,
    running_gateway,
    wait_until,
)
from workers.gateway.client import GatewayError
from workers.gateway.config import GatewaySettings


@contextmanager
def echo_server_process(
    broker_url: str, s: GatewaySettings, server_id: str, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "BRIDGE_AMQP_URL": broker_url,
        **settings_env("gateway", s, ["servers_exchange", "server_queue_prefix"]),
    }
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bridge.cli",
                "gateway",
                "echo-server",
                "--id",
                server_id,
                "--heartbeat-s",
                "0.2",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def kill9(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


async def attach_clients(gw: Gateway) -> tuple[object, asyncio.StreamReader, asyncio.StreamWriter]:
    framed = await gw.connect(client_id="moving")
    assert framed.server == "dying"
    assert await framed.request(b"before") == b"before"
    r, w = await asyncio.open_connection("127.0.0.1", gw.worker.ports["lines"])
    w.write(b"before\n")
    assert await r.readline() == b"before\n"
    return framed, r, w


LISTENERS = [{"port": 0, "framing": "frames"}, {"port": 0, "framing": "lines"}]


@pytest.mark.parametrize("how", ["kill -9", "deregister"])
async def test_move_reassigns_the_clients_of_a_lost_server(broker_url, tmp_path, unique, how):
    s = gateway_settings(unique, listeners=LISTENERS)  # on_server_loss: move, the default
    async with running_gateway(broker_url, tmp_path, s, servers=()) as gw:
        with echo_server_process(broker_url, s, "dying", tmp_path / "dying.log") as proc:
            await wait_until(lambda: gw.worker.balancer.is_alive("dying"), "dying alive", 30)
            framed, r, w = await attach_clients(gw)
            heir = await gw.start_server("heir")
            if how == "kill -9":
                kill9(proc)
            else:
                proc.send_signal(signal.SIGTERM)  # the echo server deregisters and leaves
            await wait_until(
                lambda: len([e for e in heir.events if e.event == "connect"]) == 2, "moved", 15
            )
            connects = [e for e in heir.events if e.event == "connect"]
            assert {e.headers.get("x-moved-from") for e in connects} == {"dying"}
            assert {e.session for e in connects} == set(gw.worker.sessions)
            # the same connections go on, now with the heir
            assert await framed.request(b"after") == b"after"  # type: ignore[attr-defined]
            w.write(b"after\n")
            assert await r.readline() == b"after\n"
            assert [e.body for e in heir.events if e.event == "data"].count(b"after") == 2
            assert gw.metric("bridge_gateway_server_loss_total", action="moved") == 2
            assert gw.admin("sticky/moving")["server"] == "heir"
            w.close()


async def test_close_ends_the_clients_of_a_killed_server(broker_url, tmp_path, unique):
    s = gateway_settings(unique, listeners=LISTENERS, on_server_loss="close")
    async with running_gateway(broker_url, tmp_path, s, servers=()) as gw:
        with echo_server_process(broker_url, s, "dying", tmp_path / "dying.log") as proc:
            await wait_until(lambda: gw.worker.balancer.is_alive("dying"), "dying alive", 30)
            framed, r, w = await attach_clients(gw)
            await gw.start_server("heir")
            kill9(proc)
            with pytest.raises(GatewayError) as info:
                await asyncio.wait_for(framed.recv(), 15)  # type: ignore[attr-defined]
            assert info.value.code == "server_gone"
            assert await asyncio.wait_for(read_to_eof(r), 15) == b""
            w.close()
            assert gw.metric("bridge_gateway_server_loss_total", action="closed") == 2
            assert gw.metric("bridge_gateway_closed_total", reason="server_gone") == 2
            assert not [e for e in gw.servers["heir"].events if e.event == "connect"]
