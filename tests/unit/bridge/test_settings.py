"""Host settings, secrets directory, URL redaction (bridge.settings)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from bridge.cli import main
from bridge.settings import HostSettings, load_host_settings, redact_url, unknown_variables
from workers.delay.config import DelaySettings
from workers.directed.config import DirectedSettings
from workers.gateway.config import GatewaySettings

ROOT = Path(__file__).resolve().parents[3]


def test_env_prefix_and_nested_worker_settings(monkeypatch):
    monkeypatch.setenv("BRIDGE_HTTP_PORT", "9200")
    monkeypatch.setenv("BRIDGE_DIRECTED__QUEUE_LIMIT", "7")
    monkeypatch.setenv("BRIDGE_DIRECTED__OVERFLOW", "reject")
    assert HostSettings().http_port == 9200
    s = DirectedSettings()
    assert s.queue_limit == 7 and s.overflow == "reject"


def test_secrets_directory_supplies_the_amqp_url(monkeypatch, tmp_path):
    (tmp_path / "bridge_amqp_url").write_text("amqp://app:from-secret@rabbit:5672/prod")
    monkeypatch.setenv("BRIDGE_SECRETS_DIR", str(tmp_path))
    monkeypatch.delenv("BRIDGE_AMQP_URL", raising=False)
    assert load_host_settings().amqp_url == "amqp://app:from-secret@rabbit:5672/prod"
    monkeypatch.setenv("BRIDGE_AMQP_URL", "amqp://env:pw@other:5672/")
    assert load_host_settings().amqp_url == "amqp://env:pw@other:5672/"  # env wins over files


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("BRIDGE_AMQP_URL", "http://x"),
        ("BRIDGE_AMQP_URL", "amqp://"),
        ("BRIDGE_HTTP_PORT", "70000"),
        ("BRIDGE_LOG_FORMAT", "xml"),
    ],
)
def test_invalid_settings_are_refused(monkeypatch, env, value):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError):
        HostSettings()


def test_invalid_settings_message_never_shows_the_password(monkeypatch, capsys):
    monkeypatch.setenv("BRIDGE_AMQP_URL", "http://user:hunter2@host/")
    assert main(["check"]) == 2
    out = capsys.readouterr()
    assert "BRIDGE_AMQP_URL: must start with amqp://" in out.out
    assert "hunter2" not in out.out + out.err


def test_redact_url():
    assert redact_url("amqp://u:secret@h:5672/v") == "amqp://u:***@h:5672/v"
    assert redact_url("amqp://h/") == "amqp://h/"


def test_what_the_tests_and_ci_set_is_a_setting_or_no_bridge_variable():
    """The variables the test harness reads and the CI scripts export (the broker under test,
    its CLI, whether it is required) are settings or named outside ``BRIDGE_``: the workers
    the tests start inherit them and would warn about every other ``BRIDGE_*`` one."""
    read: set[str] = set()
    for path in [*(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]:
        read |= set(re.findall(r'environ(?:\.get\(|\[)"([A-Z0-9_]+)"', path.read_text()))
    for script in (ROOT / ".ci").iterdir():
        read |= set(re.findall(r"\b([A-Z][A-Z0-9_]+)(?:=|:-)", script.read_text()))
    assert {"TEST_BROKER_REQUIRED", "TEST_BROKER_RABBITMQCTL", "BRIDGE_AMQP_URL"} <= read
    classes = [HostSettings, DirectedSettings, DelaySettings, GatewaySettings]
    assert unknown_variables(classes, {name: "x" for name in read}) == []
