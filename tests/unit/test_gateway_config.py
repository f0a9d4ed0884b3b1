"""Gateway settings from the environment, and docs/gateway.md lists every one of them."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from workers.gateway.config import GatewaySettings

ROOT = Path(__file__).resolve().parents[2]


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
