"""The CLI of the broker under test, for tests that raise alarms or restart it.

The command is ``BRIDGE_TEST_RABBITMQCTL`` (split like a shell would, e.g.
``/work/rmq43/ctl.sh`` or ``docker exec rmq rabbitmqctl``), by default ``rabbitmqctl``.
:func:`require_cli` skips a test that needs it when it is missing or talks to another node
than the broker under test, and fails it instead under ``BRIDGE_REQUIRE_BROKER=1``.
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


def cli_command() -> list[str]:
    return shlex.split(os.environ.get("BRIDGE_TEST_RABBITMQCTL") or "rabbitmqctl")


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    """Run the broker's CLI; its stdout, or :class:`BrokerCliError` with what it said."""
    cmd = [*cli_command(), *args]
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
def _available(command: tuple[str, ...], port: int) -> bool:
    if not command or shutil.which(command[0]) is None:
        return False
    try:
        out = rabbitmqctl("status", "--formatter", "json", timeout=30)
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


def cli_available(url: str | None = None) -> bool:
    """The CLI exists and ``status`` answers for the broker at ``url`` (default: the
    ``BRIDGE_AMQP_URL``/``AMQP_URL`` or local broker); cached."""
    return _available(tuple(cli_command()), _amqp_port(url))


def require_cli(url: str | None = None) -> None:
    """Skip the calling test without the broker's CLI (fail under BRIDGE_REQUIRE_BROKER=1)."""
    if cli_available(url):
        return
    reason = (
        f"no working broker CLI for the broker under test (port {_amqp_port(url)}): "
        f"{shlex.join(cli_command())} status failed or reaches another node; "
        "set BRIDGE_TEST_RABBITMQCTL"
    )
    if os.environ.get("BRIDGE_REQUIRE_BROKER") == "1":
        pytest.fail(reason + " (BRIDGE_REQUIRE_BROKER=1)")
    pytest.skip(reason)
