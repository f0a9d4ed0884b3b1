"""Benchmark of the ``directed`` worker against what a RabbitMQ user would do instead.

    python -m bench.directed            # full run (10,000 targets, 200 pullers; a few minutes)
    python -m bench.directed --quick    # smoke run, well under a minute

Prints one JSON object on stdout (progress on stderr). The worker runs as a subprocess
(``python -m bridge.cli run directed``, uvloop) against ``BRIDGE_AMQP_URL`` or the local broker,
with unique exchange and queue names that are deleted afterwards. Measured in one run:

1. ``fanout``: one 1 KiB message to T targets (envelope body): time from publish until the
   status query answers (applied in memory) and until a ``max: 0`` pull answers (that reply
   waits for the group commit, so it marks "committed"), the worker's own commit histogram,
   and SQLite bytes per extra target ((size of a T-target request - size of a 1-target
   request) / (T - 1), page counts after ``wal_checkpoint(TRUNCATE)``), for first-time
   targets and for a second message to the same targets;
2. ``pull``: T targets drained by P concurrent pullers spread over several client processes,
   for a quorum and a classic pull queue, plus an echo RPC server (same client, same broker,
   same reply sizes, no state) as the ceiling of request/reply over this broker and machine;
3. ``baseline``: one quorum queue per target (B targets) behind a fanout exchange, one 1 KiB
   message published once: broker memory and disk growth, and time until every queue has it.

CPU is shared with whatever else runs on the machine, so each figure is the median of
``--repeats`` runs and the machine's busy cores are reported next to it."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.directed.baseline import bench_baseline
from bench.directed.fanout import bench_fanout
from bench.directed.pull import bench_pulls
from bench.harness.broker import broker_info_cached
from bench.harness.report import emit, interpreter, machine, progress
from bench.harness.stats import rnd

GOAL_COMMIT_MS = 100.0
GOAL_PULLS_PER_S = 2500.0  # issue 11: at least 2,500 pulls/s
GOAL_WORKER_US_PER_PULL = 150.0  # and at most 150 us of worker CPU per pull
GOAL_BYTES_PER_TARGET = 64.0


def goals(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fan = result.get("fanout")
    if fan:
        kinds = ("first_time", "existing")
        commit = max(fan[k]["committed_ms_median"] for k in kinds)
        worker_commit = max(fan[k]["worker_commit_ms_median"] for k in kinds)
        per_target = max(fan[k]["bytes_per_extra_target_median"] for k in kinds)
        out["commit_10k_under_100ms"] = {
            "end_to_end_committed_ms": commit,
            "worker_transaction_ms": worker_commit,
            "met_end_to_end": commit < GOAL_COMMIT_MS,
            "met_worker_transaction": worker_commit < GOAL_COMMIT_MS,
        }
        out["bytes_per_extra_target_under_64"] = {
            "worst_of_first_time_and_existing": per_target,
            "met": per_target < GOAL_BYTES_PER_TARGET,
        }
        base = result.get("baseline", {})
        if "message_disk_bytes_per_target_min" in base:
            least = base["message_disk_bytes_per_target_min"]
            out["bytes_per_extra_target_under_64"].update(
                {
                    "baseline_disk_bytes_per_target_per_message": least,
                    "baseline_at_least_content_size": least >= result["config"]["body_bytes"],
                }
            )
    if result.get("pull"):
        pulls = {q: r["pulls_per_s_median"] for q, r in result["pull"].items()}
        out["pulls_at_least_2500_per_s"] = {
            "pulls_per_s": pulls,
            "met": {q: v >= GOAL_PULLS_PER_S for q, v in pulls.items()},
        }
        worker_us = {
            q: round(r["cpu_ms_per_pull_median"]["worker"] * 1000, 1)
            for q, r in result["pull"].items()
            if "worker" in r.get("cpu_ms_per_pull_median", {})
        }
        out["worker_cpu_at_most_150_us_per_pull"] = {
            "worker_us_per_pull": worker_us,
            "met": {q: v <= GOAL_WORKER_US_PER_PULL for q, v in worker_us.items()},
        }
    return out


def comparison(fan: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    existing = fan["existing"]["bytes_per_extra_target_median"]
    return {
        "directed_bytes_per_extra_target_existing": existing,
        "directed_bytes_per_extra_target_first_time": fan["first_time"][
            "bytes_per_extra_target_median"
        ],
        "baseline_disk_bytes_per_target_per_message_min": base["message_disk_bytes_per_target_min"],
        "baseline_disk_bytes_per_target_per_message_median": base[
            "message_disk_bytes_per_target_median"
        ],
        "baseline_memory_bytes_per_target_per_message_median": base[
            "message_memory_erlang_bytes_per_target_median"
        ],
        "baseline_queue_dir_bytes_per_target": base["queue_dirs_bytes_per_queue"],
        "baseline_queue_memory_bytes_per_target": base["queue_memory_erlang_bytes_per_target"],
        "disk_ratio_baseline_to_directed_per_message": rnd(
            base["message_disk_bytes_per_target_min"] / max(existing, 1e-9), 1
        ),
        "directed_committed_ms": fan["existing"]["committed_ms_median"],
        "directed_targets": fan["targets"],
        "baseline_publish_confirm_ms": base["publish_confirm_ms_median"],
        "baseline_all_queues_have_it_ms": base["all_queues_have_it_ms_median"],
        "baseline_targets": base["targets"],
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-directed-"))
    info = broker_info_cached()
    result: dict[str, Any] = {
        "bench": "directed",
        "command": "python -m bench.directed " + " ".join(sys.argv[1:]),
        "config": {
            "targets": args.targets,
            "pullers": args.pullers,
            "pull_processes": args.pull_procs,
            "messages_per_target": args.messages,
            "pull_max": args.max,
            "body_bytes": args.body_bytes,
            "baseline_targets": args.baseline_targets,
            "repeats": args.repeats,
            "queue_types": args.queue_types,
            "phases": args.phases,
            "quick": args.quick,
            "worker": "python -m bridge.cli run directed (subprocess, uvloop, "
            f"synchronous={args.synchronous}, defaults otherwise)",
        },
        "environment": {
            "cpus": os.cpu_count(),
            "python": interpreter(),
            "machine": machine(),
            "rabbitmq": info.get("version") if info else None,
            "loadavg_start": os.getloadavg(),
        },
    }
    try:
        if "fanout" in args.phases:
            progress(f"fan-out: 1 message to {args.targets} targets, {args.repeats} repeats")
            result["fanout"] = await bench_fanout(args, root)
        if "pull" in args.phases:
            progress(
                f"pull: {args.targets} targets, {args.pullers} pullers in {args.pull_procs} "
                f"processes, pull queues {args.queue_types}, each round next to an echo server"
            )
            result["pull"] = await bench_pulls(args, root)
        if "baseline" in args.phases:
            progress(f"baseline: {args.baseline_targets} quorum queues behind a fanout exchange")
            result["baseline"] = await bench_baseline(args)
        base = result.get("baseline", {})
        if "fanout" in result and "message_disk_bytes_per_target_min" in base:
            result["comparison"] = comparison(result["fanout"], base)
        result["goals"] = goals(result)
    finally:
        result["environment"]["loadavg_end"] = os.getloadavg()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            result["environment"]["state_dir"] = str(root)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.directed",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--targets", type=int, default=10_000, help="targets per request")
    parser.add_argument("--pullers", type=int, default=200, help="concurrent pullers in all")
    parser.add_argument("--pull-procs", type=int, default=2, help="client processes for pulls")
    parser.add_argument("--messages", type=int, default=10, help="messages per target to pull")
    parser.add_argument("--max", type=int, default=5, help="max of each pull")
    parser.add_argument("--body-bytes", type=int, default=1024)
    parser.add_argument("--baseline-targets", type=int, default=1000)
    parser.add_argument("--baseline-messages", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    parser.add_argument(
        "--queue-types", default="quorum,classic", help="pull queue types to measure"
    )
    parser.add_argument(
        "--phases", default="fanout,pull,baseline", help="which parts to run (default: all)"
    )
    parser.add_argument(
        "--synchronous",
        default="FULL",
        choices=["FULL", "NORMAL"],
        help="the worker's SQLite fsync policy (BRIDGE_DIRECTED__SYNCHRONOUS)",
    )
    parser.add_argument("--quick", action="store_true", help="small smoke run (< 30 s)")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the worker; adds top frames to the JSON"
    )
    parser.add_argument("--keep", action="store_true", help="keep the state directory")
    parser.add_argument(
        "--against",
        type=Path,
        default=None,
        help="also run the pull rounds with the worker of this checkout (e.g. a git worktree "
        "of the commit before a change), interleaved, and report the ratios",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.targets = min(args.targets, 500)
        args.pullers = min(args.pullers, 20)
        args.messages = min(args.messages, 4)
        args.max = min(args.max, 2)
        args.baseline_targets = min(args.baseline_targets, 30)
        args.baseline_messages = 1
        args.repeats = 1
    args.queue_types = [q for q in args.queue_types.split(",") if q]
    args.phases = [p for p in args.phases.split(",") if p]
    unknown = set(args.phases) - {"fanout", "pull", "baseline"}
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}: use fanout, pull, baseline")
    if args.targets < 2:
        parser.error("--targets must be at least 2")
    return args


def run() -> None:
    args = parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    emit(asyncio.run(main(args)))


if __name__ == "__main__":
    run()
