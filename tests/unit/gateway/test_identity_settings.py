"""Settings of client identities: what is refused at start (and by `check`), and the
default of unproven_client_id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridge.errors import ConfigError
from bridge.settings import load_settings
from workers.gateway.config import GatewaySettings

SECRET = "settings-secret-0123456789"


def listeners(*items: dict[str, object]) -> str:
    return json.dumps(list(items))


def test_client_auth_needs_tls_and_a_client_ca(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    with pytest.raises(ValueError, match="needs tls: true"):
        GatewaySettings(listeners=listeners({"port": 1, "client_auth": "required"}))
    with pytest.raises(ValueError, match="tls_client_ca"):
        GatewaySettings(
            listeners=listeners({"port": 1, "tls": True, "client_auth": "required"}),
            tls_cert=cert,
            tls_key=cert,
        )
    s = GatewaySettings(
        listeners=listeners({"port": 1, "tls": True, "client_auth": "required"}),
        tls_cert=cert,
        tls_key=cert,
        tls_client_ca=cert,
    )
    assert s.client_auth_listeners and s.unproven_policy == "refuse"
    with pytest.raises(ValueError):
        GatewaySettings(listeners=listeners({"port": 1, "client_auth": "optional"}))


@pytest.mark.parametrize(
    ("values", "policy"),
    [
        ({}, "hint"),
        ({"tokens": "a,b"}, "hint"),
        ({"client_token_secret": SECRET}, "refuse"),
        ({"client_token_secret": SECRET, "unproven_client_id": "hint"}, "hint"),
        ({"unproven_client_id": "refuse"}, "refuse"),
    ],
)
def test_unproven_client_id_default(values: dict[str, str], policy: str) -> None:
    assert GatewaySettings(**values).unproven_policy == policy  # type: ignore[arg-type]


def test_a_short_secret_is_refused_without_showing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_GATEWAY__CLIENT_TOKEN_SECRET", "tiny-secret")
    with pytest.raises(ConfigError) as refused:
        load_settings(GatewaySettings)
    text = str(refused.value)
    assert "BRIDGE_GATEWAY__CLIENT_TOKEN_SECRET" in text and "tiny-secret" not in text
    assert "at least 16 characters" in text


def test_the_secret_is_not_in_the_settings_repr() -> None:
    s = GatewaySettings(client_token_secret=SECRET)  # type: ignore[arg-type]
    assert SECRET not in repr(s) and SECRET not in str(s.model_dump())
    assert s.token_secret == SECRET.encode()
