"""The ``rabbitmq-bridge`` command (alias ``bridge``): run workers, check configuration, and
small client helpers."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from bridge import __version__
from bridge.errors import BridgeError, BrokerUnavailable, ConfigError, InvalidRequest

PROG = "rabbitmq-bridge"

EPILOG = f"""\
examples:
  {PROG} run all                       run every installed worker in this process
  {PROG} run directed                  run one worker (what a Kubernetes pod does)
  {PROG} check                         validate settings, reach the broker, check the
                                                state dir: exit 0 ok, 1 failed, 2 bad settings
  {PROG} demo                          the three flows end to end against the broker
  {PROG} directed send --to node-1,node-2 'hello'
  {PROG} directed pull node-1 --ack    pull as target node-1 and acknowledge the batch
  {PROG} directed status <message_id>

configuration comes from environment variables (BRIDGE_AMQP_URL, BRIDGE_STATE_DIR,
BRIDGE_HTTP_PORT, BRIDGE_<WORKER>__<SETTING>) and from files in BRIDGE_SECRETS_DIR;
see README.md for every setting.
"""


# Each worker's client helpers: a module with add_commands(subparsers).
COMMANDS_GROUP = "bridge.commands"  # entry points: add_commands(subparsers) of each worker


def _settings():  # type: ignore[no-untyped-def]
    from bridge.settings import load_host_settings

    return load_host_settings()


def _prepare(names: list[str]):  # type: ignore[no-untyped-def]
    """The host's settings and the named workers, built; every problem of every one of them
    in one :class:`ConfigError`, one line each."""
    from bridge.host import load_workers

    problems: list[str] = []
    settings = None
    try:
        settings = _settings()
    except ConfigError as exc:
        problems.extend(exc.problems)
    workers = []
    try:
        workers = load_workers(names)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems:
        raise ConfigError(*problems)
    return settings, workers


def version() -> str:
    return __version__


def _use_uvloop() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass


def cmd_run(args: argparse.Namespace) -> int:
    import logging

    from bridge.host import Host, check_ports, settings_warnings
    from bridge.logs import setup_logging

    settings, workers = _prepare(args.workers)
    setup_logging(settings.log_level, settings.log_format)
    for warning in settings_warnings():
        logging.getLogger("bridge.settings").warning(warning)
    check_ports(settings, workers)
    _use_uvloop()
    host = Host(settings, workers)
    try:
        asyncio.run(host.run())
    except KeyboardInterrupt:
        pass
    except BrokerUnavailable:
        pass  # stopped while waiting; the reason was already logged
    return 0


async def _check(settings) -> list[tuple[str, bool, str]]:  # type: ignore[no-untyped-def]
    from bridge.amqp import connect_once
    from bridge.settings import redact_url

    results: list[tuple[str, bool, str]] = [
        ("settings", True, f"broker {redact_url(settings.amqp_url)}")
    ]
    try:
        conn = await connect_once(settings.amqp_url, timeout=5)
        server = conn.transport.connection.server_properties if conn.transport else {}
        version = server.get("version", b"?") if isinstance(server, dict) else "?"
        if isinstance(version, bytes):
            version = version.decode()
        await conn.close()
        results.append(("broker", True, f"reachable (RabbitMQ {version})"))
    except BrokerUnavailable as exc:
        results.append(("broker", False, str(exc)))
    state = settings.state_dir
    try:
        state.mkdir(parents=True, exist_ok=True)
        probe = state / ".bridge-check"
        probe.write_text("ok")
        probe.unlink()
        results.append(("state_dir", True, f"{state} is writable"))
    except OSError as exc:
        results.append(("state_dir", False, f"{state} is not writable: {exc}"))
    return results


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0: all good; 1: the broker or the state directory failed; 2: invalid settings
    (of the host or of any installed worker, built as ``run`` builds it: what ``run`` would
    stop on before it connects)."""
    from bridge.host import available_workers, settings_warnings

    warnings = settings_warnings()
    try:
        settings, _ = _prepare(["all"])
    except ConfigError as exc:
        if args.json:
            doc = {"settings": {"ok": False, "detail": exc.problems}}
            print(json.dumps({"ok": False, "checks": doc, "warnings": warnings}))
        else:
            for line in exc.problems:
                print(f"FAIL settings   {line}")
            for line in warnings:
                print(f"warn settings   {line}")
        return 2
    results = asyncio.run(_check(settings))
    results.append(("workers", True, ", ".join(sorted(available_workers())) or "none installed"))
    ok = all(r[1] for r in results)
    if args.json:
        checks = {n: {"ok": o, "detail": d} for n, o, d in results}
        print(json.dumps({"ok": ok, "checks": checks, "warnings": warnings}))
    else:
        for name, good, detail in results:
            print(f"{'ok ' if good else 'FAIL'} {name:<10} {detail}")
        for line in warnings:
            print(f"warn settings   {line}")
    return 0 if ok else 1


def cmd_workers(args: argparse.Namespace) -> int:
    from bridge.host import available_workers

    for name, ep in sorted(available_workers().items()):
        print(f"{name:<12} {ep.value}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from bridge.demo import run_demo

    return run_demo(_settings(), args.prefix, verbose=args.verbose)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Worker processes that run beside RabbitMQ: targeted distribution (directed), "
        "delayed delivery (delay) and a TCP gateway (gateway).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run one or more workers until SIGTERM",
        description="Run workers in this process. 'all' runs every installed worker.",
    )
    run.add_argument("workers", nargs="+", metavar="WORKER", help="worker names, or 'all'")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser(
        "check",
        help="validate settings, reach the broker, check the state dir; "
        "exit 0 ok, 1 failed, 2 invalid settings",
    )
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(func=cmd_check)
    lst = sub.add_parser(
        "workers", help="list installed workers (entry-point group bridge.workers)"
    )
    lst.set_defaults(func=cmd_workers)
    demo = sub.add_parser(
        "demo",
        help="run the three workers in this process and drive each flow end to end",
        description="Against BRIDGE_AMQP_URL: one targeted message pulled by several targets "
        "with one resend, delayed messages on a hot and a cold topic, two TCP clients echoed "
        "through two servers; then a summary table. Every exchange and queue is named "
        "<prefix>.* and deleted at the end; state lives in a temporary directory. "
        "Exit 0 only if every flow succeeded.",
    )
    demo.add_argument("--prefix", help="name prefix, starting with 'demo' (default: demo-<random>)")
    demo.add_argument("--verbose", action="store_true", help="show the workers' log lines")
    demo.set_defaults(func=cmd_demo)
    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"{PROG}: configuration error: {line}", file=sys.stderr)
        return 2
    except InvalidRequest as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except BridgeError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
