"""``isolation``: a burst due at one instant on one hot topic while cold topics each have a
message due every 20 ms around it; cold-topic lateness, 8 vs. 1 lane."""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path
from typing import Any

from bench.delay.lateness import run_schedule
from bench.delay.traffic import Arrivals
from bench.delay.worker import summary
from bench.harness.report import progress


async def bench_isolation(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    hot = 10_000 if args.quick else 100_000
    span_ms = 4_000 if args.quick else 20_000  # cold messages from -1 s to +span
    schedule: list[tuple[str, int]] = [("hot", 1000)] * hot
    for c in range(10):
        schedule += [(f"cold{c}", offset + c) for offset in range(0, span_ms + 1000, 20)]
    out: dict[str, Any] = {
        "hot_messages_due_at_once": hot,
        "cold_topics": 10,
        "cold_interval_ms": 20,
        "cold_window_ms": [-1000, span_ms],
    }
    # The same worker with 8 lanes and with 1 lane (batch 500: topics still take turns);
    # and, for reference, 1 lane whose batch holds the whole burst: a single dispatcher that
    # sends everything due in due order, the design the seed improves on.
    variants = [("lanes_8", 8, 500), ("lanes_1", 1, 500), ("single_fifo_dispatcher", 1, 100_000)]
    for name, lanes, batch in variants:
        progress(f"isolation: {hot} hot due at once + 10 cold topics, {name}")
        tag = f"bi{lanes}-{uuid.uuid4().hex[:6]}"
        r = await run_schedule(
            tag=tag,
            state=tmp / tag,
            lanes=lanes,
            schedule=schedule,
            lead_ms=int(len(schedule) / 2.5) + 3000,
            settle_s=120,
            batch=batch,
            groups=[["hot"], [f"cold{c}" for c in range(10)]],
        )
        out[name] = {
            "lanes": lanes,
            "batch": batch,
            **burst_report(r.pop("arrivals"), schedule),
            **r,
        }
    eight = out["lanes_8"]["cold"]["p99_ms"]
    for name, _, _ in variants[1:]:
        other = out[name]["cold"]["p99_ms"]
        out[f"cold_p99_8_lanes_better_than_{name}_x"] = (
            round(other / eight, 1) if other and eight else None
        )
    out["goals"] = {
        "cold_p99_ms_below": 100,
        "improvement_at_least": 10,
        # The design the seed improves on is one sending thread that a burst due at one
        # instant occupies: LANES=1 with the burst as one batch. LANES=1 with BATCH 500
        # already takes per-topic turns (the seed's idea on one thread); reported beside it.
        "improvement_baseline": "single_fifo_dispatcher",
    }
    single = out.get("cold_p99_8_lanes_better_than_single_fifo_dispatcher_x")
    out["goals_met"] = {
        "cold_p99": eight is not None and eight < 100,
        "improvement_vs_single_dispatcher": single is not None and single >= 10,
        "improvement_vs_one_lane_with_turns": (
            out.get("cold_p99_8_lanes_better_than_lanes_1_x") or 0
        )
        >= 10,
    }
    return out


def burst_report(
    arrivals: Arrivals, schedule: list[tuple[str, int]], burst_at: int = 1000
) -> dict[str, Any]:
    """Cold-topic lateness (all, and of those due while the hot burst due at ``burst_at`` was
    being sent) and how long the burst took to drain."""
    cold = [v for m, v in arrivals.late.items() if not m.startswith("hot-")]
    hot_late = [v for m, v in arrivals.late.items() if m.startswith("hot-")]
    burst_end = max(hot_late) if hot_late else 0
    during = [
        v
        for m, v in arrivals.late.items()
        if not m.startswith("hot-") and 0 <= _offset(m, schedule) - burst_at <= burst_end
    ]
    # the latest cold messages, with when they were due (ms after the burst's due time):
    # a stall of the worker or the broker shows as a run of neighbouring due times
    worst = sorted(
        (
            (round(v, 1), _offset(m, schedule) - burst_at)
            for m, v in arrivals.late.items()
            if not m.startswith("hot-")
        ),
        reverse=True,
    )[:10]
    return {
        "cold": summary(cold),
        "cold_due_during_burst": summary(during),
        "hot_burst_drained_ms": round(burst_end, 0),
        "cold_latest_ms_and_due_after_burst_ms": worst,
    }


def _offset(message_id: str, schedule: list[tuple[str, int]]) -> int:
    return schedule[int(message_id.rsplit("-", 1)[1])][1]
