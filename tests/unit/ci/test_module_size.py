""".ci/module-size: every module over 500 lines under bridge/, workers/ and bench/ is named
and fails the run; one of exactly 500 lines, tests and other folders do not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / ".ci" / "module-size"


def write(path: Path, lines: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x = 1\n" * lines)


def run(repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(repo)], capture_output=True, text=True, timeout=60
    )


def test_every_module_over_the_limit_is_named_and_fails(tmp_path: Path) -> None:
    write(tmp_path / "bridge" / "ok.py", 500)
    write(tmp_path / "bridge" / "amqp" / "big.py", 501)
    write(tmp_path / "workers" / "delay" / "huge.py", 900)
    write(tmp_path / "bench" / "chaos" / "long.py", 600)
    write(tmp_path / "tests" / "test_long.py", 2000)  # tests are excepted
    write(tmp_path / "bench" / "notes.txt", 2000)  # only Python modules count
    done = run(tmp_path)
    assert done.returncode == 1, done
    named = sorted(line.split(":")[0] for line in done.stdout.splitlines())
    assert named == ["bench/chaos/long.py", "bridge/amqp/big.py", "workers/delay/huge.py"]
    assert "workers/delay/huge.py: 900 lines" in done.stdout


def test_a_tree_within_the_limit_passes(tmp_path: Path) -> None:
    write(tmp_path / "bridge" / "ok.py", 500)
    write(tmp_path / "workers" / "w.py", 10)
    done = run(tmp_path)
    assert done.returncode == 0 and done.stdout == "", done
