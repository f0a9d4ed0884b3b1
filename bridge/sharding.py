"""Shards of a stateful worker behind RabbitMQ's consistent-hash exchange.

A sharded worker runs as N processes (one per StatefulSet ordinal), each owning the keys the
consistent-hash exchange (plugin ``rabbitmq_consistent_hash_exchange``, shipped with
RabbitMQ) routes to its queue. The worker must know which keys it owns without asking the
broker, for example to keep only its own targets of a request that names many. So this module
computes the exchange's routing exactly as the plugin does (RabbitMQ 3.8 to 3.13):

- the hashed value is the routing key, as a binary;
- ``K = erlang:phash2(Key)`` (Bob Jenkins' lookup2 over the bytes, 27 bits);
- the bucket is Jump Consistent Hash of ``K`` over the number of buckets, drawing its
  uniform floats from ``rand:seed_s(exs1024, {K, K, K})``;
- bucket ``i`` belongs to the ``i``-th binding made (a binding of weight ``w`` takes ``w``
  consecutive buckets).

Shard queues are bound with weight 1 in shard order, so bucket ``i`` is shard ``i``. The tests
check this function against the broker's real routing and against ``erl`` when installed.

The binding order is the fragile part: RabbitMQ rebuilds the ring when it restarts, and a
binding deleted and re-created moves to the end. A sharded worker therefore never trusts the
routing for correctness: a shard that receives a key it does not own forwards it to the
owner's queue (one extra hop, counted in a metric and logged), so a message reaches its
owning shard whatever the ring looks like; the exchange only makes that hop rare.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from bridge.errors import ConfigError

CHX_TYPE = "x-consistent-hash"
CHX_PLUGIN = "rabbitmq_consistent_hash_exchange"

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1
_HCONST = 0x9E3779B9  # the golden ratio, lookup2's initial a and b
_HCONST_13 = (_HCONST * 13) & _M32  # erts make_hash2's constant for binaries
_PHASH2_RANGE = (1 << 27) - 1


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - b - c) & _M32
    a ^= c >> 13
    b = (b - c - a) & _M32
    b ^= (a << 8) & _M32
    c = (c - a - b) & _M32
    c ^= b >> 13
    a = (a - b - c) & _M32
    a ^= c >> 12
    b = (b - c - a) & _M32
    b ^= (a << 16) & _M32
    c = (c - a - b) & _M32
    c ^= b >> 5
    a = (a - b - c) & _M32
    a ^= c >> 3
    b = (b - c - a) & _M32
    b ^= (a << 10) & _M32
    c = (c - a - b) & _M32
    c ^= b >> 15
    return a, b, c


def phash2_binary(data: bytes) -> int:
    """``erlang:phash2(Data)`` for a binary ``Data`` (a stable function, documented as such)."""
    if not data:
        return _HCONST_13 & _PHASH2_RANGE
    a = b = _HCONST
    c = _HCONST_13
    n = len(data)
    i = 0
    while n - i >= 12:
        a = (a + int.from_bytes(data[i : i + 4], "little")) & _M32
        b = (b + int.from_bytes(data[i + 4 : i + 8], "little")) & _M32
        c = (c + int.from_bytes(data[i + 8 : i + 12], "little")) & _M32
        a, b, c = _mix(a, b, c)
        i += 12
    c = (c + n) & _M32
    rest = data[i:]
    if len(rest) > 8:  # the lowest byte of c is the length's
        c = (c + (int.from_bytes(rest[8:], "little") << 8)) & _M32
    if len(rest) > 4:
        b = (b + int.from_bytes(rest[4:8], "little")) & _M32
    if rest:
        a = (a + int.from_bytes(rest[:4], "little")) & _M32
    return _mix(a, b, c)[2] & _PHASH2_RANGE


def _xorshift64star(r: int) -> tuple[int, int]:
    r ^= r >> 12
    r ^= (r << 25) & _M64
    r ^= r >> 27
    return (r * 2685821657736338717) & _M64, r


class _Exs1024:
    """``rand``'s exs1024 (xorshift1024*) seeded from an integer triple, as OTP does."""

    __slots__ = ("p", "s")

    def __init__(self, k: int) -> None:
        m21 = (1 << 21) - 1
        b1 = (((k & m21) + 1) * 2097131) & m21
        b2 = (((k & m21) + 1) * 2097133) & m21
        b3 = (((k & m21) + 1) * 2097143) & m21
        r = (b1 << 43) | (b2 << 22) | (b3 << 1) | 1
        state = []
        for _ in range(16):
            x, r = _xorshift64star(r)
            state.append(x)
        state.reverse()
        self.s = state
        self.p = 0

    def uniform(self) -> float:
        s = self.s
        s0 = s[self.p]
        self.p = (self.p + 1) & 15
        s1 = s[self.p]
        s1 ^= (s1 << 31) & _M64
        s1 ^= s1 >> 11
        s0 ^= s0 >> 30
        ns1 = s0 ^ s1
        s[self.p] = ns1
        return ((ns1 * 1181783497276652981) & _M64) / 18446744073709551616


