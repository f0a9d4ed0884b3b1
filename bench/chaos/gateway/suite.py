"""Fault, overload, bad-input and security suite of the ``gateway`` worker (issue 6).

    python -m bench.chaos.gateway                     # full run (about 6 minutes)
    python -m bench.chaos.gateway --quick             # shorter, fewer kills
    python -m bench.chaos.gateway --seed 7 --only crash,broker
    python -m bench.chaos.gateway --no-broker-restart # leave the broker alone

Prints one JSON object on stdout (progress on stderr). Scenarios:

``crash``
    ``kill -9`` of the gateway process at random moments (seeded) during sustained echo
    load, restart under the same instance and state directory. Clients reconnect with their
    ``client_id`` and resend what was not answered.
``broker``
    The gateway talks to the broker through a proxy that drops, stalls (short and long) and
    slows every connection, then the broker itself restarts (``rabbitmqctl stop_app`` /
    ``start_app``; only here, never in tests/). A ledger of the publishes the broker
    confirmed is kept inside the gateway (it runs in this process for that).
``overload``
    Clients send open-loop at about twice what the only backend can handle, for a while;
    then they stop. Gateway memory, its publish window, the backlog in the broker and the
    round trip of a probe client before, during and after.
``input``
    :mod:`bench.chaos.gateway.input`: the corpus, seeded mutations of it, slowloris HELLOs,
    a client that never reads, a connection flood, secrets in DEBUG logs.

What "acknowledged" means here. The clients here speak protocol version 1: the gateway
tells them nothing when the broker confirms their DATA (no ACK frame; that is version 2,
tested in ``tests/integration/gateway/test_v2.py``), and the server's reply is the only
sign that a message got through. So a client cannot know which of its messages were taken when a session ends
without a reply (gateway killed, ERROR ``unavailable``): per socket the gateway path is
*at most once*. It is *at least once* for clients that resend what was not answered, keyed
by an id inside the payload, which is what the clients here do; duplicates at the server
are then expected and reported with their reason. The figures:

- ``sent``: distinct message ids; ``acknowledged``: ids answered by the echo server (the
  client's only acknowledgement); ``lost`` = sent - acknowledged, after the clients' resends
  (must be 0);
- ``delivered``: distinct ids the servers received; ``duplicated``: ids received more than
  once, by reason (``client_resend_after_reconnect`` / ``..._after_timeout``; a
  ``gateway_duplicate`` -- one attempt received twice -- must be 0);
- ``attempts_lost_in_flight``: sends that never reached a server (read by a gateway that
  was then killed, or failed with ``unavailable``): what "at most once per socket" costs;
- ``broker_confirmed_lost`` (broker scenario): publishes the broker confirmed to the
  gateway that no server received (must be 0);
- per session, the server sees the client's DATA in order: ``order_violations`` must be 0;
  ``gaps`` counts sessions where a message in the middle is missing."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.chaos.gateway.broker import broker
from bench.chaos.gateway.crash import crash
from bench.chaos.gateway.input import run as run_input
from bench.chaos.gateway.ledger import NAME
from bench.chaos.gateway.overload import overload
from bench.harness.report import emit, progress
from bench.harness.stats import rnd

SCENARIOS = ("crash", "broker", "overload", "input")


async def main(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="chaos-gateway-"))
    progress(f"chaos gateway: seed {args.seed}, scenarios {','.join(args.only)}, in {root}")
    started = time.monotonic()
    results: dict[str, Any] = {}
    runners = {
        "crash": crash,
        "broker": broker,
        "overload": overload,
        "input": run_input,
    }
    for name in args.only:
        progress(f"== {name}")
        results[name] = await runners[name](args, root)
        progress(name, json.dumps(results[name])[:600])
    return summarise(args, results, time.monotonic() - started)


def summarise(args: argparse.Namespace, results: dict[str, Any], seconds: float) -> dict[str, Any]:
    """One summary with the counters ``bench.chaos`` merges (``sent``, ``acknowledged``,
    ``expected``, ``delivered``, ``lost``, ``duplicated``, ``kills``, ``reconnects``,
    ``max_rss_mib``, ``ok``, ``failures``), the scenarios' own figures under ``scenarios``."""
    ledgers = [r for r in results.values() if "sent" in r]
    reasons: Counter[str] = Counter()
    for r in ledgers:
        reasons.update(r["duplicated"]["reasons"])
    violations = reasons.pop("gateway_duplicate", 0)
    if violations:
        reasons["violation: one attempt delivered twice by the gateway"] = violations
    lost = sum(r["lost"] for r in ledgers)
    failures: list[str] = []
    for name, r in results.items():
        if r.get("lost"):
            failures.append(f"{name}: {r['lost']} messages never answered after resends")
        if r.get("sessions", {}).get("order_violations"):
            failures.append(f"{name}: {r['sessions']['order_violations']} sessions out of order")
        if r.get("sessions", {}).get("gaps"):
            failures.append(f"{name}: {r['sessions']['gaps']} sessions with a hole")
        if r.get("broker_confirmed_lost"):
            failures.append(f"{name}: {r['broker_confirmed_lost']} confirmed publishes lost")
        if r.get("failures"):
            failures.append(f"{name}: {r['failures']} failures: {r.get('failure_examples')}")
    if violations:
        failures.append(f"{violations} attempts delivered twice by the gateway")
    count = sum(r["duplicated"]["count"] for r in ledgers)
    return {
        "worker": NAME,
        "command": "python -m bench.chaos.gateway" + (" --quick" if args.quick else ""),
        "seed": args.seed,
        "ok": not failures,
        "failures": failures,
        "seconds": rnd(seconds, 1),
        "sent": sum(r["sent"] for r in ledgers),
        "acknowledged": sum(r["acknowledged"] for r in ledgers),
        "expected": sum(r["acknowledged"] for r in ledgers),
        "delivered": sum(r["delivered"] for r in ledgers),
        "lost": lost,
        "duplicated": {
            "count": count,
            "allowed": count - violations,
            "violations": violations,
            "reasons": dict(reasons),
        },
        "kills": results.get("crash", {}).get("kills", 0),
        "reconnects": results.get("broker", {}).get("gateway_reconnects", 0),
        "client_reconnects": sum(r["sessions"]["reconnects"] for r in ledgers),
        "max_rss_mib": max((r.get("max_rss_mib", 0) for r in results.values()), default=0),
        "acknowledged_means": (
            "the server's echo reached the client: the gateway sends no ack frame, so a client "
            "cannot tell which DATA the broker confirmed; the path is at most once per socket "
            "and at least once with client resends keyed by an id in the payload, which these "
            "clients do (duplicates at the server are counted with their reason)"
        ),
        "scenarios": results,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos.gateway", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="shorter run, fewer kills")
    parser.add_argument("--seed", type=int, help="seed of every random choice (printed)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--kills", type=int, help="kill -9 count (at least 20 in a full run)")
    parser.add_argument("--clients", type=int, help="load clients per scenario")
    parser.add_argument(
        "--overload-s",
        "--overload-seconds",
        dest="overload_s",
        type=float,
        help="seconds of overload (180; 10 with --quick)",
    )
    parser.add_argument(
        "--overload-factor", type=float, help="offered load / backend capacity (default 2)"
    )
    parser.add_argument("--fuzz", type=int, help="mutated corpus sequences in the input run")
    parser.add_argument(
        "--no-broker-restart",
        dest="broker_restart",
        action="store_false",
        help="skip rabbitmqctl stop_app/start_app (it disturbs everything on the broker)",
    )
    args = parser.parse_args(argv)
    args.seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    args.only = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {sorted(unknown)}")
    args.kills = args.kills if args.kills is not None else (5 if args.quick else 20)
    args.clients = args.clients or (8 if args.quick else 16)
    args.overload_s = args.overload_s or (10.0 if args.quick else 180.0)
    args.overload_factor = args.overload_factor or 2.0
    args.fuzz = args.fuzz if args.fuzz is not None else (150 if args.quick else 600)
    return args


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    result = asyncio.run(main(args))
    emit(result)
    return result
