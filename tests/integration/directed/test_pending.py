"""`pending_targets` on directed.control: paging through who has not acknowledged a message."""

from __future__ import annotations

import pytest

from tests.integration.directed.helpers import directed, directed_settings, wait_applied

pytestmark = pytest.mark.integration


async def test_pending_targets_pages_and_bad_input(broker_url, tmp_path, unique, amqp):
    s = directed_settings(unique)
    async with directed(broker_url, tmp_path, s, amqp) as (_, client):
        targets = [f"n{i:02d}" for i in range(7)]
        await client.send(b"x", targets, message_id="m1")
        await wait_applied(client, "m1")
        reply = await client.pull("n03")
        await client.pull("n03", reply["record_id"], max=0)  # n03 acknowledged
        await client.pull("n05")  # n05 holds it unacknowledged: still pending
        pages, cursor = [], None
        while True:
            query = {"op": "pending_targets", "message_id": "m1", "cursor": cursor, "limit": 2}
            page = (await client.control(query))["pending_targets"]
            pages.append(page["targets"])
            cursor = page["cursor"]
            if cursor is None:
                break
        assert pages == [["n00", "n01"], ["n02", "n04"], ["n05", "n06"]]
        for query, code in (
            ({"op": "pending_targets", "message_id": "nope"}, "not_found"),
            ({"op": "pending_targets"}, "invalid_query"),
            ({"op": "pending_targets", "message_id": "m1", "limit": 0}, "invalid_query"),
            ({"op": "pending_targets", "message_id": "m1", "cursor": 1}, "invalid_query"),
        ):
            assert (await client.control(query))["error"]["code"] == code, query
