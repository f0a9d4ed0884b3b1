"""Run a worker as a real process (for kill -9 and SIGTERM tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WorkerProcess:
    def __init__(
        self,
        workers: list[str],
        *,
        broker_url: str,
        state_dir: Path,
        env: dict[str, str],
        log: Path,
    ) -> None:
        self.workers = workers
        self.port = free_port()
        self.env = {
            **os.environ,
            "BRIDGE_AMQP_URL": broker_url,
            "BRIDGE_STATE_DIR": str(state_dir),
            "BRIDGE_HTTP_PORT": str(self.port),
            "BRIDGE_HTTP_HOST": "127.0.0.1",
            "BRIDGE_LOG_FORMAT": "text",
            **env,
        }
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge.cli", "run", *self.workers],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    def http(self, path: str, timeout: float = 1.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.port}{path}", timeout=timeout
            ) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"worker exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}"
                )
            try:
                if self.http("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"worker not ready after {timeout}s: {self.log.read_text()[-3000:]}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)
