"""The CLI of the broker under test, for tests that raise alarms, restart it or ask it.

``rabbitmqctl`` is ``TEST_BROKER_RABBITMQCTL`` and ``rabbitmq-diagnostics`` is
``TEST_BROKER_RABBITMQ_DIAGNOSTICS`` (each split like a shell would, e.g.
``.ci/rabbitmq43 ctl`` or ``docker exec rmq rabbitmqctl``), by default the tool of that name.
:func:`require_cli` skips a test that needs one when it is missing or talks to another node
than the broker under test, and fails it instead under ``TEST_BROKER_REQUIRED=1``.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import subprocess
from urllib.parse import urlsplit

import pytest


class BrokerCliError(RuntimeError):
    pass


TOOLS = {
    "rabbitmqctl": "TEST_BROKER_RABBITMQCTL",
    "rabbitmq-diagnostics": "TEST_BROKER_RABBITMQ_DIAGNOSTICS",
}


def cli_command(tool: str = "rabbitmqctl") -> list[str]:
    return shlex.split(os.environ.get(TOOLS[tool]) or tool)


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    """Run the broker's rabbitmqctl; its stdout, or :class:`BrokerCliError` with what it said."""
    return run_cli("rabbitmqctl", *args, timeout=timeout)


def diagnostics(*args: str, timeout: float = 60) -> str:
    """Run the broker's rabbitmq-diagnostics, like :func:`rabbitmqctl`."""
    return run_cli("rabbitmq-diagnostics", *args, timeout=timeout)


def run_cli(tool: str, *args: str, timeout: float = 60) -> str:
    cmd = [*cli_command(tool), *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerCliError(f"{shlex.join(cmd)}: {exc}") from exc
    if done.returncode != 0:
        raise BrokerCliError(
            f"{shlex.join(cmd)} exited {done.returncode}: {(done.stderr or done.stdout).strip()}"
        )
    return done.stdout


def _amqp_port(url: str | None) -> int:
    url = url or os.environ.get("BRIDGE_AMQP_URL") or os.environ.get("AMQP_URL") or ""
    parts = urlsplit(url)
    return parts.port or (5671 if parts.scheme == "amqps" else 5672)


@functools.cache
def _available(tool: str, command: tuple[str, ...], port: int) -> bool:
    if not command or shutil.which(command[0]) is None:
        return False
    try:
        out = run_cli(tool, "status", "--formatter", "json", timeout=30)
    except BrokerCliError:
        return False
    try:
        listeners = json.loads(out).get("listeners") or []
    except (ValueError, AttributeError):
        return True  # an older CLI without JSON: it answered, trust it
    # the node the CLI reaches must be the one the tests connect to
    return any(
        entry.get("port") == port and str(entry.get("protocol", "")).startswith("amqp")
        for entry in listeners
    )


def cli_available(url: str | None = None, tool: str = "rabbitmqctl") -> bool:
    """The tool exists and its ``status`` answers for the broker at ``url`` (default: the
    ``BRIDGE_AMQP_URL``/``AMQP_URL`` or local broker); cached."""
    return _available(tool, tuple(cli_command(tool)), _amqp_port(url))


def require_cli(url: str | None = None, tool: str = "rabbitmqctl") -> None:
    """Skip the calling test without the broker's CLI tool (fail under
    TEST_BROKER_REQUIRED=1)."""
    if cli_available(url, tool):
        return
    reason = (
        f"no working {tool} for the broker under test (port {_amqp_port(url)}): "
        f"{shlex.join(cli_command(tool))} status failed or reaches another node; "
        f"set {TOOLS[tool]}"
    )
    if os.environ.get("TEST_BROKER_REQUIRED") == "1":
        pytest.fail(reason + " (TEST_BROKER_REQUIRED=1)")
    pytest.skip(reason)
