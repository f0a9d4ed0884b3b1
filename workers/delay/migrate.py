"""``rabbitmq-bridge delay migrate X``: the delay worker takes over the name of a
delayed-message plugin exchange ``X``; producers and consumers change nothing.

Producers keep publishing to ``X`` with ``x-delay``; after the swap ``X`` is the worker's
ingress (a durable topic exchange bound ``#`` to its queue). Consumers keep their queues:
their bindings on ``X`` are copied onto the target ``BRIDGE_DELAY__DEFAULT_TARGET`` (for
example ``X.due``, of ``X``'s ``x-delayed-type``), where the worker delivers. Nothing the
plugin holds is lost: the swap happens only once the plugin holds no message for ``X``
(``--wait`` waits for that), and the count is taken again after ``X`` is deleted: a message
that entered in between puts ``X`` back as it was. Steps: docs/delay.md, "Migrating from
rabbitmq-delayed-message-exchange".

What AMQP cannot tell (an exchange's type and arguments, its bindings, the plugin's count of
delayed messages) is read with ``rabbitmqctl`` (``--rabbitmqctl``: any command line that
reaches the broker's node, e.g. ``kubectl exec rabbitmq-0 -- rabbitmqctl``); every change is
made over AMQP. The management plugin is not needed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import aio_pika.exceptions
from aio_pika.abc import AbstractRobustConnection

from bridge.amqp import (
    DELAYED_MESSAGE_TYPE,
    check_exchanges,
    close_channels,
    declare_quorum_queue,
)
from bridge.errors import InvalidRequest
from workers.delay.config import DelaySettings

DELAYED_TYPE_ARG = "x-delayed-type"


@dataclass(frozen=True)
class Binding:
    source: str
    destination: str
    kind: str  # "queue" or "exchange" (the destination's)
    routing_key: str
    arguments: dict[str, Any]

    def describe(self) -> str:
        args = f" {self.arguments}" if self.arguments else ""
        return f"{self.source or '(default)'} -> {self.kind} {self.destination} ({self.routing_key!r}{args})"


@dataclass
class Plan:
    """What the broker has and what the migration will do (``--dry-run`` prints ``steps``)."""

    exchange: str
    vhost: str
    delayed_type: str
    durable: bool
    arguments: dict[str, Any]  # of X, x-delayed-type included
    target: str
    target_exists: bool
    in_queue: str
    delayed: int
    outgoing: list[Binding] = field(default_factory=list)  # X -> consumers' queues
    incoming: list[Binding] = field(default_factory=list)  # other exchanges -> X

    @property
    def catch_keys(self) -> list[str]:
        """The keys the worker's queue is bound to X with. ``#`` takes everything producers
        publish to X as a topic exchange. A message the plugin still holds for X when X is
        swapped is routed, when due, over X's bindings of then with X's former type: a topic,
        fanout or headers type reaches the queue through ``#`` too; a direct one only through
        the routing keys X was bound with (a key no binding had was unroutable anyway)."""
        keys = ["#"]
        if self.delayed_type == "direct":
            keys += sorted({b.routing_key for b in self.outgoing} - {"#"})
        return keys

    @property
    def target_arguments(self) -> dict[str, Any]:
        return {k: v for k, v in self.arguments.items() if k != DELAYED_TYPE_ARG}

    def steps(self, wait: bool) -> list[str]:
        x, t = self.exchange, self.target
        copied = [
            f"   {Binding(t, b.destination, b.kind, b.routing_key, b.arguments).describe()}"
            for b in self.outgoing
        ]
        held = f"holds {self.delayed} delayed message(s) for {x} now"
        return [
            f"migrate exchange {x} in vhost {self.vhost} (x-delayed-message, x-delayed-type "
            f"{self.delayed_type}, {'durable' if self.durable else 'transient'}) to the delay "
            f"worker; the plugin {held}",
            f"1. {'keep' if self.target_exists else 'declare'} exchange {t} "
            f"({self.delayed_type}, durable{', ' + str(self.target_arguments) if self.target_arguments else ''})"
            f" and copy {x}'s {len(self.outgoing)} binding(s) onto it:",
            *copied,
            f"2. declare queue {self.in_queue} (quorum) if missing",
            "3. "
            + (
                f"wait until the plugin holds no message for {x}"
                if wait
                else f"check that the plugin holds no message for {x} (else stop: use --wait)"
            ),
            f"4. delete exchange {x} (its bindings go with it: consumers now receive through "
            f"{t}) and at once declare it again (topic, durable), bind queue {self.in_queue} "
            f"to it {', '.join(repr(k) for k in self.catch_keys)}"
            + (
                " and bind again into it: " + "; ".join(b.describe() for b in self.incoming)
                if self.incoming
                else ""
            ),
            f"5. count again: a message the plugin took for {x} after step 3 is routed by it, "
            f"when due, into the new {x}, with the plugin's negative x-delay: the worker "
            f"delivers it at once through {t}",
            f"6. then {self.start()}",
        ]

    def start(self) -> str:
        x = self.exchange
        return (
            f"start the worker with BRIDGE_DELAY__IN_EXCHANGE={x} "
            f"BRIDGE_DELAY__IN_QUEUE={self.in_queue} BRIDGE_DELAY__DEFAULT_TARGET={self.target}: "
            f"what producers publish to {x} meanwhile waits in {self.in_queue}"
        )


class BrokerCli:
    """Reads what AMQP cannot tell through ``rabbitmqctl`` (a command line, split like a shell)."""

    def __init__(self, command: str, vhost: str) -> None:
        self.argv = shlex.split(command)
        self.command = command
        self.vhost = vhost

    def _run(self, *args: str) -> str:
        try:
            out = subprocess.run(
                [*self.argv, *args], capture_output=True, text=True, timeout=120, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise self._refusal(str(exc)) from exc
        if out.returncode != 0:
            lines = [line for line in (out.stderr or out.stdout).splitlines() if line.strip()]
            raise self._refusal(lines[0] if lines else f"exit {out.returncode}")
        return out.stdout

    def _refusal(self, why: str) -> InvalidRequest:
        return InvalidRequest(
            f"delay migrate: `{self.command}` failed ({why}); give --rabbitmqctl a command "
            "that reaches the broker's node, e.g. 'rabbitmqctl -n rabbit@host' or "
            "'kubectl exec rabbitmq-0 -- rabbitmqctl'"
        )

    def _list(self, what: str, *items: str) -> list[dict[str, Any]]:
        text = self._run("-q", what, "-p", self.vhost, *items, "--formatter", "json")
        rows = json.loads(text or "[]")
        return [row for row in rows if isinstance(row, dict)]

    def exchanges(self) -> dict[str, dict[str, Any]]:
        rows = self._list("list_exchanges", "name", "type", "durable", "arguments")
        return {row["name"]: {**row, "arguments": _table(row["arguments"])} for row in rows}

    def bindings(self) -> list[Binding]:
        rows = self._list(
            "list_bindings",
            "source_name",
            "destination_name",
            "destination_kind",
            "routing_key",
            "arguments",
        )
        return [
            Binding(
                r["source_name"],
                r["destination_name"],
                r["destination_kind"],
                r["routing_key"],
                _table(r["arguments"]),
            )
            for r in rows
        ]

    def delayed(self, exchange: str) -> int:
        """The plugin's ``messages_delayed`` for ``exchange`` summed over the running nodes
        (each node holds the messages published through it), counted in its tables so that
        it also works once the exchange is deleted."""
        text = self._run("-q", "eval", delayed_count_expr(self.vhost, exchange)).strip()
        try:
            return int(text)
        except ValueError:
            raise self._refusal(f"counting the plugin's delayed messages gave {text!r}") from None


def delayed_count_expr(vhost: str, exchange: str) -> str:
    """An Erlang expression for ``rabbitmqctl eval``: the delayed-message plugin's entries for
    exchange ``vhost``/``exchange`` on every running node (names passed as bytes)."""
    v = ",".join(str(b) for b in vhost.encode())
    x = ",".join(str(b) for b in exchange.encode())
    return (
        f"N = rabbit_misc:r(list_to_binary([{v}]), exchange, list_to_binary([{x}])), "
        "F = fun({delay_entry, {delay_key, _, X}, _, _}, A) when element(2, X) =:= N -> A + 1;"
        " (_, A) -> A end, "
        "Nodes = try rabbit_nodes:list_running() catch error:undef -> "
        "rabbit_nodes:all_running() end, "
        'R = [rpc:call(Node, ets, foldl, [F, 0, list_to_atom("rabbit_delayed_message" ++ '
        "atom_to_list(Node))]) || Node <- Nodes], "
        "case [E || E <- R, not is_integer(E)] of [] -> lists:sum(R); Bad -> {error, Bad} end."
    )


def _table(raw: Any) -> dict[str, Any]:
    """rabbitmqctl's JSON of an AMQP table (``[[key, type, value], ...]``) as a dict."""
    if isinstance(raw, dict):
        return dict(raw)
    return {row[0]: row[-1] for row in raw or [] if isinstance(row, list) and row}


