"""The host as a real process: probes, metrics, SIGTERM drain, broker outages, `rabbitmq-bridge check`."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

import bridge
from bench.harness.procs import WorkerProcess, free_port
from tests.integration.directed.helpers import cleanup, directed_settings, env_for

pytestmark = pytest.mark.integration


def _bridge(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "bridge.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_reports_reachable_broker(broker_url, tmp_path):
    out = _bridge(
        "check", "--json", env={"BRIDGE_AMQP_URL": broker_url, "BRIDGE_STATE_DIR": str(tmp_path)}
    )
    assert out.returncode == 0, out.stdout + out.stderr
    doc = json.loads(out.stdout)
    assert doc["ok"] is True and doc["checks"]["broker"]["ok"] is True
    assert "directed" in doc["checks"]["workers"]["detail"]


def test_check_fails_clearly_without_leaking_the_password(tmp_path):
    port = free_port()  # nothing listens there
    url = f"amqp://guest:hunter2@127.0.0.1:{port}/"
    out = _bridge("check", env={"BRIDGE_AMQP_URL": url, "BRIDGE_STATE_DIR": str(tmp_path)})
    assert out.returncode == 1
    assert f"broker unreachable at amqp://guest:***@127.0.0.1:{port}/" in out.stdout
    assert "BRIDGE_AMQP_URL" in out.stdout
    assert "hunter2" not in out.stdout + out.stderr


def test_run_unknown_worker_is_a_config_error(tmp_path):
    out = _bridge("run", "nope", env={"BRIDGE_STATE_DIR": str(tmp_path)})
    assert out.returncode == 2 and "unknown worker(s) nope" in out.stderr


def test_probes_metrics_and_sigterm_drain(broker_url, tmp_path, unique):
    s = directed_settings(unique)
    proc = WorkerProcess(
        ["directed"],
        broker_url=broker_url,
        state_dir=tmp_path,
        env=env_for(s),
        log=tmp_path / "log",
    )
    try:
        proc.start().wait_ready()
        assert proc.http("/livez") == (200, b"ok\n")
        status, body = proc.http("/readyz")
        assert status == 200 and json.loads(body)["checks"]["directed"] == "consuming"
        status, metrics = proc.http("/metrics")
        text = metrics.decode()
        assert status == 200
        for name in (
            "bridge_broker_connected 1.0",
            "bridge_directed_requests_total",
            "bridge_directed_pull_seconds_bucket",
            'bridge_worker_ready{worker="directed"} 1.0',
            f'bridge_build_info{{version="{bridge.__version__}"}} 1.0',
            "bridge_directed_commit_failures_total 0.0",
        ):
            assert name in text
        assert proc.http("/admin/directed")[0] == 200
        assert proc.http("/nope")[0] == 404
        started = time.monotonic()
        assert proc.terminate(timeout=30) == 0
        assert time.monotonic() - started < 25, "drain must finish within the grace period"
        log = (tmp_path / "log").read_text()
        assert "draining" in log and "stopped" in log
    finally:
        if proc.proc and proc.proc.poll() is None:
            proc.kill9()
        import asyncio

        asyncio.run(cleanup(broker_url, s))


def test_unreachable_broker_keeps_retrying_with_one_clear_line(tmp_path):
    port = free_port()
    proc = WorkerProcess(
        ["directed"],
        broker_url=f"amqp://guest:hunter2@127.0.0.1:{port}/",
        state_dir=tmp_path,
        env={},
        log=tmp_path / "log",
    )
    try:
        proc.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if proc.http("/livez")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        time.sleep(2)
        assert proc.proc is not None and proc.proc.poll() is None, "must keep retrying, not exit"
        assert proc.http("/livez")[0] == 200
        status, body = proc.http("/readyz")
        assert status == 503 and json.loads(body)["checks"]["broker"] == "not connected"
        log = (tmp_path / "log").read_text()
        lines = [line for line in log.splitlines() if "broker unreachable" in line]
        assert len(lines) >= 2, log
        assert f"amqp://guest:***@127.0.0.1:{port}/" in lines[0] and "hunter2" not in log
        assert proc.terminate(timeout=15) == 0
    finally:
        if proc.proc and proc.proc.poll() is None:
            proc.kill9()
