"""The README stays true: every setting the code reads is documented."""

from __future__ import annotations

from pathlib import Path

from bridge.settings import HostSettings
from workers.delay.config import DelaySettings
from workers.directed.config import DirectedSettings

ROOT = Path(__file__).resolve().parents[3]


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


def test_console_command_has_a_distinctive_name_used_everywhere():
    import re
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert list(scripts) == ["rabbitmq-bridge", "bridge"]  # the alias second
    assert scripts["bridge"] == scripts["rabbitmq-bridge"]
    bare = re.compile(r"(?<![\w./-])bridge (run|check|demo|workers|directed|delay|gateway) ")
    texts = [ROOT / "README.md", ROOT / "Dockerfile", *sorted((ROOT / "docs").glob("*.md"))]
    texts += sorted((ROOT / "k8s").rglob("*.yaml"))
    found = [
        f"{path.relative_to(ROOT)}: {line.strip()}"
        for path in texts
        for line in path.read_text().splitlines()
        if bare.search(line) and "RabbitMQ bridge" not in line and "ruff check" not in line
    ]
    assert not found, found


def test_the_declared_license_file_is_there():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    for name in project["license-files"]:
        text = (ROOT / name).read_text()
        assert "Apache License" in text and "Version 2.0, January 2004" in text
