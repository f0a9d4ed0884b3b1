"""The gateway link reads the broker URL as aio-pika does (the shared connection's URL)."""

from __future__ import annotations

import pytest

from workers.gateway.amqp_link import _parse_url


def test_url_fields_and_defaults() -> None:
    assert _parse_url("amqps://u:p%40x@h:1234/v%2Fh?heartbeat=2") == {
        "heartbeat": 2,
        "host": "h",
        "port": 1234,
        "user": "u",
        "password": "p@x",
        "vhost": "v/h",
        "tls": True,
    }
    assert _parse_url("amqp://127.0.0.1") == {
        "heartbeat": None,
        "host": "127.0.0.1",
        "port": 5672,
        "user": "guest",
        "password": "guest",
        "vhost": "/",
        "tls": False,
    }


def test_not_amqp_is_refused() -> None:
    with pytest.raises(ValueError, match="not an AMQP URL"):
        _parse_url("http://127.0.0.1:5672/")
