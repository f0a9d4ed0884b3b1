"""``topics``: tenants that share one target exchange, a hot one with a burst, cold ones with
a message every 20 ms (``BRIDGE_DELAY__TOPIC_BY=header:x-tenant``).

Both variants run the same worker (8 lanes) and the same schedule: 50,000 messages of the hot
tenant due at one instant, 10 cold tenants with one message due every 20 ms from 1 s before
that instant. ``tenant_topics``: each message carries its tenant in ``x-tenant``, so each
tenant is a topic with its lane turns. ``one_topic``: every message carries the same value,
which is what ``TOPIC_BY=exchange`` gives tenants that share an exchange (one lane, one order).
Reported: the cold tenants' lateness end to end (consumer arrival minus due), of all and of
those due while the burst was sent, and the burst's drain time.
"""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path
from typing import Any

from bench.delay.isolation import burst_report
from bench.delay.lateness import run_schedule
from bench.harness.report import progress

TENANT = "x-tenant"


async def bench_topics(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    hot = 10_000 if args.quick else 50_000
    span_ms = 4_000 if args.quick else 10_000
    schedule: list[tuple[str, int]] = [("hot", 1000)] * hot
    for c in range(10):
        schedule += [(f"cold{c}", offset + c) for offset in range(0, span_ms + 1000, 20)]
    out: dict[str, Any] = {
        "hot_messages_due_at_once": hot,
        "cold_tenants": 10,
        "cold_interval_ms": 20,
        "cold_window_ms": [-1000, span_ms],
        "lanes": 8,
        "topic_by": f"header:{TENANT}",
    }
    variants = {
        "tenant_topics": lambda topic: {TENANT: topic},
        "one_topic": lambda topic: {TENANT: "shared"},
    }
    for name, headers in variants.items():
        progress(f"topics: {hot} hot due at once + 10 cold tenants, {name}")
        tag = f"bt-{uuid.uuid4().hex[:6]}"
        r = await run_schedule(
            tag=tag,
            state=tmp / tag,
            lanes=8,
            schedule=schedule,
            lead_ms=len(schedule) + 5000,  # stored at >= 1,000 msg/s before it falls due
            settle_s=120,
            groups=[["hot"], [f"cold{c}" for c in range(10)]],
            headers=headers,
            topic_by=f"header:{TENANT}",
        )
        out[name] = {**burst_report(r.pop("arrivals"), schedule), **r}
    isolated = out["tenant_topics"]["cold"]["p99_ms"]
    shared = out["one_topic"]["cold"]["p99_ms"]
    out["cold_p99_tenant_topics_better_x"] = (
        round(shared / isolated, 1) if shared and isolated else None
    )
    return out
