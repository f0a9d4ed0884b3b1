"""Gateway settings from the environment, and docs/gateway.md lists every one of them."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from workers.gateway.config import GatewaySettings

ROOT = Path(__file__).resolve().parents[3]


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_GATEWAY__PORT", "7100")
    monkeypatch.setenv("BRIDGE_GATEWAY__TOKENS", "alpha, beta,,")
    monkeypatch.setenv("BRIDGE_GATEWAY__INSTANCE", "gw-a")
    s = GatewaySettings()
    assert s.port == 7100
    assert s.tokens == ["alpha", "beta"]
    assert s.reply_queue == "gateway.reply.gw-a"
    assert s.registry_queue == "gateway.registry.gw-a"
    assert s.server_queue("s1") == "gateway.server.s1"
    monkeypatch.setenv("BRIDGE_GATEWAY__TOKENS", '["a,b", "c"]')
    assert GatewaySettings().tokens == ["a,b", "c"]


def test_defaults() -> None:
    s = GatewaySettings()
    assert (s.host, s.port, s.servers_exchange) == ("0.0.0.0", 7000, "gateway.servers")
    assert s.tokens == [] and s.tls_cert is None
    assert s.max_hello_frame < s.max_frame


@pytest.mark.parametrize(
    "bad",
    [
        {"tls_cert": "/x.pem"},
        {"plain_listener": False},
        {"max_hello_frame": 2048, "max_frame": 1024},
        {"port": 70000},
        {"heartbeat_s": 0},
    ],
)
def test_invalid(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        GatewaySettings(**bad)


def test_every_setting_is_documented() -> None:
    doc = (ROOT / "docs" / "gateway.md").read_text()
    missing = [
        f"BRIDGE_GATEWAY__{n.upper()}"
        for n in GatewaySettings.model_fields
        if f"`BRIDGE_GATEWAY__{n.upper()}`" not in doc
    ]
    assert not missing, f"undocumented gateway settings: {missing}"


def test_state_file_name_survives_a_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    assert GatewaySettings().state_name == socket.gethostname()  # not hostname-pid
    assert GatewaySettings(instance="gw-a").state_name == "gw-a"


def test_listeners_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "BRIDGE_GATEWAY__LISTENERS",
        '[{"port":7000,"framing":"frames"},'
        '{"port":7001,"framing":"length","length_bytes":2,"byte_order":"little"},'
        '{"port":7002,"framing":"lines"},{"port":7003,"framing":"raw","proxy_protocol":true},'
        '{"port":7004,"framing":"lines"}]',
    )
    bound = GatewaySettings().bound_listeners()
    assert [(label, variable, x.port) for label, variable, x in bound] == [
        ("frames", "BRIDGE_GATEWAY__LISTENERS[0]", 7000),
        ("length", "BRIDGE_GATEWAY__LISTENERS[1]", 7001),
        ("lines", "BRIDGE_GATEWAY__LISTENERS[2]", 7002),
        ("raw+proxy", "BRIDGE_GATEWAY__LISTENERS[3]", 7003),
        ("lines-2", "BRIDGE_GATEWAY__LISTENERS[4]", 7004),
    ]
    assert (bound[1][2].length_bytes, bound[1][2].byte_order) == (2, "little")
    assert bound[3][2].proxy_protocol


def test_port_and_tls_port_are_the_default_listeners() -> None:
    assert [
        (label, x.port, x.framing, x.tls) for label, _, x in GatewaySettings().bound_listeners()
    ] == [("tcp", 7000, "frames", False)]
    s = GatewaySettings(port=7100, tls_port=7443, tls_cert="/c.pem", tls_key="/k.pem")
    assert [(label, x.port, x.tls) for label, _, x in s.bound_listeners()] == [
        ("tcp", 7100, False),
        ("tls", 7443, True),
    ]


@pytest.mark.parametrize(
    ("listeners", "extra", "message"),
    [
        ([{"port": 1}], {"port": 7000}, "LISTENERS replaces BRIDGE_GATEWAY__PORT"),
        ([{"port": 1}], {"plain_listener": False}, "replaces BRIDGE_GATEWAY__PLAIN_LISTENER"),
        ([{"port": 1}, {"port": 1, "framing": "raw"}], {}, "names a port twice"),
        ([{"port": 1, "tls": True}], {}, "needs tls_cert"),
        ([{"port": 1, "framing": "lines", "length_bytes": 2}], {}, "only apply to framing"),
        ([{"port": 1, "framing": "length", "length_bytes": 3}], {}, "length_bytes"),
        ([{"port": 1, "framing": "length", "byte_order": "middle"}], {}, "byte_order"),
        ([{"port": 1, "framing": "xml"}], {}, "framing"),
        ([{"port": 1, "proxy": True}], {}, "Extra inputs"),
        ([{"framing": "raw"}], {}, "port"),
        ([{"port": 1, "framing": "lines", "passthrough": "h:80"}], {}, "passthrough only"),
        ([{"port": 1, "passthrough": "nohost"}], {}, "not host:port"),
        ([{"port": 1, "passthrough": "h:0"}], {}, "not host:port"),
        ([{"port": 1, "passthrough": ":80"}], {}, "not host:port"),
    ],
)
def test_invalid_listeners(
    listeners: list[dict[str, object]], extra: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        GatewaySettings(listeners=listeners, **extra)


def test_passthrough_address() -> None:
    x = GatewaySettings(listeners=[{"port": 1, "passthrough": "web.internal:8080"}]).listeners[0]
    assert x.upstream == ("web.internal", 8080)
    assert GatewaySettings(listeners=[{"port": 1, "passthrough": "[::1]:80"}]).listeners[
        0
    ].upstream == ("::1", 80)


def test_listeners_that_are_not_json_are_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_GATEWAY__LISTENERS", "[{port: 7001}]")
    with pytest.raises(ValidationError, match="not a JSON list of listener objects"):
        GatewaySettings()


def test_offline_queue_names() -> None:
    s = GatewaySettings()
    assert (s.offline_max_messages, s.offline_ttl_s) == (1000, 3600.0)
    assert s.offline_queue("dev-1.a:b@c_d") == "gateway.offline.dev-1.a:b@c_d"
    # anything else (spaces, slashes, non-ASCII, too long, a trailing newline, a leading
    # dot) is named by its digest, behind a character the plain form never has
    for odd in ("device/ü 7", "x" * 201, "abc\n", ".hidden", "#" + "0" * 64):
        name = s.offline_queue(odd)
        assert name.startswith("gateway.offline.#") and len(name) == len("gateway.offline.#") + 64
    assert s.offline_queue("abc\n") != s.offline_queue("abc")
