"""The ``directed`` part of ``rabbitmq-bridge demo``: one message to five targets, pulled by
each, acknowledged with the record id, and one batch sent again to a target that pulls with
a wrong record id."""

from __future__ import annotations

import asyncio
from typing import Any

from bridge.demo import FlowResult, Tour
from workers.directed.client import DirectedClient, decode_messages
from workers.directed.config import DirectedSettings
from workers.directed.worker import DirectedWorker

TARGETS = [f"cdn-{i}" for i in range(1, 6)]  # the targets of the one message
RESEND_TARGET = TARGETS[-1]  # the target that pulls with a wrong record id


class DirectedDemo:
    flow = "directed"
    order = 10

    def __init__(self, prefix: str) -> None:
        p = self.prefix = prefix
        self.settings = DirectedSettings(
            requests_exchange=f"{p}.directed.requests",
            requests_queue=f"{p}.directed.requests",
            pull_exchange=f"{p}.directed.pull",
            pull_queue=f"{p}.directed.pull",
            control_exchange=f"{p}.directed.control",
            control_queue=f"{p}.directed.control",
            dead_exchange=f"{p}.directed.dead",
            dead_queue=f"{p}.directed.dead",
            queue_limit=50,
            overflow="drop-head",
            max_batch=100,
            housekeeping_interval_s=0.2,
        )
        self.worker = DirectedWorker(self.settings)

    def names(self) -> list[tuple[str, str]]:
        s = self.settings
        return [
            ("exchange", s.requests_exchange),
            ("exchange", s.pull_exchange),
            ("exchange", s.control_exchange),
            ("exchange", s.dead_exchange),
            ("queue", s.requests_queue),
            ("queue", s.pull_queue),
            ("queue", s.control_queue),
            ("queue", s.dead_queue),
        ]

    async def run(self, tour: Tour, result: FlowResult) -> None:
        say = tour.say
        client = await DirectedClient(tour.connection, self.settings).open()
        tour.cleanups.append(client.close)
        message_id = f"{self.prefix}-purge-1"
        body = b"purge /img/logo.png"
        result.what = f"1 message to {len(TARGETS)} targets, pulled by each, 1 resend"
        say(
            "directed",
            f"publish {body.decode()!r} once to {len(TARGETS)} targets: {', '.join(TARGETS)}",
        )
        await client.send(body, TARGETS, message_id=message_id)
        status = await _wait_status(client, message_id)
        say("directed", f"status: {_status_text(status)} (content stored once)")

        records: dict[str, str] = {}
        for target in TARGETS:
            reply = await client.pull(target, None, max=10)
            got = decode_messages(reply)
            if got != [(message_id, body)] or not reply.get("record_id"):
                raise AssertionError(f"{target} pulled {reply}")
            records[target] = reply["record_id"]
            say("directed", f"{target} pulled {len(got)} message, record id {reply['record_id']}")

        for target in TARGETS[:-1]:
            reply = await client.pull(target, records[target], max=0)
            if "error" in reply:
                raise AssertionError(f"{target} ack: {reply}")
        say("directed", f"{', '.join(TARGETS[:-1])} acknowledged (pull max 0 with their record id)")
        say("directed", f"status: {_status_text((await client.status(message_id))['status'])}")

        reply = await client.pull(RESEND_TARGET, "not-the-record-id", max=10)
        resent = decode_messages(reply)
        same = reply.get("record_id") == records[RESEND_TARGET] and resent == [(message_id, body)]
        say(
            "directed",
            f"{RESEND_TARGET} pulls with a wrong record id: the same batch again, "
            f"redelivered: {str(reply.get('redelivered')).lower()}, "
            f"{'same' if same else 'DIFFERENT'} record id",
        )
        if not (reply.get("redelivered") is True and same):
            raise AssertionError(f"expected the batch resent: {reply}")
        reply = await client.pull(RESEND_TARGET, records[RESEND_TARGET], max=0)
        if "error" in reply:
            raise AssertionError(f"{RESEND_TARGET} ack: {reply}")
        say("directed", f"{RESEND_TARGET} acknowledged")
        final = (await client.status(message_id))["status"]
        say("directed", f"status: {_status_text(final)}")
        result.figures = (
            f"acked {final['acked']}/{final['total']}, pending {final['pending']}, 1 redelivery"
        )
        if not (
            final["acked"] == len(TARGETS) and final["pending"] == 0 and final["state"] == "done"
        ):
            raise AssertionError(f"final status {final}")
        result.ok = True


async def _wait_status(client: DirectedClient, message_id: str) -> dict[str, Any]:
    for _ in range(200):
        reply = await client.status(message_id)
        if "status" in reply:
            return dict(reply["status"])
        await asyncio.sleep(0.05)
    raise AssertionError(f"the worker did not apply {message_id}")


def _status_text(s: dict[str, Any]) -> str:
    return f"total {s['total']}, acked {s['acked']}, pending {s['pending']}, state {s['state']}"
