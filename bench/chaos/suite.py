"""The fault suite's runner: the registry of scenario modules, one worker after another, the
summary (see :mod:`bench.chaos`)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import logging
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.chaos.harness import Harness
from bench.harness.report import broker_url, emit, progress

# One line per worker: the module whose ``run(h)`` drives that worker's fault scenarios.
SCENARIOS: dict[str, str] = {
    "directed": "bench.chaos.directed.scenarios",
    "gateway": "bench.chaos.gateway",
    "delay": "bench.chaos.delay.scenarios",
}

DESCRIPTION = (
    "Fault suite: kill -9, broker link faults, broker restart and overload against real worker "
    "processes, checked against ledgers kept by the suite's producers and consumers."
)

ALL_WORKERS = ("directed", "delay", "gateway")


COUNTERS = ("sent", "acknowledged", "expected", "delivered", "lost", "kills", "reconnects")


def total(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ran = [r for r in reports.values() if "skipped" not in r]
    out: dict[str, Any] = {c: sum(r.get(c, 0) for r in ran) for c in COUNTERS}
    reasons: Counter[str] = Counter()
    for r in ran:
        reasons.update(r["duplicated"]["reasons"])
    out["duplicated"] = {
        "count": sum(r["duplicated"].get("count", 0) for r in ran),
        "allowed": sum(r["duplicated"].get("allowed", 0) for r in ran),
        "violations": sum(r["duplicated"].get("violations", 0) for r in ran),
        "reasons": dict(reasons),
    }
    out["max_rss_bytes"] = max((r["max_rss_bytes"] for r in ran), default=0)
    out["workers_run"] = len(ran)
    return out


async def run_worker(name: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    module_name = SCENARIOS.get(name)
    if module_name is None:
        return {"skipped": "no scenario module registered in bench/chaos/suite.py SCENARIOS"}
    module = importlib.import_module(module_name)
    if not inspect.iscoroutinefunction(getattr(module, "run", None)):
        return await run_standalone(module_name, args)
    h = Harness(name, args, root)
    started = time.monotonic()
    try:
        await module.run(h)
    except Exception as exc:
        h.fail(f"scenario crashed: {type(exc).__name__}: {exc}")
        traceback.print_exc(file=sys.stderr)
    finally:
        await h.close()
    return h.report(time.monotonic() - started)


async def run_standalone(module_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run a worker's own suite command with this run's seed and merge its summary."""
    cmd = [sys.executable, "-m", module_name, "--seed", str(args.seed), "--kills", str(args.kills)]
    if args.quick:
        cmd.append("--quick")
    if "broker_restart" in args.skip:
        cmd.append("--no-broker-restart")
    cmd += ["--overload-s", str(args.overload_seconds)]
    progress("running", " ".join(cmd[1:]))
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    try:
        report: dict[str, Any] = json.loads(out)
    except ValueError:
        return {**empty_report(), "ok": False, "failures": [f"{module_name}: no JSON summary"]}
    if "max_rss_bytes" not in report:
        report["max_rss_bytes"] = int(report.get("max_rss_mib", 0) * 2**20)
    report.setdefault("failures", [] if report.get("ok") else ["see the worker's scenarios"])
    report["command"] = " ".join(["python", *cmd[1:]])
    return {**empty_report(), **report}


def empty_report() -> dict[str, Any]:
    dup = {"count": 0, "allowed": 0, "violations": 0, "reasons": {}}
    return {**dict.fromkeys(COUNTERS, 0), "duplicated": dup, "max_rss_bytes": 0}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bridge-chaos-"))
    started = time.monotonic()
    reports: dict[str, dict[str, Any]] = {}
    for name in args.workers:
        progress(f"== {name}")
        reports[name] = await run_worker(name, args, root)
    ok = all(r.get("ok", True) for r in reports.values())
    if ok and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "seed": args.seed,
        "mode": "quick" if args.quick else "full",
        "ok": ok,
        "elapsed_s": round(time.monotonic() - started, 1),
        "broker": urlsplit(broker_url()).hostname,
        "workdir": None if ok and not args.keep else str(root),
        "total": total(reports),
        "workers": reports,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=DESCRIPTION)
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: random)")
    parser.add_argument("--workers", default=",".join(ALL_WORKERS), help="comma-separated")
    parser.add_argument("--kills", type=int, default=None, help="kill -9 per worker (20; 8 quick)")
    parser.add_argument("--quick", action="store_true", help="shorter phases, fewer kills")
    parser.add_argument("--skip", default="", help="scenario names to skip, comma-separated")
    parser.add_argument("--keep", action="store_true", help="keep logs and state directories")
    parser.add_argument(
        "--overload-seconds",
        type=float,
        default=None,
        help="how long each overload scenario floods the worker (180; 10 quick)",
    )
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 31)
    if args.kills is None:
        args.kills = 8 if args.quick else 20
    if args.overload_seconds is None:
        args.overload_seconds = 10.0 if args.quick else 180.0
    args.workers = [w for w in args.workers.split(",") if w]
    unknown = [w for w in args.workers if w not in ALL_WORKERS and w not in SCENARIOS]
    if unknown:
        parser.error(f"unknown worker(s): {', '.join(unknown)}")
    args.skip = [s for s in args.skip.split(",") if s]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The suite's own clients reconnect on purpose; their libraries' tracebacks would bury
    # the progress lines. The workers' logs are in their log files.
    logging.basicConfig(level=logging.ERROR)
    for noisy in ("aiormq", "aio_pika"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    progress(f"seed {args.seed} ({'quick' if args.quick else 'full'})")
    summary = asyncio.run(main_async(args))
    emit(summary)
    return 0 if summary["ok"] else 1
