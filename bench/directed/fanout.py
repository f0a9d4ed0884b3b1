"""Fan-out: one message to T targets, time until applied and committed, SQLite bytes per target."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
from pathlib import Path
from typing import Any

from bench.directed.worker import Directed, db_size, ms
from bench.harness.cpu import rss_bytes
from bench.harness.profiler import Profiler
from bench.harness.report import progress
from bench.harness.stats import histogram_delta, median, rnd
from workers.directed.client import HEADER_TARGET_LIMIT


async def bench_fanout(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    body = os.urandom(args.body_bytes)
    runs: dict[str, list[dict[str, Any]]] = {"first_time": [], "existing": []}
    rss_per_target: list[float] = []
    profile: dict[str, Any] | None = None
    async with Directed(root, "quorum", args.synchronous) as d:
        worker_pid = d.worker.pid
        profiler = (
            Profiler(worker_pid, root / "fanout.pyspy.txt", rate=1000) if args.profile else None
        )
        for rep in range(args.repeats):
            targets = [f"fan{rep}-{i:06d}" for i in range(args.targets)]
            single = [f"one{rep}-000000"]
            size = await asyncio.to_thread(db_size, d.db_path)
            for kind in ("first_time", "existing"):
                await d.send_committed(body, single, f"{d.token}-{kind}-{rep}-1")
                size_1 = await asyncio.to_thread(db_size, d.db_path)
                rss0 = rss_bytes(worker_pid)
                before = await d.metrics()
                timing = await d.send_committed(body, targets, f"{d.token}-{kind}-{rep}-n")
                after = await d.metrics()
                rss1 = rss_bytes(worker_pid)
                size_n = await asyncio.to_thread(db_size, d.db_path)
                if kind == "first_time":
                    rss_per_target.append((rss1 - rss0) / len(targets))
                commits = histogram_delta(before, after, "bridge_directed_commit_seconds")
                grow_1 = size_1["used_bytes"] - size["used_bytes"]
                grow_n = size_n["used_bytes"] - size_1["used_bytes"]
                tables = {
                    t: size_n["tables"].get(t, 0) - size_1["tables"].get(t, 0)
                    for t in size_n["tables"]
                    if size_n["tables"].get(t, 0) != size_1["tables"].get(t, 0)
                }
                run = {
                    **timing,
                    "worker_commits": commits["count"],
                    "worker_commit_ms": ms(commits["sum"]),
                    "bytes_1_target": grow_1,
                    "bytes_n_targets": grow_n,
                    "bytes_per_extra_target": rnd((grow_n - grow_1) / (len(targets) - 1)),
                    "table_growth_bytes": tables,
                }
                runs[kind].append(run)
                progress(f"fanout rep {rep} {kind}: {run}")
                size = size_n
        if profiler is not None:
            profile = profiler.stop()
        final = await asyncio.to_thread(db_size, d.db_path)

    def summary(items: list[dict[str, Any]]) -> dict[str, Any]:
        keys = (
            "publish_confirm_ms",
            "applied_ms",
            "committed_ms",
            "worker_commit_ms",
            "bytes_per_extra_target",
            "last_status_rtt_ms",
        )
        return {
            **{f"{k}_median": rnd(median(r[k] for r in items)) for k in keys},
            "runs": items,
        }

    names = [f"fan0-{i:06d}" for i in range(args.targets)]
    envelope = {
        "targets": names,
        "body": base64.b64encode(body).decode(),
        "content_type": None,
        "headers": {},
    }
    out: dict[str, Any] = {
        "targets": args.targets,
        "body_bytes": args.body_bytes,
        "target_name_bytes": len(names[-1]),
        "request_format": "envelope body" if args.targets > HEADER_TARGET_LIMIT else "x-targets",
        "request_bytes_on_the_wire": len(json.dumps(envelope).encode()),
        "first_time": summary(runs["first_time"]),
        "existing": summary(runs["existing"]),
        "worker_rss_growth_per_new_target_bytes": rnd(median(rss_per_target)),
        "db_final": final,
        "notes": [
            "applied_ms: publish until the status query answers (the core has the request; "
            "the worker answers status before the commit), polled back to back, so the "
            "granularity is one status round trip (last_status_rtt_ms)",
            "committed_ms: publish until a max=0 pull sent after that answers; pull replies "
            "wait for the group commit, so this is end to end until durable "
            "(synchronous=FULL)",
            "worker_commit_ms: sum of bridge_directed_commit_seconds observed during the "
            "request (the SQLite transaction on the writer thread)",
            "bytes: SQLite (page_count - freelist_count) * page_size after "
            "wal_checkpoint(TRUNCATE); per extra target = (growth of the N-target request - "
            "growth of a 1-target request) / (N - 1)",
        ],
    }
    if profile is not None:
        out["profile"] = profile
    return out
