"""Sharded `delay`: N processes behind RabbitMQ's consistent-hash exchange.

Topology with ``shard_count`` N > 1 (one shard: nothing here is used)::

    delay.in (topic, unchanged for producers)
      └─ '#' ─> delay.in.shards (x-consistent-hash, hash-header x-delay-key)
                  ├─ weight 1 ─> delay.in.shard-0   (shard 0's ingress queue)
                  └─ weight 1 ─> delay.in.shard-1   ...

- ``x-delay-key`` replacement needs every version of a key in one store, in the order the
  broker received them, so the exchange hashes the key: all versions of a key take the same
  path into the same queue. (Forwarding keyed messages from another shard could reorder two
  versions published close together; the exchange's routing cannot.)
- A message without a key hashes as "undefined": the exchange sends all of them to one shard,
  which keeps those whose ``message_id`` it owns (``bridge.sharding.Shard.owner``) and
  forwards the others, confirmed, to their owner's queue before acknowledging them. Their
  relative ``x-delay`` becomes the absolute ``x-deliver-at`` given on arrival, so the hop
  never delays a message; a message without ``message_id`` is given a digest of its routing
  key, headers and body, so a forward repeated after a crash carries the same id.
- A keyed message's owner is the shard the exchange routes its key to when the ring is in
  shard order: the plugin hashes the header's typed value (``{longstr, Key}``), which
  :func:`bridge.sharding.chx_header_bucket` computes exactly. While a reordered ring (a broker
  restart, a re-created binding) is not yet repaired, a keyed message can reach another shard;
  that shard forwards it to the owner, where it replaces the pending version, and schedules a
  ring repair. So two versions of a key are never both delivered; two published within one
  forward hop of each other while the ring is out of order may reach the owner swapped.
- The control RPC on ``delay.control`` is answered by whichever shard takes the request: it
  asks the other shards on ``delay.control.shard-<i>`` (``"local": true``) and merges: a cancel
  cancels wherever the message is, counts add up, and ``list`` merges the shards' pages in
  (due time, shard, mid) order with a cursor that says where each shard stands.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bridge.errors import WireError
from bridge.rpc import RpcClient
from bridge.sharding import Shard, shard_queue
from workers.delay import wire
from workers.delay.config import DelaySettings
from workers.delay.wire import X_DELAY, X_DELAY_KEY, X_DELIVER_AT

if TYPE_CHECKING:
    from aio_pika.abc import AbstractRobustConnection

H_FORWARDED_FROM = "x-forwarded-from"
_AFTER_ALL = 1 << 62  # a mid larger than any: "everything at this due time is behind me"


def chx_arguments() -> dict[str, Any]:
    return {"hash-header": X_DELAY_KEY}


def digest_id(routing_key: str, headers: dict[str, Any] | None, body: bytes) -> str:
    """A stable message_id for a keyless message that has none and must be forwarded."""
    h = hashlib.sha256()
    h.update(routing_key.encode())
    h.update(b"\0")
    h.update(repr(sorted((headers or {}).items(), key=lambda kv: kv[0])).encode())
    h.update(b"\0")
    h.update(body)
    return "sha256:" + h.hexdigest()[:32]


def forwarded_headers(headers: dict[str, Any] | None, due_ms: int, shard: Shard) -> dict[str, Any]:
    """The headers a keyed message is forwarded with: its due time made absolute."""
    out = dict(headers or {})
    out.pop(X_DELAY, None)
    out[X_DELIVER_AT] = due_ms
    out[H_FORWARDED_FROM] = shard.index
    return out


def encode_cursor(due_ms: int, shard: int, mid: int) -> str:
    return f"{due_ms}:{shard}:{mid}"


def decode_cursor(raw: Any) -> tuple[int, int, int] | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        parts = raw.split(":")
        if (
            len(parts) == 3
            and parts[0].lstrip("-").isdigit()
            and all(p.isdigit() for p in parts[1:])
        ):
            return int(parts[0]), int(parts[1]), int(parts[2])
    raise WireError(
        "invalid_request", f"'after' must be a cursor from a sharded reply, got {raw!r:.80}"
    )


def local_after(cursor: tuple[int, int, int] | None, shard: int) -> str | None:
    """Shard ``shard``'s own (due, mid) cursor for the merged cursor (due, cshard, mid):
    the merged order is (due, shard, mid), so a shard before ``cshard`` has shown everything
    due at ``due``, one after it nothing."""
    if cursor is None:
        return None
    due, cshard, mid = cursor
    if shard == cshard:
        return wire.encode_cursor(due, mid)
    return wire.encode_cursor(due, _AFTER_ALL if shard < cshard else 0)


class DelayShards:
    """The cross-shard half of the control RPC (the forwarding lives in the worker)."""

    def __init__(self, shard: Shard, settings: DelaySettings) -> None:
        self.shard = shard
        self.settings = settings
        self.rpc: RpcClient | None = None

    async def open(self, connection: AbstractRobustConnection) -> None:
        self.rpc = await RpcClient(connection, "delay").open()

    async def close(self) -> None:
        if self.rpc is not None:
            await self.rpc.close()

    async def _ask(self, shard: int, doc: dict[str, Any]) -> dict[str, Any] | None:
        assert self.rpc is not None
        try:
            return await self.rpc.call(
                "",
                shard_queue(self.settings.control_queue, shard),
                {**doc, "local": True},
                self.settings.shard_query_timeout_s,
            )
        except (TimeoutError, ValueError):
            return None

    async def gather(
        self, doc: Callable[[int], dict[str, Any]], own: dict[str, Any]
    ) -> tuple[dict[int, dict[str, Any]], list[int]]:
        """Ask every other shard ``doc(shard)``; the replies (``own`` for this shard) and
        the shards that did not answer in time."""
        others = [i for i in range(self.shard.count) if i != self.shard.index]
        answers = await asyncio.gather(*(self._ask(i, doc(i)) for i in others))
        replies = {self.shard.index: own}
        missing = []
        for i, answer in zip(others, answers, strict=True):
            if answer is None or "error" in answer:
                missing.append(i)
            else:
                replies[i] = answer
        return replies, missing

    @staticmethod
    def merge_cancel(replies: dict[int, dict[str, Any]], missing: list[int]) -> dict[str, Any]:
        count = sum(int(r.get("count", 0)) for r in replies.values() if r.get("cancelled"))
        if count:
            out: dict[str, Any] = {"cancelled": True, "count": count}
        else:
            in_flight = any(r.get("state") == "in_flight" for r in replies.values())
            out = {"cancelled": False, "state": "in_flight" if in_flight else "sent_or_unknown"}
        out["shards"] = {"answered": len(replies), "unanswered": missing}
        return out

    @staticmethod
    def merge_counts(replies: dict[int, dict[str, Any]], missing: list[int]) -> dict[str, Any]:
        topics: dict[str, dict[str, Any]] = {}
        for r in replies.values():
            for topic, t in (r.get("topics") or {}).items():
                cur = topics.setdefault(topic, {"pending": 0, "next_due_ms": None})
                cur["pending"] += int(t.get("pending", 0))
                due = t.get("next_due_ms")
                if due is not None and (cur["next_due_ms"] is None or due < cur["next_due_ms"]):
                    cur["next_due_ms"] = due
        return {
            "topics": topics,
            "total": sum(int(r.get("total", 0)) for r in replies.values()),
            "shards": {"answered": len(replies), "unanswered": missing},
        }

    @staticmethod
    def merge_list(
        topic: str, limit: int, replies: dict[int, dict[str, Any]], missing: list[int]
    ) -> dict[str, Any]:
        rows = []
        for shard, r in replies.items():
            for m in r.get("messages") or []:
                rows.append((int(m["due_ms"]), shard, int(m["mid"]), m))
        rows.sort(key=lambda row: row[:3])
        page = rows[:limit]
        messages = [{**m, "shard": shard} for _, shard, _, m in page]
        more = len(rows) > limit or any(r.get("next") for r in replies.values())
        last = page[-1] if page else None
        return {
            "topic": topic,
            "messages": messages,
            "next": encode_cursor(last[0], last[1], last[2]) if last and more else None,
            "shards": {"answered": len(replies), "unanswered": missing},
        }
