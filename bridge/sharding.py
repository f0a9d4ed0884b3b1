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

With ``hash-header`` what is hashed depends on the broker. Up to RabbitMQ 3.12 it is the
header's typed AMQP value, the pair ``{Type, Value}``: ``{longstr, <<"k">>}`` for a long
string, ``{binary, <<"k">>}`` for a byte array ('x'); :func:`chx_header_bucket` computes
``erlang:phash2`` of such a pair (erts ``make_hash2`` for a 2-tuple of an atom and a binary,
the atom hashed by the atom table's hashpjw). From 3.13 on (the message containers) the
plugin hashes the value alone, the binary, as for a routing key: ``typed=False``, and
:func:`header_hash_typed` tells which from the version the broker announces (seen: 3.10.8
typed, 4.3.6 not, each checked against the broker's own routing).

Shard queues are bound with weight 1 in shard order, so bucket ``i`` is shard ``i``. The tests
check this function against the broker's real routing and against ``erl`` when installed.

The binding order is the fragile part: RabbitMQ rebuilds the ring when it restarts, and a
binding deleted and re-created moves to the end. A sharded worker therefore never trusts the
routing for correctness: a shard that receives a key it does not own forwards it to the
owner's queue (one extra hop, counted in a metric and logged), so a message reaches its
owning shard whatever the ring looks like; the exchange only makes that hop rare.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

from pydantic import BaseModel, Field

from bridge.errors import ConfigError

CHX_TYPE = "x-consistent-hash"
CHX_PLUGIN = "rabbitmq_consistent_hash_exchange"

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1
_HCONST = 0x9E3779B9  # the golden ratio, lookup2's initial a and b
_HCONST_3 = (_HCONST * 3) & _M32  # make_hash2's constant for an atom inside a term
_HCONST_9 = (_HCONST * 9) & _M32  # ... for a tuple's arity
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
    return _hash2_binary(data, 0) & _PHASH2_RANGE


def _uint32_hash(x: int, aconst: int, h: int) -> int:
    """make_hash2's ``UINT32_HASH(x, AConst)``: mixes ``x`` into the running hash ``h``."""
    return _mix((aconst + x) & _M32, aconst, h)[2]


def _atom_hash(name: str) -> int:
    """The atom table's hash of an atom (hashpjw over its latin-1 text)."""
    h = 0
    for v in name.encode("latin-1"):
        h = ((h << 4) + v) & _M32
        g = h & 0xF0000000
        if g:
            h ^= g >> 24
            h ^= g
    return h


def phash2_tagged(tag: str, data: bytes) -> int:
    """``erlang:phash2({Tag, Data})`` for an atom ``Tag`` and a binary ``Data``."""
    h = _uint32_hash(2, _HCONST_9, 0)  # the tuple's arity
    h = _uint32_hash(_atom_hash(tag), _HCONST_3, h)  # element 1, then element 2
    return _hash2_binary(data, h) & _PHASH2_RANGE


def _hash2_binary(data: bytes, h: int) -> int:
    """make_hash2 of a binary reached with running hash ``h`` (0 for a binary alone)."""
    if not data:
        return (_HCONST_13 + h) & _M32
    a = b = _HCONST
    c = (_HCONST_13 + h) & _M32
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
    return _mix(a, b, c)[2]


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


@functools.lru_cache(maxsize=16)
def header_hash_typed(broker_version: str | None) -> bool:
    """Whether a broker of this version hashes a header's typed value (up to 3.12) rather
    than the value alone (3.13 and later). An unknown version counts as current."""
    numbers = []
    for part in (broker_version or "").split("+")[0].split("-")[0].split(".")[:2]:
        if not part.isdigit():
            return False
        numbers.append(int(part))
    return len(numbers) == 2 and tuple(numbers) < (3, 13)


def chx_header_bucket(value: object, buckets: int, *, typed: bool = True) -> int | None:
    """The bucket the consistent-hash exchange picks for a message whose ``hash-header`` has
    this decoded value (:mod:`bridge.amqp.frames`: ``str`` or non-UTF-8 ``bytes`` for a long
    string, ``bytearray`` for a byte array); None for another type (not computed here).
    ``typed``: the broker hashes the typed value (see :func:`header_hash_typed`)."""
    if isinstance(value, bytearray):
        tag, data = "binary", bytes(value)
    elif isinstance(value, str):
        tag, data = "longstr", value.encode("utf-8")
    elif isinstance(value, bytes):
        tag, data = "longstr", value
    else:
        return None
    key = phash2_tagged(tag, data) if typed else phash2_binary(data)
    return jump_consistent_hash(key, buckets)


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

    def owner_hint(self, worker: str) -> str:
        """What to change when another process owns this shard's queue (one log line)."""
        prefix = f"BRIDGE_{worker.upper()}__"
        if not self.sharded:
            return (
                f"two unsharded {worker} workers share this broker: stop one, or shard them "
                f"({prefix}SHARD_COUNT=N and a distinct {prefix}SHARD_INDEX on each)"
            )
        return (
            f"shard {self.index} of {self.count} runs twice: give each replica its own "
            f"{prefix}SHARD_INDEX (0..{self.count - 1}) and the same {prefix}SHARD_COUNT"
        )


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
