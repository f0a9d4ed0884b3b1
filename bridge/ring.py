"""The broker side of sharding: declaring the consistent-hash exchange and keeping its ring
in shard order (aio-pika, control plane). The routing itself is computed in
:mod:`bridge.sharding`, which does no I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from bridge.errors import ConfigError
from bridge.sharding import CHX_PLUGIN, CHX_TYPE


def exchange_type_missing(exc: BaseException) -> bool:
    """Whether a declare failed because the broker does not know the exchange type
    (RabbitMQ closes the whole connection: 503 "unknown exchange type")."""
    text = str(exc).lower()
    return "unknown exchange type" in text or "invalid exchange type" in text


async def ensure_chx_exchange(
    url: str,
    worker: str,
    name: str,
    kind: str = CHX_TYPE,
    arguments: dict[str, Any] | None = None,
) -> None:
    """Declare the consistent-hash exchange ``name`` on a throw-away connection: an unknown
    exchange type makes the broker close the connection, which must not be the worker's."""
    import aio_pika  # local: this module's hash functions need no AMQP client

    conn = await aio_pika.connect(url)
    try:
        channel = await conn.channel()
        await channel.declare_exchange(name, kind, durable=True, arguments=arguments)
    except Exception as exc:
        if exchange_type_missing(exc):
            raise missing_plugin_error(worker) from exc
        raise
    finally:
        if not conn.is_closed:
            await conn.close()


def missing_plugin_error(worker: str) -> ConfigError:
    return ConfigError(
        f"{worker}: sharding needs the exchange type {CHX_TYPE!r}, which this broker does not "
        f"have: enable the plugin that ships with RabbitMQ with `rabbitmq-plugins enable "
        f"{CHX_PLUGIN}` (the worker enables nothing inside the broker itself)"
    )


class RingKeeper:
    """Keeps the consistent-hash exchange's ring in shard order (bucket i is shard i).

    RabbitMQ rebuilds the ring from the bindings when it restarts, in an order of its own (seen
    here: 242 of 300 keys routed elsewhere after ``stop_app``/``start_app`` with 5 queues), and
    a binding deleted and re-created moves to the end. Re-binding appends a queue's bucket at
    the end, so moving every shard queue to the end in shard order restores bucket i = shard i
    from any order; shards that do this at the same time still end in shard order (the last
    move of queue i always follows the last move of queue i-1). While it runs, one queue at a
    time is out of the ring: its messages go to other shards, which forward them.

    Repairs run at start-up, after the broker connection came back, and when a shard sees a
    message it does not own (at most once per ``min_interval_s`` for that reason).

    The keeper owns the shard queues' bindings to the exchange: the workers declare those
    queues unbound (and declare them again unbound when the broker lost one), and a repair
    binds them. Repairs never overlap, in this process or across shards: each one runs on a
    connection of its own that first holds the exclusive queue ``<exchange>.ring-lock`` (the
    broker refuses a second holder with 405 and deletes the queue when the connection ends,
    crash included). Overlapping changes lose buckets on RabbitMQ 3.10: the exchange removes
    an unbound queue's buckets a second time after the unbind's transaction, so a bind by
    another connection in between leaves the queue bound but out of the ring (seen here in 3
    of 2,000 rounds of two concurrent repairs; with every queue out, the exchange routes
    nothing, and a client's publish comes back unroutable until the next repair).
    """

    def __init__(
        self,
        url: str,
        exchange: str,
        queues: list[str],
        *,
        worker: str,
        min_interval_s: float = 30.0,
        lock_wait_s: float = 30.0,
    ) -> None:
        self.url = url
        self.lock_wait_s = lock_wait_s
        self.exchange = exchange
        self.queues = queues
        self.worker = worker
        self.min_interval_s = min_interval_s
        self.repairs = 0
        self._last = -1e9
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def lock_queue(self) -> str:
        return f"{self.exchange}.ring-lock"

    async def repair(self, reason: str) -> None:
        """Bind every shard queue again, in shard order, while holding the ring lock.
        Raises :class:`TimeoutError` when another holder keeps the lock ``lock_wait_s``."""
        import aio_pika  # local: this module's hash functions need no AMQP client

        async with self._lock:
            conn = await aio_pika.connect(
                self.url,
                timeout=10,  # a broker that does not answer must not hold the keeper's lock
                client_properties={"connection_name": f"bridge {self.worker} ring"},
            )
            try:
                channel = await self._hold_lock(conn)
                for name in self.queues:
                    queue = await channel.get_queue(name, ensure=False)
                    await queue.unbind(self.exchange, routing_key="1")
                    await queue.bind(self.exchange, routing_key="1")
            finally:
                await conn.close()  # the lock goes with the connection
            self.repairs += 1
            logging.getLogger(f"bridge.{self.worker}").info(
                "consistent-hash ring put in shard order",
                extra={"exchange": self.exchange, "reason": reason, "shards": len(self.queues)},
            )

    async def _hold_lock(self, conn: Any) -> Any:
        """A channel of ``conn`` once ``conn`` holds the ring lock (waits while another
        connection holds it, up to ``lock_wait_s``)."""
        import aio_pika

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lock_wait_s
        pause = 0.02
        while True:
            channel = await conn.channel()
            try:
                await channel.declare_queue(self.lock_queue, exclusive=True)
                return channel
            except aio_pika.exceptions.ChannelClosed as exc:
                if "RESOURCE_LOCKED" not in str(exc):
                    raise
            if loop.time() + pause > deadline:
                raise TimeoutError(
                    f"the ring lock {self.lock_queue!r} stayed held by another connection for "
                    f"{self.lock_wait_s:g} s (a repair that does not end: see the broker's "
                    "connections named 'bridge <worker> ring')"
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    def schedule(self, reason: str, *, delay_s: float = 0.0, force: bool = False) -> None:
        """Repair soon, in the background (rate-limited unless ``force``)."""

        if self._task is not None and not self._task.done():
            return
        if not force and time.monotonic() - self._last < self.min_interval_s:
            return
        self._last = time.monotonic()

        async def run() -> None:
            await asyncio.sleep(delay_s)
            try:
                await self.repair(reason)
            except Exception as exc:  # broker away again: the next trigger retries
                logging.getLogger(f"bridge.{self.worker}").warning(
                    "consistent-hash ring repair failed", extra={"error": str(exc)}
                )

        with contextlib.suppress(RuntimeError):  # no running loop: nothing to do
            self._task = asyncio.get_running_loop().create_task(run())

    async def close(self) -> None:

        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