def vhost_of(url: str) -> str:
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


class Migration:
    """Checks (read-only), then the swap; every refusal is one :class:`InvalidRequest`."""

    def __init__(
        self,
        conn: AbstractRobustConnection,
        url: str,
        settings: DelaySettings,
        cli: BrokerCli,
        out: Any = print,
    ) -> None:
        self.conn = conn
        self.url = url
        self.settings = settings
        self.cli = cli
        self.out = out

    def refuse(self, problem: str) -> InvalidRequest:
        return InvalidRequest(f"delay migrate: {problem}")

    async def plan(self, exchange: str) -> Plan:
        s = self.settings
        x = exchange
        if s.shard_count > 1:
            raise self.refuse(
                f"BRIDGE_DELAY__SHARD_COUNT={s.shard_count}: migrate into one worker "
                "(SHARD_COUNT=1), shard afterwards"
            )
        if s.in_exchange != x:
            raise self.refuse(
                f"BRIDGE_DELAY__IN_EXCHANGE is {s.in_exchange}, not {x}: run it with the "
                f"settings the worker will run with (BRIDGE_DELAY__IN_EXCHANGE={x})"
            )
        if not s.default_target:
            raise self.refuse(
                f"BRIDGE_DELAY__DEFAULT_TARGET is not set: {x}'s producers send no "
                f"x-target-exchange; set it to the exchange that gets {x}'s bindings (e.g. "
                f"{x}.due)"
            )
        if s.default_target == x:
            raise self.refuse(f"BRIDGE_DELAY__DEFAULT_TARGET must name another exchange than {x}")
        if not await self._exists(x):
            raise self.refuse(
                f"exchange {x} does not exist in vhost {self.cli.vhost}: nothing to migrate "
                "(check the name and the vhost of BRIDGE_AMQP_URL)"
            )
        exchanges = self.cli.exchanges()
        found = exchanges.get(x)
        if found is None:
            raise self.refuse(
                f"`{self.cli.command}` does not list exchange {x} in vhost {self.cli.vhost}, "
                "which BRIDGE_AMQP_URL has: it reaches another broker; give --rabbitmqctl the "
                "command for the node of BRIDGE_AMQP_URL"
            )
        if found["type"] != DELAYED_MESSAGE_TYPE:
            done = found["type"] == "topic" and found["durable"]
            raise self.refuse(
                f"exchange {x} is a {found['type']} exchange, not the delayed-message plugin's "
                f"(x-delayed-message): "
                + (
                    "already migrated? start the worker with BRIDGE_DELAY__IN_EXCHANGE=" + x
                    if done
                    else "nothing to migrate"
                )
            )
        delayed_type = str(found["arguments"].get(DELAYED_TYPE_ARG, ""))
        target = exchanges.get(s.default_target)
        if target is not None and target["type"] != delayed_type:
            raise self.refuse(
                f"BRIDGE_DELAY__DEFAULT_TARGET={s.default_target} exists as a "
                f"{target['type']} exchange, and {x} routes as {delayed_type}: delete it or "
                "name another target"
            )
        await self._check_queue()
        await check_exchanges(self.url, _other_exchanges(s))  # the worker's own, one line each
        bindings = self.cli.bindings()
        return Plan(
            exchange=x,
            vhost=self.cli.vhost,
            delayed_type=delayed_type,
            durable=bool(found["durable"]),
            arguments=found["arguments"],
            target=s.default_target,
            target_exists=target is not None,
            in_queue=s.in_queue,
            delayed=self.cli.delayed(x),
            outgoing=[b for b in bindings if b.source == x],
            incoming=[b for b in bindings if b.destination == x and b.kind == "exchange"],
        )

    async def _exists(self, exchange: str) -> bool:
        channel = await self.conn.channel(publisher_confirms=False)
        try:
            await channel.declare_exchange(exchange, passive=True)
            return True
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        finally:
            await close_channels(channel)

    async def _check_queue(self) -> None:
        q = self.settings.in_queue
        channel = await self.conn.channel(publisher_confirms=False)
        try:
            queue = await channel.declare_queue(q, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return
        finally:
            await close_channels(channel)
        consumers = queue.declaration_result.consumer_count
        if consumers:
            raise self.refuse(
                f"queue {q} has {consumers} consumer(s): a delay worker with "
                f"BRIDGE_DELAY__IN_QUEUE={q} runs for another exchange; give this one its own "
                "BRIDGE_DELAY__IN_QUEUE (and control, dead-letter names and state directory)"
            )

    async def wait_drained(self, plan: Plan, wait_s: float | None) -> None:
        """Until the plugin holds nothing for X; refuses at once (``wait_s`` None) or when
        ``wait_s`` passed."""
        deadline = time.monotonic() + (wait_s or 0)
        count = plan.delayed
        while count:
            if wait_s is None or time.monotonic() >= deadline:
                raise self.refuse(
                    f"the plugin still holds {count} delayed message(s) for {plan.exchange}; "
                    "nothing was changed: run again with --wait (it waits until the plugin "
                    "has delivered them; producers that keep delaying must pause meanwhile)"
                )
            await asyncio.sleep(1.0)
            count = await asyncio.to_thread(self.cli.delayed, plan.exchange)
            self.out(f"   the plugin holds {count} delayed message(s) for {plan.exchange}")
        plan.delayed = 0

    async def run(self, plan: Plan, wait_s: float | None) -> None:
        x = plan.exchange
        await self.wait_drained(plan, wait_s)
        channel = await self.conn.channel(publisher_confirms=False)
        try:
            raw = await channel.get_underlay_channel()
            try:
                await channel.declare_exchange(
                    plan.target,
                    plan.delayed_type,
                    durable=True,
                    arguments=plan.target_arguments or None,
                )
                for b in plan.outgoing:
                    await self._bind(raw, plan.target, b)
                self.out(f"1. done: {plan.target} has {x}'s {len(plan.outgoing)} binding(s)")
                await declare_quorum_queue(channel, plan.in_queue)
                self.out(f"2. done: queue {plan.in_queue}")
            except aio_pika.exceptions.AMQPChannelError as exc:  # before anything is deleted
                raise self.refuse(
                    f"the broker refused a declaration ({exc}); {x} was not touched: fix that "
                    "and run again"
                ) from exc
            await self.wait_drained(plan, wait_s)
            self.out(f"3. done: the plugin holds no message for {x}")
            # The swap: each call waits for the broker's answer and nothing runs in between,
            # so X is missing for one round trip and unbound for one more (docs/delay.md).
            started = time.monotonic()
            await raw.exchange_delete(x)
            deleted = time.monotonic()
            await raw.exchange_declare(exchange=x, exchange_type="topic", durable=True)
            declared = time.monotonic()
            for key in plan.catch_keys:
                await raw.queue_bind(queue=plan.in_queue, exchange=x, routing_key=key)
            bound = time.monotonic()
            for b in plan.incoming:
                await self._bind(raw, x, b, as_destination=True)
            keys = ", ".join(repr(k) for k in plan.catch_keys)
            self.out(
                f"4. done: {x} is a topic exchange bound {keys} to {plan.in_queue} (the delete "
                f"took {(deleted - started) * 1000:.1f} ms, {x} was missing for "
                f"{(declared - deleted) * 1000:.1f} ms and unbound for "
                f"{(bound - declared) * 1000:.1f} ms)"
            )
            late = await asyncio.to_thread(self.cli.delayed, x)
            plan.delayed = late
            self.out(
                f"5. done: the plugin holds {late} message(s) for {x}"
                + (
                    f" (taken after step 3): it routes them into {x} when due, and the worker "
                    f"delivers them at once through {plan.target}"
                    if late
                    else ""
                )
            )
        finally:
            await close_channels(channel)

    async def _bind(
        self, raw: Any, exchange: str, b: Binding, as_destination: bool = False
    ) -> None:
        args = b.arguments or None
        if as_destination:  # an exchange that fed X feeds the new X
            await raw.exchange_bind(
                destination=exchange, source=b.source, routing_key=b.routing_key, arguments=args
            )
        elif b.kind == "queue":
            await raw.queue_bind(
                queue=b.destination, exchange=exchange, routing_key=b.routing_key, arguments=args
            )
        else:
            await raw.exchange_bind(
                destination=b.destination,
                source=exchange,
                routing_key=b.routing_key,
                arguments=args,
            )


def _other_exchanges(s: DelaySettings) -> list[tuple[str, str, str]]:
    from workers.delay.worker import DelayWorker

    return [w for w in DelayWorker(s).exchanges() if w[0] != s.in_exchange]


async def migrate(
    conn: AbstractRobustConnection,
    url: str,
    settings: DelaySettings,
    exchange: str,
    *,
    rabbitmqctl: str = "rabbitmqctl",
    dry_run: bool = False,
    wait_s: float | None = None,
    out: Any = print,
) -> Plan:
    migration = Migration(conn, url, settings, BrokerCli(rabbitmqctl, vhost_of(url)), out)
    plan = await migration.plan(exchange)
    if dry_run:  # the steps, then the same refusal the run would give before any change
        for line in plan.steps(wait_s is not None):
            out(line)
    if plan.delayed and wait_s is None:
        await migration.wait_drained(plan, None)
    if not dry_run:
        for line in plan.steps(wait_s is not None):
            out(line)
        await migration.run(plan, wait_s)
        out(f"6. now {plan.start()}")
    return plan


def add_migrate_command(cmds: Any, run: Any) -> None:
    p: argparse.ArgumentParser = cmds.add_parser(
        "migrate",
        help="take over the name of a delayed-message plugin exchange (producers unchanged)",
    )
    p.add_argument("exchange", help="the x-delayed-message exchange (= BRIDGE_DELAY__IN_EXCHANGE)")
    p.add_argument("--dry-run", action="store_true", help="print the steps, change nothing")
    p.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="wait up to SECONDS for the plugin to deliver what it holds for the exchange "
        "(default: refuse while it holds any)",
    )
    p.add_argument(
        "--rabbitmqctl",
        default="rabbitmqctl",
        help="command line reaching the broker's node (default 'rabbitmqctl')",
    )
    p.set_defaults(func=run)
