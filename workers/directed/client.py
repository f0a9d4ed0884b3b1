"""A small client for the directed contract (used by the CLI helpers, tests and benchmarks).

Replies come back through RabbitMQ's direct reply-to (``amq.rabbitmq.reply-to``), so a
client needs no queue of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from bridge.rpc import WorkerClient, add_timeout_option
from workers.directed.config import (
    ENVELOPE_CONTENT_TYPE,
    H_TARGET_GROUPS,
    H_TARGETS,
    H_TTL,
    DirectedSettings,
)

HEADER_TARGET_LIMIT = 2000  # larger lists go in an envelope body (AMQP headers must fit one frame)


class DirectedClient(WorkerClient):
    worker = "directed"

    def __init__(
        self, connection: AbstractRobustConnection, settings: DirectedSettings | None = None
    ) -> None:
        super().__init__(connection)
        self.settings = settings or DirectedSettings()

    async def send(
        self,
        body: bytes,
        targets: list[str],
        *,
        message_id: str | None = None,
        ttl_ms: int | None = None,
        content_type: str | None = None,
        headers: dict[str, Any] | None = None,
        groups: list[str] | None = None,
    ) -> None:
        """Publish a request (confirmed by the broker; the worker applies it asynchronously);
        ``groups``: named target groups, resolved by the worker when it accepts the request."""
        assert self._channel is not None
        if groups:
            headers = {**(headers or {}), H_TARGET_GROUPS: list(groups)}
        if len(targets) <= HEADER_TARGET_LIMIT:
            hdrs: dict[str, Any] = dict(headers or {})
            hdrs[H_TARGETS] = list(targets)
            if ttl_ms is not None:
                hdrs[H_TTL] = ttl_ms
            message = aio_pika.Message(
                body,
                headers=hdrs,
                message_id=message_id,
                content_type=content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
        else:
            envelope: dict[str, Any] = {
                "targets": list(targets),
                "body": base64.b64encode(body).decode("ascii"),
                "content_type": content_type,
                "headers": headers or {},
            }
            if ttl_ms is not None:
                envelope["ttl_ms"] = ttl_ms
            message = aio_pika.Message(
                json.dumps(envelope).encode(),
                content_type=ENVELOPE_CONTENT_TYPE,
                message_id=message_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
        await self.publish(self.settings.requests_exchange, message, routing_key="")

    async def _call(
        self, exchange_name: str, routing_key: str, doc: Any, timeout: float
    ) -> dict[str, Any]:
        return await self.rpc.call(exchange_name, routing_key, doc, timeout)

    async def pull(
        self,
        topic: str,
        record_id: str | None = None,
        max: int = 10,
        wait_ms: int = 0,
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        doc = {"topic": topic, "record_id": record_id, "max": max, "wait_ms": wait_ms}
        return await self._call(self.settings.pull_exchange, topic, doc, timeout + wait_ms / 1000)

    async def raw_pull(
        self, body: bytes | Any, routing_key: str, timeout: float = 10.0
    ) -> dict[str, Any]:
        return await self._call(self.settings.pull_exchange, routing_key, body, timeout)

    async def status(self, message_id: str, timeout: float = 10.0) -> dict[str, Any]:
        return await self._call(
            self.settings.control_exchange, "", {"op": "status", "message_id": message_id}, timeout
        )

    async def group(
        self, op: str, group: str, targets: list[str] | None = None, timeout: float = 10.0
    ) -> dict[str, Any]:
        """``op``: group_set, group_add, group_remove (with ``targets``) or group_get."""
        doc: dict[str, Any] = {"op": op, "group": group}
        if targets is not None:
            doc["targets"] = targets
        return await self._call(self.settings.control_exchange, "", doc, timeout)

    async def target_status(self, target: str, timeout: float = 10.0) -> dict[str, Any]:
        """What ``target`` has queued, holds unacknowledged, and missed (``missed``)."""
        return await self._call(
            self.settings.control_exchange, "", {"op": "status", "target": target}, timeout
        )

    async def control(self, doc: Any, timeout: float = 10.0) -> dict[str, Any]:
        return await self._call(self.settings.control_exchange, "", doc, timeout)


def decode_messages(reply: dict[str, Any]) -> list[tuple[str, bytes]]:
    return [(m["id"], base64.b64decode(m["body"])) for m in reply.get("messages", [])]


# -- CLI helpers --------------------------------------------------------------------------


async def _with_client(fn: Any) -> int:
    from bridge.amqp import connect_once
    from bridge.settings import load_host_settings, load_settings

    settings = load_settings(DirectedSettings)
    conn = await connect_once(load_host_settings().amqp_url)
    try:
        client = await DirectedClient(conn, settings).open()
        return int(await fn(client) or 0)
    finally:
        await conn.close()


def _cmd_send(args: argparse.Namespace) -> int:
    targets = [t for t in args.to.split(",") if t]

    async def go(client: DirectedClient) -> int:
        await client.send(
            args.body.encode(), targets, message_id=args.message_id, ttl_ms=args.ttl_ms
        )
        print(json.dumps({"sent": True, "targets": len(targets), "message_id": args.message_id}))
        return 0

    return asyncio.run(_with_client(go))


def _cmd_pull(args: argparse.Namespace) -> int:
    async def go(client: DirectedClient) -> int:
        reply = await client.pull(
            args.target, args.record_id, args.max, args.wait_ms, timeout=args.timeout
        )
        if args.ack and reply.get("record_id"):
            await client.pull(args.target, reply["record_id"], 0, timeout=args.timeout)
        for m in reply.get("messages", []):
            m["body_text"] = base64.b64decode(m["body"]).decode("utf-8", "replace")
        print(json.dumps(reply, indent=1))
        return 1 if "error" in reply else 0

    return asyncio.run(_with_client(go))


def _cmd_status(args: argparse.Namespace) -> int:
    async def go(client: DirectedClient) -> int:
        reply = await client.status(args.message_id, timeout=args.timeout)
        print(json.dumps(reply, indent=1))
        return 1 if "error" in reply else 0

    return asyncio.run(_with_client(go))


def add_commands(sub: Any) -> None:
    parser = sub.add_parser("directed", help="client helpers for the directed worker")
    cmds = parser.add_subparsers(dest="directed_command", metavar="ACTION", required=True)
    send = cmds.add_parser("send", help="publish one message to a list of targets")
    send.add_argument("--to", required=True, help="comma-separated target names")
    send.add_argument("--message-id", help="id for de-duplication and status queries")
    send.add_argument("--ttl-ms", type=int, help="how long the content waits for its targets")
    send.add_argument("body", help="message body (text)")
    send.set_defaults(func=_cmd_send)
    pull = cmds.add_parser(
        "pull",
        help="pull as a target; the batch stays unacknowledged (and comes again) unless --ack "
        "or the next pull names its record id",
    )
    pull.add_argument("target")
    pull.add_argument("--record-id", help="record id from the previous reply (acknowledges it)")
    pull.add_argument("--max", type=int, default=10)
    pull.add_argument("--wait-ms", type=int, default=0)
    pull.add_argument("--ack", action="store_true", help="acknowledge the batch right away")
    add_timeout_option(pull)
    pull.set_defaults(func=_cmd_pull)
    status = cmds.add_parser("status", help="acknowledged / pending / expired counts of a message")
    status.add_argument("message_id")
    add_timeout_option(status)
    status.set_defaults(func=_cmd_status)
