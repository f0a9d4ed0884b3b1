"""The README stays true: every setting the code reads is documented."""

from __future__ import annotations

from pathlib import Path

from bridge.settings import HostSettings
from workers.delay.config import DelaySettings
from workers.directed.config import DirectedSettings

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = [
        f"BRIDGE_{n.upper()}"
        for n in HostSettings.model_fields
        if f"`BRIDGE_{n.upper()}`" not in readme
    ]
    missing += [
        f"BRIDGE_DIRECTED__{n.upper()}"
        for n in DirectedSettings.model_fields
        if f"`BRIDGE_DIRECTED__{n.upper()}`" not in readme
    ]
    assert not missing, f"undocumented settings: {missing}"


def test_every_delay_setting_is_documented():
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "delay.md").read_text()
    missing = [
        f"BRIDGE_DELAY__{n.upper()}"
        for n in DelaySettings.model_fields
        if f"`BRIDGE_DELAY__{n.upper()}`" not in text
    ]
    assert not missing, f"undocumented settings: {missing}"


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in readme and ".venv/bin/python -m pytest -q" in ci
