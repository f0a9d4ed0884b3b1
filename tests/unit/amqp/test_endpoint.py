"""bridge.amqp.endpoint.Endpoint reads a broker URL as aio-pika does (the host's connection
and the data path's links are given the same BRIDGE_AMQP_URL)."""

from __future__ import annotations

import pytest

from bridge.amqp.endpoint import Endpoint


def test_url_fields() -> None:
    e = Endpoint.parse("amqps://u:p%40x@h:1234/v%2Fh?heartbeat=2&name=gw-1")
    assert (e.host, e.port, e.user, e.password, e.vhost) == ("h", 1234, "u", "p@x", "v/h")
    assert e.tls and e.heartbeat == 2 and e.name == "gw-1"


def test_defaults() -> None:
    e = Endpoint.parse("amqp://127.0.0.1")
    assert (e.host, e.port, e.user, e.password, e.vhost) == (
        "127.0.0.1",
        5672,
        "guest",
        "guest",
        "/",
    )
    assert not e.tls and e.heartbeat is None and e.name is None
    assert e.ssl_context() is None


@pytest.mark.parametrize(
    ("url", "port", "vhost"),
    [
        ("amqp://h/", 5672, "/"),  # a path of "/" alone is the default vhost
        ("amqp://h//", 5672, "/"),  # "//": the vhost named "/", spelled out
        ("amqp://h/%2F", 5672, "/"),  # the same, encoded
        ("amqp://h/prod", 5672, "prod"),
        ("amqps://h", 5671, "/"),  # TLS has its own default port
    ],
)
def test_vhost_and_port(url: str, port: int, vhost: str) -> None:
    e = Endpoint.parse(url)
    assert (e.port, e.vhost) == (port, vhost)


def test_tls_options() -> None:
    e = Endpoint.parse("amqps://h?no_verify_ssl=1")
    assert e.tls and not e.verify
    context = e.ssl_context()
    assert context is not None and not context.check_hostname
    assert Endpoint.parse("amqps://h").verify


def test_not_amqp_is_refused() -> None:
    with pytest.raises(ValueError, match="not an AMQP URL"):
        Endpoint.parse("http://127.0.0.1:5672/")


def test_heartbeat_must_be_an_integer() -> None:
    with pytest.raises(ValueError, match="heartbeat"):
        Endpoint.parse("amqp://h/?heartbeat=soon")
