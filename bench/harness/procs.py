"""A worker as a real process (``python -m bridge.cli run <workers>``), for benchmarks, the
fault suite and the integration tests that kill -9 or SIGTERM it."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel

from bench.harness.report import broker_url as default_broker_url

Scrape = dict[str, dict[tuple[tuple[str, str], ...], float]]


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port free to listen on, for a process started next. Taken below the kernel's
    ephemeral range: a port the kernel handed out with ``bind(0)`` is handed out again to the
    next outgoing connection (a client's or the broker's), which then holds it when the
    process tries to listen (EADDRINUSE, seen in CI). Picked at random so that test runs in
    parallel rarely collide, and checked by binding it."""
    low, _ = _ephemeral_range()
    first = 20000 if low > 21000 else 1024
    last = max(first + 1000, low - 1)
    for _ in range(200):
        port = random.randint(first, last)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {first} and {last}")


def settings_env(
    worker: str, settings: BaseModel, fields: Iterable[str] | None = None
) -> dict[str, str]:
    """``settings`` as ``BRIDGE_<WORKER>__<FIELD>`` variables for a worker process: the
    ``fields`` named, else those set explicitly; unset optional ones (None) are left out
    (``str(None)`` would be the text "None")."""
    names = settings.model_fields_set if fields is None else fields
    values = {f: getattr(settings, f) for f in names}
    prefix = f"BRIDGE_{worker.upper()}__"
    return {f"{prefix}{f.upper()}": str(v) for f, v in values.items() if v is not None}


class WorkerProcess:
    """One worker process with its own state directory, HTTP port and log file.

    :meth:`start` launches it (again after a kill); :meth:`wait_ready` polls ``/readyz``.
    """

    def __init__(
        self,
        workers: list[str],
        *,
        state_dir: Path,
        env: dict[str, str],
        broker_url: str | None = None,
        log: Path | None = None,
        tree: Path | None = None,
        module: str = "bridge.cli",
    ) -> None:
        """``env`` goes last (it may override any variable set here); ``log`` defaults to
        ``state_dir/worker.log``; ``tree``: run the code of another checkout (a git worktree
        of an earlier commit, for a side-by-side comparison in the same run); ``module``:
        what ``python -m`` runs (a measuring wrapper of ``bridge.cli``, for example)."""
        self.workers = workers
        self.module = module
        self.state_dir = state_dir
        self.tree = tree
        self.port = free_port()
        self.log = log if log is not None else state_dir / "worker.log"
        self.env = {
            **os.environ,
            "BRIDGE_AMQP_URL": broker_url or default_broker_url(),
            "BRIDGE_STATE_DIR": str(state_dir),
            "BRIDGE_HTTP_PORT": str(self.port),
            "BRIDGE_HTTP_HOST": "127.0.0.1",
            "BRIDGE_LOG_FORMAT": "text",
            **env,
        }
        if tree is not None:
            self.env["PYTHONPATH"] = str(tree)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> WorkerProcess:
        """Launch the process (without waiting for it to be ready)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, "run", *self.workers],
                env=self.env,
                cwd=self.tree,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1
        return self

    def http(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.port}{path}", timeout=timeout
            ) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait_ready(self, timeout: float = 30.0, *, poll: float = 0.05) -> WorkerProcess:
        """Until ``/readyz`` answers 200; raises with the log's tail if the process exits or
        is not ready in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if self.http("/readyz", timeout=1.0)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(poll)
        raise RuntimeError(f"worker not ready after {timeout}s: {self.log_tail()}")

    def metrics(self) -> Scrape:
        """Samples of /metrics by name, keyed by their sorted labels."""
        from prometheus_client.parser import text_string_to_metric_families

        out: Scrape = {}
        text = self.http("/metrics")[1].decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = tuple(sorted(sample.labels.items()))
                out.setdefault(sample.name, {})[key] = sample.value
        return out

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and the exit code (raises ``subprocess.TimeoutExpired`` if it hangs)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited after ``timeout``; the exit code."""
        if self.proc is None:
            return None
        try:
            return self.terminate(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def log_count(self, text: str) -> int:
        try:
            return self.log.read_text(errors="replace").count(text)
        except OSError:
            return 0
