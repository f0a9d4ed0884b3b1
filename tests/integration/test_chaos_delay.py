"""The fast subset of the delay fault suite (``bench/chaos_delay.py``), run in every test run.

The same scenario code as ``python -m bench.chaos --workers delay``, shortened: a real
``bridge run delay`` process under load from producers with confirms (``x-delay``,
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

import json
import random

import pytest

from bench.chaos import parse_args, run_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_delay_fault_subset(broker_url, tmp_path, monkeypatch):
    monkeypatch.setenv("BRIDGE_AMQP_URL", broker_url)  # what bench.common.broker_url() reads
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