def jump_consistent_hash(key: int, buckets: int) -> int:
    """The plugin's ``jump_consistent_hash/2`` for an integer key."""
    if buckets < 1:
        raise ValueError("buckets must be >= 1")
    if buckets == 1:
        return 0
    rng = _Exs1024(key)
    b, j = -1, 0
    while j < buckets:
        b = j
        r = rng.uniform()
        if r == 0.0:  # Erlang would crash routing this key; no 64-bit state gives it
            return b
        j = int((b + 1) / r)
    return b


def chx_bucket(routing_key: str | bytes, buckets: int) -> int:
    """The bucket the consistent-hash exchange picks for ``routing_key``."""
    data = routing_key.encode() if isinstance(routing_key, str) else routing_key
    return jump_consistent_hash(phash2_binary(data), buckets)


class ShardFields(BaseModel):
    """Settings every sharded worker has (``BRIDGE_<WORKER>__SHARD_COUNT`` / ``__SHARD_INDEX``)."""

    shard_count: int = Field(
        default=1, ge=1, le=1024, description="number of shards (replicas) of this worker"
    )
    shard_index: int | None = Field(
        default=None,
        ge=0,
        description="this replica's shard; default: the ordinal at the end of the host name "
        "(StatefulSet pod 'directed-2' is shard 2)",
    )


@functools.lru_cache(maxsize=131_072)
def _cached_bucket(key: str, count: int) -> int:
    """``chx_bucket`` remembered: it costs about 17 us in Python, and a directed shard asks it
    for every target of every request and every pull (target sets are mostly stable)."""
    return chx_bucket(key, count)


def shard_queue(base: str, index: int) -> str:
    """The name of shard ``index``'s own queue next to the shared queue ``base``."""
    return f"{base}.shard-{index}"


@dataclass(frozen=True, slots=True)
class Shard:
    index: int
    count: int

    @property
    def sharded(self) -> bool:
        return self.count > 1

    def owner(self, key: str) -> int:
        return _cached_bucket(key, self.count)

    def owns(self, key: str) -> bool:
        return self.count == 1 or _cached_bucket(key, self.count) == self.index

    def identity(self) -> dict[str, str]:
        return {"shard_count": str(self.count), "shard_index": str(self.index)}


def resolve_shard(worker: str, count: int, index: int | None, hostname: str | None = None) -> Shard:
    """The shard this process is, from the settings or else the StatefulSet ordinal."""
    var = f"BRIDGE_{worker.upper()}__SHARD_INDEX"
    if index is None:
        if count == 1:
            index = 0
        else:
            host = hostname if hostname is not None else os.environ.get("HOSTNAME", "")
            match = re.search(r"-(\d+)$", host)
            if match is None:
                raise ConfigError(
                    f"{worker}: shard_count is {count} but no shard index: set {var}, or run as "
                    f"a StatefulSet pod whose name ends in its ordinal (host name {host!r})"
                )
            index = int(match.group(1))
    if not 0 <= index < count:
        raise ConfigError(
            f"{worker}: shard index {index} is outside 0..{count - 1} "
            f"(BRIDGE_{worker.upper()}__SHARD_COUNT={count}); scale the StatefulSet to at most "
            f"{count} replicas or raise the shard count (docs/operations.md, 'Changing the "
            "shard count')"
        )
    return Shard(index=index, count=count)


SHARD_COUNT_HINT = (
    "a state directory belongs to one shard of one shard count: to change the shard count, "
    "drain and re-create the shards as described in docs/operations.md ('Changing the shard "
    "count'); never point a shard at another shard's volume"
)


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
    """

    def __init__(
        self,
        open_channel: Any,
        exchange: str,
        queues: list[str],
        *,
        worker: str,
        min_interval_s: float = 30.0,
    ) -> None:
        self._open_channel = open_channel
        self.exchange = exchange
        self.queues = queues
        self.worker = worker
        self.min_interval_s = min_interval_s
        self.repairs = 0
        self._last = -1e9
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def repair(self, reason: str) -> None:

        async with self._lock:
            channel = await self._open_channel()
            try:
                raw = await channel.get_underlay_channel()
                for name in self.queues:
                    await raw.queue_unbind(queue=name, exchange=self.exchange, routing_key="1")
                    await raw.queue_bind(queue=name, exchange=self.exchange, routing_key="1")
            finally:
                if not channel.is_closed:
                    await channel.close()
            self.repairs += 1
            logging.getLogger(f"bridge.{self.worker}").info(
                "consistent-hash ring put in shard order",
                extra={"exchange": self.exchange, "reason": reason, "shards": len(self.queues)},
            )

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
