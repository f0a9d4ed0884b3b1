"""The delay settings (workers.delay.config)."""

from __future__ import annotations


def test_every_delay_setting_is_documented() -> None:
    from pathlib import Path

    from workers.delay.config import DelaySettings

    doc = (Path(__file__).resolve().parents[3] / "docs" / "delay.md").read_text()
    missing = [
        f"BRIDGE_DELAY__{name.upper()}"
        for name in DelaySettings.model_fields
        if f"`BRIDGE_DELAY__{name.upper()}`" not in doc
    ]
    assert not missing, f"undocumented in docs/delay.md: {missing}"


def test_topic_by_is_checked_when_the_settings_are_read() -> None:
    import pytest
    from pydantic import ValidationError

    from workers.delay.config import DelaySettings
    from workers.delay.wire import TopicBy

    assert DelaySettings(topic_by="header:x-tenant").topic_rule == TopicBy("header", "x-tenant")
    with pytest.raises(ValidationError, match=r"header:<name>"):
        DelaySettings(topic_by="tenant")
