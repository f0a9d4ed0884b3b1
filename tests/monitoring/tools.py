"""Prometheus' binaries for the tests: skipped with the reason when absent, except in CI."""

from __future__ import annotations

import os
import shutil

import pytest


def prometheus_tool(name: str) -> str:
    """Path of ``promtool`` or ``prometheus`` (Debian's ``prometheus`` package)."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (apt-get install --no-install-recommends prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + ": .ci/run installs it, so CI must have it")
        pytest.skip(reason)
    return path
