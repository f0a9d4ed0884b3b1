"""Where a benchmark runs and what it prints.

Every benchmark prints one JSON object on stdout and its progress on stderr, runs against
``BRIDGE_AMQP_URL`` (else the local broker), and names its exchanges and queues uniquely so
that it can share a broker with tests and other benchmarks.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import uuid
from typing import Any

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"
_STARTED = time.monotonic()


def broker_url() -> str:
    return os.environ.get("BRIDGE_AMQP_URL") or os.environ.get("AMQP_URL") or LOCAL_URL


def unique(prefix: str = "bench") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def progress(*parts: Any) -> None:
    print(f"[{time.monotonic() - _STARTED:7.1f}s]", *parts, file=sys.stderr, flush=True)


def emit(doc: Any) -> None:
    """The one JSON object a benchmark prints on stdout."""
    json.dump(doc, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()


def interpreter() -> dict[str, Any]:
    """The Python that ran the benchmark and the workers it started (they run on
    ``sys.executable``): CPU per operation depends on how it was built (profile-guided
    optimisation, LTO, a shared libpython; what that made of the delay worker on this
    project's machine: docs/delay.md, "Interpreter")."""
    try:
        with open("/proc/self/maps") as maps:
            shared = any("libpython" in line for line in maps)
    except OSError:
        shared = None
    return {
        "version": platform.python_version(),
        "executable": sys.executable,
        "build": " ".join(platform.python_build()),
        "libpython_shared": shared,
    }


def machine() -> dict[str, Any]:
    """The machine a run measured: its absolute figures (µs of CPU per operation) move with
    the processor under the VM (the same commit measured 104-146 µs per delayed message on
    one 2-vCPU machine and 82-97 on another): compare runs by the ratios they report."""
    model, mhz = None, None
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "cpu MHz" and mhz is None:
                    mhz = float(value)
    except (OSError, ValueError):
        pass
    return {
        "cpu_model": model,
        "cpu_mhz": mhz,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
    }
