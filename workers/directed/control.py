"""The control RPC of the directed worker on ``directed.control``: status (of a message or of
a target), recall, pending targets, stats and the target groups.

Queries are JSON objects with ``reply_to`` (:mod:`~workers.directed.queries` parses them);
each ``op`` has one handler in :attr:`ControlServer.ops`, whose answer is sent under its
reply key (``{"status": ...}``, ``{"group": ...}``, ...), or an error reply. A recall or a
group change is answered after its commit.

Sharded workers: a query on the shared control queue is answered by whichever shard takes it;
it asks the other shards on ``<control_queue>.shard-<i>`` (``"local": true``) and merges their
answers (:mod:`~workers.directed.queries`); a target's status comes from the shard that owns it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from bridge.amqp.frames import Delivery
from bridge.amqp.messages import DeadLetters, reply
from bridge.amqp.publisher import Publisher
from bridge.errors import NoAnswer, WireError, encode_error
from bridge.rpc import RpcClient
from bridge.sharding import Shard, shard_queue
from workers.directed import queries, wire
from workers.directed.config import DirectedSettings
from workers.directed.ledger import Ledger, now_ms
from workers.directed.replies import json_dumps

# (the query, whether this shard answers alone) -> the answer
Handler = Callable[[dict[str, Any], bool], Awaitable[Any]]


class ControlServer:
    def __init__(
        self,
        ledger: Ledger,
        settings: DirectedSettings,
        shard: Shard,
        *,
        rpc: RpcClient | None,
        replies: Publisher,
        dead: DeadLetters,
    ) -> None:
        self.ledger = ledger
        self.settings = settings
        self.shard = shard
        self.rpc = rpc  # sharded: asks the other shards
        self.replies = replies
        self.dead = dead
        # op -> (the key the answer is sent under, its handler)
        self.ops: dict[str, tuple[str, Handler]] = {
            "status": ("status", self._status),
            "recall": ("status", self._recall),
            "pending_targets": ("pending_targets", self._pending_targets),
            "stats": ("stats", self._stats),
            **dict.fromkeys(queries.GROUP_OPS, ("group", self._group)),
        }

    async def on_delivery(self, message: Delivery) -> None:
        if not message.reply_to:
            await self.dead.reject(message, "missing_reply_to", "a control query needs reply_to")
            return
        try:
            doc = wire.parse_json_object(message.body, self.settings)
            op = doc.get("op")
            found = self.ops.get(op) if isinstance(op, str) else None
            if found is None:
                raise WireError("unknown_op", f"op must be {self._one_of()}")
            key, handler = found
            local = doc.get("local") is True or not self.shard.sharded
            body = json_dumps({key: await handler(doc, local)})
        except WireError as exc:
            body = encode_error(exc.code, exc.message)
        reply(self.replies, message, body)

    def _one_of(self) -> str:
        plain = [op for op in self.ops if op not in queries.GROUP_OPS]
        return (
            ", ".join(repr(op) for op in plain)
            + " or "
            + ", ".join(repr(op) for op in queries.GROUP_OPS)
        )

    # -- the ops -----------------------------------------------------------------------

    async def _status(self, doc: dict[str, Any], local: bool) -> dict[str, Any]:
        if "target" in doc:
            return await self._target_status(doc, local)
        message_id = queries.message_id_of(doc)
        own = self.ledger.core.status(message_id)
        return await self._message_status(doc, message_id, own, local)

    async def _recall(self, doc: dict[str, Any], local: bool) -> dict[str, Any]:
        message_id = queries.message_id_of(doc, max_length=255)
        own = self.ledger.core.recall(message_id, now_ms())
        await self.ledger.committed()  # the recall is durable before it is confirmed
        return await self._message_status(doc, message_id, own, local)

    async def _message_status(
        self, doc: dict[str, Any], message_id: str, own: Any, local: bool
    ) -> dict[str, Any]:
        status = dict(own) if own is not None else None
        if not local:
            replies, missing = await self._ask_shards(doc)
            parts = [status] if status is not None else []
            parts += [r["status"] for r in replies if isinstance(r.get("status"), dict)]
            status = queries.total_status(parts, missing)
        if status is None:
            raise queries.not_found(message_id)
        return status

    async def _target_status(self, doc: dict[str, Any], local: bool) -> dict[str, Any]:
        """What one target has: backlog, unacknowledged batch, the gap it has not
        acknowledged; on sharded workers from the shard that owns it."""
        target = doc.get("target")
        if not isinstance(target, str) or not target:
            raise WireError("invalid_query", "'target' must be a non-empty string")
        if local or self.shard.owns(target):
            return self.ledger.core.target_status(target)
        assert self.rpc is not None
        owner = self.shard.owner(target)
        queue = shard_queue(self.settings.control_queue, owner)
        timeout = self.settings.shard_query_timeout_s
        try:
            answer = await self.rpc.call("", queue, {**doc, "local": True}, timeout)
        except NoAnswer:
            raise WireError(
                "shards_unavailable",
                f"shard {owner}, which owns {target!r}, did not answer in time: retry later",
            ) from None
        status = answer.get("status")
        if not isinstance(status, dict):
            raise WireError("shards_unavailable", f"shard {owner} answered {answer!r}")
        return status

    async def _group(self, doc: dict[str, Any], local: bool) -> dict[str, Any]:
        """A group change, committed before it is answered and made on every shard (each
        keeps the membership it resolves requests with), or a group's members."""
        change = queries.parse_group_change(doc, self.settings)
        groups = self.ledger.groups
        if change.op == "group_get":
            members = groups.get(change.group)
            if members is None:
                raise WireError("not_found", f"no target group {change.group!r}")
            return {"group": change.group, "targets": members}
        apply = {"group_set": groups.set, "group_add": groups.add}
        members = apply.get(change.op, groups.remove)(change.group, change.targets)
        self.ledger.group_changed(change.group, members)
        await self.ledger.committed()
        if not local:
            _, missing = await self._ask_shards(doc)
            if missing:
                raise WireError(
                    "shards_unavailable",
                    f"the change is made on the shards that answered, not on shards {missing}: "
                    "repeat it (changes are idempotent)",
                )
        return {"group": change.group, "targets": members or []}

    async def _pending_targets(self, doc: dict[str, Any], local: bool) -> dict[str, Any]:
        """One page of the targets that have not acknowledged a message, in name order; on
        sharded workers every shard's page merged."""
        query = queries.parse_pending_targets(doc)
        own = self.ledger.core.pending_targets(query.message_id, query.cursor, query.limit)
        if local:
            return queries.pending_page(query, own)
        replies, missing = await self._ask_shards(doc)
        if missing:
            raise WireError(
                "shards_unavailable",
                f"shards {missing} did not answer in time: the page would be incomplete; "
                "retry later",
            )
        return queries.pending_page(query, own, replies)

    async def _stats(self, doc: dict[str, Any], local: bool) -> dict[str, Any]:
        stats = self.ledger.summary()
        if local:
            return stats
        replies, missing = await self._ask_shards(doc)
        parts = [stats] + [r["stats"] for r in replies if isinstance(r.get("stats"), dict)]
        return queries.total_stats(parts, missing)

    # -- the other shards --------------------------------------------------------------

    async def _ask_shards(self, doc: dict[str, Any]) -> tuple[list[dict[str, Any]], list[int]]:
        """Ask every other shard the same query (``local``); their replies and who was silent."""
        assert self.rpc is not None
        rpc = self.rpc
        others = [i for i in range(self.shard.count) if i != self.shard.index]
        query = {**doc, "local": True}
        timeout = self.settings.shard_query_timeout_s
        answers = await asyncio.gather(
            *(
                rpc.call("", shard_queue(self.settings.control_queue, i), query, timeout)
                for i in others
            ),
            return_exceptions=True,
        )
        replies, missing = [], []
        for i, answer in zip(others, answers, strict=True):
            if isinstance(answer, dict):
                replies.append(answer)
            else:
                missing.append(i)
        return replies, missing
