"""CPU of encoding one DATA publish: pamqp against bridge.amqp frames, in this process."""

from __future__ import annotations

import time
from typing import Any

from bench.gateway.clients import PAYLOAD
from bench.harness.report import progress
from bench.harness.stats import rnd


def publish_encoding(count: int = 20_000) -> dict[str, Any]:
    """CPU of encoding one DATA publish, in this process, same inputs: pamqp (what aiormq
    does per message, the baseline) against bridge.amqp as the gateway uses it: the
    session's properties encoded once (``frames.Properties.encode``, kept in the session),
    the ``basic.publish`` frame cached per routing key (as the Publisher does), and
    ``frames.content_frames`` per message."""
    from aiormq.abc import ChannelFrame
    from pamqp.body import ContentBody
    from pamqp.commands import Basic
    from pamqp.header import ContentHeader

    from bridge.amqp import frames

    fields: dict[str, Any] = {
        "headers": {
            "x-event": "data",
            "x-session": "0123456789abcdef0123456789abcdef",
            "x-client-id": "",
            "x-client-addr": "127.0.0.1:40000",
            "x-gateway": "host-1234",
        },
        "reply_to": "gateway.reply.host-1234",
        "delivery_mode": 2,
    }
    rk = "gateway.server.s1"
    started = time.perf_counter()
    for _ in range(count):
        properties = Basic.Properties(**fields)
        pamqp_frames: list[Any] = [
            Basic.Publish(exchange="", routing_key=rk, mandatory=True),
            ContentHeader(properties=properties, body_size=len(PAYLOAD)),
            ContentBody(PAYLOAD),
        ]
        ChannelFrame.marshall(channel_number=1, frames=pamqp_frames)
    pamqp_s = time.perf_counter() - started
    prepared = frames.Properties(**fields).encode()
    methods: dict[tuple[str, str, bool], bytes] = {}
    started = time.perf_counter()
    for _ in range(count):
        key = ("", rk, True)
        method = methods.get(key)
        if method is None:
            method = methods[key] = frames.publish_frame(1, "", rk, True)
        b"".join((method, frames.content_frames(1, prepared, PAYLOAD, 131072)))
    prepared_s = time.perf_counter() - started
    result = {
        "publishes": count,
        "pamqp_us_per_publish": rnd(pamqp_s / count * 1e6, 1),
        "prepared_us_per_publish": rnd(prepared_s / count * 1e6, 1),
        "prepared_vs_pamqp": rnd(prepared_s / pamqp_s, 3),
    }
    progress("publish_encoding", result)
    return result
