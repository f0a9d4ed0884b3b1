"""``python -m bench.delay.parts run delay``: the delay worker as ``python -m bridge.cli run
delay`` runs it, with the CPU time of each of its main parts measured where it is spent.

Sampling profilers disagree about this worker (``py-spy --native`` misnames code of a
stripped libpython, and a sample lands wherever the GIL hand-over happens to be), so this
adds up ``time.thread_time()`` around the callbacks and task steps that do the work: the
sockets' reads (frame decoding and the ingress handler inside them), the lanes' flushes,
the scheduler, the lane reports, the commit waiters, each task's steps by its coroutine,
and on the store's writer thread its transactions and their statements. At exit (SIGTERM
from the benchmark) it writes, to ``$BENCH_PARTS_OUT``, microseconds per ingress delivery
of each part between the first and the last delivery. A part whose function a later
commit renamed is reported under ``missing``; a clock read costs about 0.1 µs, so the
figures include a little of the measuring.

The steady part of ``python -m bench.delay`` runs its worker this way with ``--parts``.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import collections.abc
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine, Generator
from typing import Any

clock = time.thread_time
totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
missing: list[str] = []
span: dict[str, float] = {"deliveries": 0}


def _add(part: str, started: float) -> float:
    now = clock()
    total = totals[part]
    total[0] += 1
    total[1] += now - started
    return now


def _wrap(module: str, qualname: str, part: str | Callable[[Any], str]) -> None:
    """Measure every call of ``module.qualname`` (a function or a method) as ``part``
    (or as ``part(self)`` for a method whose part depends on its object)."""
    try:
        owner: Any = importlib.import_module(module)
        *path, name = qualname.split(".")
        for attr in path:
            owner = getattr(owner, attr)
        original = getattr(owner, name)
    except (ImportError, AttributeError):
        missing.append(f"{module}.{qualname}")
        return

    def measured(*args: Any, **kwargs: Any) -> Any:
        started = clock()
        try:
            return original(*args, **kwargs)
        finally:
            _add(part if isinstance(part, str) else part(args[0]), started)

    setattr(owner, name, measured)


class _Timed(collections.abc.Coroutine):  # type: ignore[type-arg]
    """A task's coroutine whose every step is measured under the coroutine's name."""

    __slots__ = ("_coro", "_part")

    def __init__(self, coro: Coroutine[Any, Any, Any], part: str) -> None:
        self._coro = coro
        self._part = part

    def send(self, value: Any) -> Any:
        started = clock()
        try:
            return self._coro.send(value)
        finally:
            _add(self._part, started)

    def throw(self, *args: Any) -> Any:
        started = clock()
        try:
            return self._coro.throw(*args)
        finally:
            _add(self._part, started)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, Any]:
        return self  # type: ignore[return-value]

    def __iter__(self) -> _Timed:
        return self

    def __next__(self) -> Any:
        return self.send(None)


def _task_factory(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
) -> asyncio.Task[Any]:
    part = "task " + getattr(coro, "__qualname__", type(coro).__name__)
    return asyncio.Task(_Timed(coro, part), loop=loop, **kwargs)  # type: ignore[arg-type]


def _link_kind(obj: Any) -> str:
    link = getattr(obj, "link", obj)
    return "lanes" if str(getattr(link, "name", "")).startswith("delay lane") else "ingress"


def install() -> None:
    _wrap(
        "bridge.amqp.connection",
        "LinkProtocol.data_received",
        lambda proto: f"socket reads, {_link_kind(proto)}' links",
    )
    _wrap(
        "bridge.amqp.frames.framing", "Decoder.feed", "in socket reads: frame decoding (every link)"
    )
    _wrap("bridge.amqp.link", "Link._flush_dirty", lambda link: f"writes, {_link_kind(link)}")
    _wrap("workers.delay.ingress", "Ingress._stored", "ingress commit waiters (admit, ack)")
    _wrap("workers.delay.dispatch", "Dispatcher.report_from_lane", "in lane tasks: lane reports")
    _wrap("workers.delay.core", "Scheduler.assign", "in the dispatcher task: scheduler assign")
    _wrap("workers.delay.lanes", "fetch_messages", "in lane tasks: lanes' store reads")
    _wrap("bridge.store", "transaction_apply", "writer thread: transactions")
    _wrap("workers.delay.store", "DelayStore.apply", "writer thread, in transactions: statements")
    try:
        from workers.delay.ingress import Ingress
        from workers.delay.worker import DelayWorker
    except ImportError:
        missing.append("workers.delay.ingress.Ingress / workers.delay.worker.DelayWorker")
        return
    on_delivery = Ingress.on_delivery

    def measured_delivery(self: Any, delivered: Any) -> Any:
        started = clock()
        if not span["deliveries"]:
            span["first"] = started
        span["deliveries"] += 1
        try:
            return on_delivery(self, delivered)
        finally:
            span["last"] = _add("in socket reads: ingress handler (on_delivery)", started)

    Ingress.on_delivery = measured_delivery  # type: ignore[method-assign]
    start = DelayWorker.start

    async def measured_start(self: Any, *args: Any, **kwargs: Any) -> Any:
        # The lanes', the dispatcher's and the committer's tasks are created from here on.
        asyncio.get_running_loop().set_task_factory(_task_factory)  # type: ignore[arg-type]
        return await start(self, *args, **kwargs)

    DelayWorker.start = measured_start  # type: ignore[method-assign]


def report() -> dict[str, Any]:
    n = span["deliveries"]
    main = span.get("last", 0.0) - span.get("first", 0.0)
    out: dict[str, Any] = {
        "deliveries": int(n),
        "main_thread_us_per_message": round(main / n * 1e6, 1) if n else None,
        "parts_us_per_message": {
            part: round(seconds / n * 1e6, 1)
            for part, (_, seconds) in sorted(totals.items(), key=lambda kv: -kv[1][1])
            if n and seconds / n * 1e6 >= 0.05
        },
        "calls_per_message": {
            part: round(calls / n, 3)
            for part, (calls, _) in sorted(totals.items(), key=lambda kv: -kv[1][1])
            if n and calls / n >= 0.001
        },
        "missing": missing,
    }
    return out


def _dump() -> None:
    path = os.environ.get("BENCH_PARTS_OUT")
    if path:
        with open(path, "w") as f:
            json.dump(report(), f, indent=1)


def main() -> int:
    sys.path.insert(0, os.getcwd())  # the checkout being measured (its cwd)
    install()
    atexit.register(_dump)
    from bridge.cli import main as bridge_main

    return bridge_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
