"""Probes of the local RabbitMQ node (rabbitmqctl) and the disk use of its files."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.harness.cpu import rss_bytes
from bench.harness.report import progress


def rabbitmqctl(*args: str, timeout: float = 60.0) -> str:
    """The broker's rabbitmqctl: ``BRIDGE_TEST_RABBITMQCTL`` (a command line, as for the
    tests, e.g. ``rabbitmqctl -n h5@localhost``) or ``rabbitmqctl`` (the default node: the
    wrong one when ``BRIDGE_AMQP_URL`` names another)."""
    argv = shlex.split(os.environ.get("BRIDGE_TEST_RABBITMQCTL") or "rabbitmqctl")
    if shutil.which(argv[0]) is None:
        raise RuntimeError("rabbitmqctl not found (broker-side figures need a local broker)")
    done = subprocess.run(
        [*argv, *args], capture_output=True, text=True, timeout=timeout, check=True
    )
    return done.stdout


def broker_info() -> dict[str, Any]:
    """Pid, data directory and version of the local RabbitMQ node."""
    out = rabbitmqctl(
        "eval",
        'io:format("~s~n~s~n~s~n", [os:getpid(), rabbit_mnesia:dir(), rabbit:base_product_version()]).',
    )
    pid, data_dir, version = out.strip().splitlines()[:3]
    return {"pid": int(pid), "data_dir": data_dir, "version": version}


_BROKER: dict[str, Any] | None = None


def broker_info_cached() -> dict[str, Any] | None:
    """:func:`broker_info` once per process; None (after a progress line) without a local
    broker."""
    global _BROKER
    if _BROKER is None:
        try:
            _BROKER = broker_info()
        except Exception as exc:
            progress(f"no broker-side figures: {exc}")
            _BROKER = {}
    return _BROKER or None


def broker_memory(pid: int, *, collect: bool = True) -> dict[str, int]:
    """Erlang-allocated memory of the node (after a full GC when ``collect``) and its RSS."""
    gc = "[erlang:garbage_collect(P) || P <- erlang:processes()], " if collect else ""
    out = rabbitmqctl(
        "eval",
        gc + 'io:format("~w~n", [[erlang:memory(K) || K <- [total, processes, ets, binary]]]).',
    )
    total, processes, ets, binary = (int(v) for v in re.findall(r"\d+", out.splitlines()[0]))
    return {
        "erlang_total": total,
        "processes": processes,
        "ets": ets,
        "binary": binary,
        "rss": rss_bytes(pid),
    }


def du_bytes(paths: Iterable[Path]) -> int:
    """Apparent size of the files under ``paths`` (like ``du -sb``)."""
    total = 0
    for root in paths:
        if root.is_file():
            total += root.stat().st_size
            continue
        for dirpath, _, files in os.walk(root):
            for name in files:
                try:
                    total += (Path(dirpath) / name).stat().st_size
                except FileNotFoundError:
                    pass
    return total


def disk_blocks_bytes(paths: Iterable[Path]) -> int:
    """Allocated size (blocks) of the files under ``paths`` (like ``du -s``)."""
    total = 0
    for root in paths:
        for dirpath, _, files in os.walk(root):
            for name in files:
                try:
                    total += (Path(dirpath) / name).stat().st_blocks * 512
                except FileNotFoundError:
                    pass
    return total


async def delete_names(url: str, exchanges: list[str], queues: list[str]) -> None:
    """Delete these queues, then these exchanges, each on its own channel (an error closes a
    channel); missing ones are skipped."""
    import aio_pika

    conn = await aio_pika.connect(url)
    try:
        for q in queues:
            ch = await conn.channel()
            with contextlib.suppress(Exception):
                await ch.queue_delete(q)
            with contextlib.suppress(Exception):
                await ch.close()
        for e in exchanges:
            ch = await conn.channel()
            with contextlib.suppress(Exception):
                await ch.exchange_delete(e)
            with contextlib.suppress(Exception):
                await ch.close()
    finally:
        await conn.close()
