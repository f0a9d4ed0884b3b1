"""`rabbitmq-bridge gateway token`: a signed HELLO token made with the gateway's own secret,
read from the environment or the secrets directory like every setting (a real process)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from workers.gateway.identity import TokenCheck, verify_token

SECRET = "token-command-secret-0123456789"


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "bridge.cli", "gateway", "token", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_prints_a_token_for_the_client_id_from_the_environment() -> None:
    before = time.time()
    done = run(
        "--client-id",
        "device-7",
        "--ttl",
        "2h",
        env={"BRIDGE_GATEWAY__CLIENT_TOKEN_SECRET": SECRET},
    )
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert verify_token(SECRET.encode(), "device-7", token, time.time()) is TokenCheck.OK
    expiry = int(token.split(".")[1])
    assert before + 7200 - 1 <= expiry <= time.time() + 7200
    assert "valid until" in done.stderr and token not in done.stderr


def test_reads_the_secret_from_the_secrets_directory(tmp_path: Path) -> None:
    (tmp_path / "bridge_gateway__client_token_secret").write_text(SECRET + "\n")
    done = run("--client-id", "d", env={"BRIDGE_SECRETS_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert verify_token(SECRET.encode(), "d", token, time.time()) is TokenCheck.OK
    assert int(token.split(".")[1]) > time.time() + 29 * 86400  # --ttl defaults to 30d


def test_refuses_without_a_secret_or_with_a_bad_ttl(tmp_path: Path) -> None:
    done = run("--client-id", "d", env={"BRIDGE_SECRETS_DIR": str(tmp_path)})
    assert done.returncode == 2 and not done.stdout
    assert "BRIDGE_GATEWAY__CLIENT_TOKEN_SECRET is not set" in done.stderr
    bad = run(
        "--client-id", "d", "--ttl", "soon", env={"BRIDGE_GATEWAY__CLIENT_TOKEN_SECRET": SECRET}
    )
    assert bad.returncode == 2 and "--ttl" in bad.stderr and not bad.stdout
    short = run("--client-id", "d", env={"BRIDGE_GATEWAY__CLIENT_TOKEN_SECRET": "short"})
    assert short.returncode == 2 and "CLIENT_TOKEN_SECRET" in short.stderr
    assert "short" not in short.stderr.replace("CLIENT_TOKEN_SECRET", ""), "secret echoed"
