"""The fast subset of the delay fault suite (``bench/chaos/delay/``), run in every test run.

The same scenario code as ``python -m bench.chaos --workers delay``, shortened: a real
``rabbitmq-bridge run delay`` process under load from producers with confirms (``x-delay``,
``x-deliver-at`` in the past and ahead, pairs replaced by ``x-delay-key``), five kill -9 at
seeded moments with restarts, then, through a TCP proxy, every connection dropped and
refused for a while, a short stall and a slow link. The ledger checks: nothing confirmed is
lost, nothing arrives early, a replaced message arrives only if it may have been in flight
when its replacement was stored, every duplicate carries its message_id and body and has a
reason the contract allows, the store is empty at the end, /readyz went false and came back
in the same process. No broker restart (tests share the broker) and no overload here; the
stall long enough for the heartbeat to notice is in the full suite.
"""

from __future__ import annotations

import asyncio
import json
import random
from urllib.parse import urlsplit

import pytest

from bench.chaos.suite import parse_args, run_worker
from bench.harness.procs import WorkerProcess
from bench.harness.proxy import TcpProxy
from tests.integration.delay.helpers import (
    cleanup,
    delay_settings,
    env_for,
    make_sink,
    wait_stored,
)
from workers.delay.client import DelayClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_delay_fault_subset(broker_url, tmp_path, monkeypatch):
    # what bench.harness.report.broker_url() reads
    monkeypatch.setenv("BRIDGE_AMQP_URL", broker_url)
    seed = random.randrange(1 << 30)
    print(f"seed={seed} (replay: python -m bench.chaos --workers delay --quick --seed {seed})")
    args = parse_args(
        [
            "--seed",
            str(seed),
            "--quick",
            "--workers",
            "delay",
            "--kills",
            "5",
            "--skip",
            "broker_restart,overload,stall_long",
        ]
    )
    report = await run_worker("delay", args, tmp_path)
    summary = {k: v for k, v in report.items() if k != "scenarios"}
    print(json.dumps(summary, indent=1))
    assert report["failures"] == [], report["failures"]
    assert report["kills"] == 5
    assert report["acknowledged"] > 0 and report["expected"] > 0
    assert report["lost"] == 0, report.get("lost_examples")
    assert report["duplicated"]["violations"] == 0, report["duplicated"]
    assert report["delivered"] == report["expected"]
    scenarios = report["scenarios"]
    for name in ("kill9", "broker_link"):
        assert scenarios[name]["early"] == 0
        assert scenarios[name]["store_empty_at_end"] is True
        assert scenarios[name]["pairs"] > 0
    link = scenarios["broker_link"]
    assert link["same_process"] is True
    cut = next(f for f in link["faults"] if f["kind"] == "cut")
    assert cut["went_down"] and cut["came_back"], cut
    assert report["reconnects"] >= 1
    assert report["ok"] is True


async def test_lane_survives_its_connection_dropped_as_stuck(broker_url, amqp, tmp_path, unique):
    """Found by the fault suite: when missed heartbeats make aiormq drop a lane's connection,
    the publishes waiting for a confirm fail with the reader's CancelledError. That ended the
    lane's thread ("lane crashed"), and the topics whose batch it held were never sent again
    until a restart. Now the batch is retried once the lane has reconnected."""
    s = delay_settings(unique, lanes=2, batch=20)
    parts = urlsplit(broker_url)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    proc = WorkerProcess(
        ["delay"],
        broker_url=proxy.url(parts.username or "guest", parts.password or "guest"),
        state_dir=tmp_path / "state",
        env={**env_for(s), "BRIDGE_HEARTBEAT_S": "1"},
        log=tmp_path / "worker.log",
    )
    sink = await make_sink(amqp, unique, "stuck")
    try:
        await asyncio.to_thread(proc.start().wait_ready)  # the proxy runs on this loop
        client = await DelayClient(amqp, s).open()
        ids = [f"s{i}" for i in range(40)]
        for mid in ids:  # due while the link is stalled: the lanes publish into the stall
            await client.send(mid.encode(), sink.exchange, delay_ms=1500, message_id=mid)
        await wait_stored(client, len(ids))
        proxy.stall()
        await asyncio.sleep(9)  # heartbeat 1 s: aiormq gives up after about 6 s
        proxy.resume()
        await sink.wait_for(len(ids), timeout=60)
        assert set(sink.ids()) == set(ids)
        log = proc.log.read_text()
        assert "was stuck" in log, "the stall must have dropped the connections"
        assert "lane crashed" not in log, log[-3000:]
        await wait_stored(client, 0, timeout=20)
        await client.close()
    finally:
        if proc.proc and proc.proc.poll() is None:
            await asyncio.to_thread(proc.terminate)  # it drains through the proxy
        await proxy.stop()
        await cleanup(broker_url, s, [sink.exchange], [sink.queue])
