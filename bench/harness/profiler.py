"""``py-spy record`` of a process into collapsed stacks, summarised as top frames."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.harness.stats import rnd

FLAGS = ("--nolineno", "--threads")


class Profiler:
    """``py-spy record`` of a process into collapsed stacks, summarised as top frames."""

    def __init__(self, pid: int, out: Path, *, rate: int = 200) -> None:
        self.out = out
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.proc = subprocess.Popen(
            [exe, "record", "-p", str(pid), "-o", str(out), "-f", "raw", "-r", str(rate), *FLAGS],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self, top: int = 15) -> dict[str, Any]:
        self.proc.send_signal(2)  # SIGINT: py-spy writes the file and exits
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return summarise_collapsed(self.out, top)


def summarise_collapsed(path: Path, top: int = 15) -> dict[str, Any]:
    """Top frames by self and by inclusive samples from a collapsed-stack file."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    if not path.exists():
        return {"samples": 0}
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short_frame(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count

    def ranked(table: dict[str, int]) -> list[tuple[str, float]]:
        best = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [(frame, rnd(100 * n / max(total, 1), 1)) for frame, n in best]

    return {
        "samples": total,
        "file": str(path),
        "top_self_pct": ranked(own),
        "top_inclusive_pct": ranked(inclusive),
    }


def _short_frame(frame: str) -> str:
    # "func (path/to/module.py:123)" -> "func (module.py:123)"
    match = re.match(r"(.*) \((.*?)(:\d+)?\)$", frame.strip())
    if not match:
        return frame.strip()
    name, path, line = match.groups()
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{name} ({short}{line or ''})"
