"""A small client for the delay contract (used by the CLI helpers, tests and benchmarks).

Publishing needs nothing from this module: any AMQP client publishes to ``delay.in`` with
``x-delay`` (or ``x-deliver-at``) and ``x-target-exchange``. The control RPC replies come
back through RabbitMQ's direct reply-to (``amq.rabbitmq.reply-to``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from typing import Any

import aio_pika
import aio_pika.exceptions
from aio_pika.abc import AbstractRobustConnection

from bridge.errors import InvalidRequest
from bridge.rpc import WorkerClient, add_timeout_option
from workers.delay.config import DelaySettings
from workers.delay.wire import (
    X_DELAY,
    X_DELAY_KEY,
    X_DELIVER_AT,
    X_TARGET_EXCHANGE,
    Reject,
    parse_ingress,
)


class DelayClient(WorkerClient):
    worker = "delay"

    def __init__(
        self, connection: AbstractRobustConnection, settings: DelaySettings | None = None
    ) -> None:
        super().__init__(connection)
        self.settings = settings or DelaySettings()

    async def send(
        self,
        body: bytes,
        target: str | None,
        *,
        delay_ms: int | None = None,
        deliver_at_ms: int | None = None,
        key: str | None = None,
        routing_key: str = "",
        message_id: str | None = None,
        headers: dict[str, Any] | None = None,
        **properties: Any,
    ) -> None:
        """Publish one delayed message (confirmed by the broker into ``delay.in``).

        What the worker would dead-letter at once (a negative delay, no target, beyond the
        horizon of these settings, ...) raises :class:`InvalidRequest` instead: the worker's
        own check (:func:`workers.delay.wire.parse_ingress`) runs here first."""
        assert self._channel is not None
        hdrs: dict[str, Any] = dict(headers or {})
        if delay_ms is not None:
            hdrs[X_DELAY] = delay_ms
        if deliver_at_ms is not None:
            hdrs[X_DELIVER_AT] = deliver_at_ms
        if target is not None:
            hdrs[X_TARGET_EXCHANGE] = target
        if key is not None:
            hdrs[X_DELAY_KEY] = key
        decision = parse_ingress(
            hdrs,
            int(time.time() * 1000),
            horizon_ms=self.settings.horizon_ms,
            default_target=self.settings.default_target,
        )
        if isinstance(decision, Reject):
            raise InvalidRequest(
                f"the delay worker would refuse this ({decision.reason}): {decision.detail}"
            )
        properties.setdefault("delivery_mode", aio_pika.DeliveryMode.PERSISTENT)
        await self.publish(
            self.settings.in_exchange,
            aio_pika.Message(body, headers=hdrs, message_id=message_id, **properties),
            routing_key=routing_key,
        )

    async def control(self, doc: Any, timeout: float = 10.0) -> dict[str, Any]:
        return await self.rpc.call(self.settings.control_exchange, "", doc, timeout)

    async def cancel(
        self, *, message_id: str | None = None, key: str | None = None, timeout: float = 10.0
    ) -> dict[str, Any]:
        doc: dict[str, Any] = {"op": "cancel"}
        if message_id is not None:
            doc["message_id"] = message_id
        if key is not None:
            doc["key"] = key
        return await self.control(doc, timeout)

    async def counts(self, timeout: float = 10.0) -> dict[str, Any]:
        return await self.control({"op": "counts"}, timeout)

    async def list(
        self, topic: str, *, limit: int = 100, after: str | None = None, timeout: float = 10.0
    ) -> dict[str, Any]:
        return await self.control(
            {"op": "list", "topic": topic, "limit": limit, "after": after}, timeout
        )


# -- CLI helpers --------------------------------------------------------------------------


async def _with_client(fn: Any) -> int:
    from bridge.amqp import connect_once
    from bridge.settings import load_host_settings, load_settings

    settings = load_settings(DelaySettings)
    conn = await connect_once(load_host_settings().amqp_url)
    try:
        client = await DelayClient(conn, settings).open()
        return int(await fn(client) or 0)
    finally:
        await conn.close()


def _cmd_send(args: argparse.Namespace) -> int:
    if (args.delay_ms is None) == (args.at_ms is None):
        raise SystemExit("rabbitmq-bridge delay send: give exactly one of --delay-ms and --at-ms")

    async def go(client: DelayClient) -> int:
        message_id = args.message_id or uuid.uuid4().hex
        await client.send(
            args.body.encode(),
            args.to,
            delay_ms=args.delay_ms,
            deliver_at_ms=args.at_ms,
            key=args.key,
            routing_key=args.routing_key,
            message_id=message_id,
        )
        due = args.at_ms if args.at_ms is not None else int(time.time() * 1000) + args.delay_ms
        print(json.dumps({"sent": True, "message_id": message_id, "due_ms": due}))
        return 0

    return asyncio.run(_with_client(go))


def _print_reply(reply: dict[str, Any]) -> int:
    print(json.dumps(reply, indent=1))
    return 1 if "error" in reply else 0


def _cmd_counts(args: argparse.Namespace) -> int:
    async def go(client: DelayClient) -> int:
        return _print_reply(await client.counts(timeout=args.timeout))

    return asyncio.run(_with_client(go))


def _cmd_cancel(args: argparse.Namespace) -> int:
    if (args.message_id is None) == (args.key is None):
        raise SystemExit("rabbitmq-bridge delay cancel: give exactly one of --message-id and --key")

    async def go(client: DelayClient) -> int:
        return _print_reply(
            await client.cancel(message_id=args.message_id, key=args.key, timeout=args.timeout)
        )

    return asyncio.run(_with_client(go))


def _cmd_list(args: argparse.Namespace) -> int:
    async def go(client: DelayClient) -> int:
        return _print_reply(
            await client.list(args.topic, limit=args.limit, after=args.after, timeout=args.timeout)
        )

    return asyncio.run(_with_client(go))


def _cmd_watch(args: argparse.Namespace) -> int:
    """Print what arrives at an exchange: a queue of this command's own (exclusive, deleted
    when it exits) bound with the routing-key pattern; one JSON line per message."""

    async def go(client: DelayClient) -> int:
        channel = await client.connection.channel()
        try:
            exchange = await channel.get_exchange(args.exchange, ensure=True)
        except aio_pika.exceptions.ChannelNotFoundEntity as exc:
            raise InvalidRequest(f"exchange {args.exchange!r} does not exist") from exc
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key=args.routing_key)
        print(
            f"watching {args.exchange} ({args.routing_key}); Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        seen = 0
        async with queue.iterator(no_ack=True) as messages:
            async for message in messages:
                doc = {
                    "routing_key": message.routing_key,
                    "message_id": message.message_id,
                    "body": message.body.decode("utf-8", "replace"),
                    "received_ms": int(time.time() * 1000),
                }
                print(json.dumps(doc), flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    break
        return 0

    try:
        return asyncio.run(_with_client(go))
    except KeyboardInterrupt:
        return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    from bridge.amqp import connect_once
    from bridge.settings import load_host_settings, load_settings
    from workers.delay.migrate import migrate

    async def go() -> int:
        url = load_host_settings().amqp_url
        conn = await connect_once(url)
        try:
            await migrate(
                conn,
                url,
                load_settings(DelaySettings),
                args.exchange,
                rabbitmqctl=args.rabbitmqctl,
                dry_run=args.dry_run,
                wait_s=args.wait,
                out=lambda line: print(line, flush=True),
            )
            return 0
        finally:
            await conn.close()

    return asyncio.run(go())


def add_commands(sub: Any) -> None:
    parser = sub.add_parser("delay", help="client helpers for the delay worker")
    cmds = parser.add_subparsers(dest="delay_command", metavar="ACTION", required=True)
    send = cmds.add_parser("send", help="publish one delayed message")
    send.add_argument("--to", help="target exchange (x-target-exchange)")
    send.add_argument("--delay-ms", type=int, help="delay in milliseconds (x-delay)")
    send.add_argument("--at-ms", type=int, help="absolute due time, epoch ms (x-deliver-at)")
    send.add_argument("--key", help="x-delay-key: replaces a pending message with this key")
    send.add_argument("--routing-key", default="", help="kept when the message is delivered")
    send.add_argument("--message-id", help="message id (default: a random one, printed)")
    send.add_argument("body", help="message body (text)")
    send.set_defaults(func=_cmd_send)
    counts = cmds.add_parser("counts", help="pending messages and next due time per topic")
    add_timeout_option(counts)
    counts.set_defaults(func=_cmd_counts)
    cancel = cmds.add_parser("cancel", help="cancel a pending message by id or key")
    cancel.add_argument("--message-id")
    cancel.add_argument("--key")
    add_timeout_option(cancel)
    cancel.set_defaults(func=_cmd_cancel)
    lst = cmds.add_parser("list", help="pending messages of a topic, paged")
    lst.add_argument("topic", help="a topic as counts names it (by default its target exchange)")
    lst.add_argument("--limit", type=int, default=20)
    lst.add_argument("--after", help="cursor ('next' of the previous page)")
    add_timeout_option(lst)
    lst.set_defaults(func=_cmd_list)
    watch = cmds.add_parser(
        "watch", help="print the messages that arrive at an exchange (to see deliveries)"
    )
    watch.add_argument("exchange", help="the exchange to watch, e.g. a target exchange")
    watch.add_argument("routing_key", nargs="?", default="#", help="binding key (default '#')")
    watch.add_argument("--count", type=int, default=0, help="exit after N messages")
    watch.set_defaults(func=_cmd_watch)
    from workers.delay.migrate import add_migrate_command

    add_migrate_command(cmds, _cmd_migrate)
