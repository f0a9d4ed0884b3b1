"""Settings shared by every worker: env prefix ``BRIDGE_``, nested delimiter ``__``.

Each worker defines its own settings class with :func:`worker_settings_config`, so its
variables live under ``BRIDGE_<WORKER>__...`` and a third-party worker needs nothing here.
Secrets (the AMQP URL with its password) can come from files in a secrets directory, which
is how a Kubernetes Secret is mounted: one file per setting, named like the variable
(``BRIDGE_AMQP_URL``) or its lower-case form.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SECRETS_DIR = "/run/secrets/bridge"


def secrets_dir() -> str | None:
    """The secrets directory: ``BRIDGE_SECRETS_DIR`` if set, else the default if it exists."""
    configured = os.environ.get("BRIDGE_SECRETS_DIR")
    if configured:
        return configured
    return DEFAULT_SECRETS_DIR if Path(DEFAULT_SECRETS_DIR).is_dir() else None


def worker_settings_config(worker: str) -> SettingsConfigDict:
    """Config for a worker's own settings class: variables ``BRIDGE_<WORKER>__<FIELD>``."""
    return SettingsConfigDict(
        env_prefix=f"BRIDGE_{worker.upper()}__",
        env_nested_delimiter="__",
        extra="ignore",
        case_sensitive=False,
    )


class HostSettings(BaseSettings):
    """Settings of the host process (shared by all workers it runs)."""

    model_config = SettingsConfigDict(
        env_prefix="BRIDGE_",
        env_nested_delimiter="__",
        extra="ignore",
        case_sensitive=False,
    )

    amqp_url: str = Field(
        default="amqp://guest:guest@localhost:5672/",
        description="Broker URL (amqp:// or amqps://). Prefer a secrets file for the password.",
    )
    state_dir: Path = Field(
        default=Path("./state"), description="Where stateful workers keep SQLite files."
    )
    http_host: str = Field(default="0.0.0.0", description="Bind address of the HTTP endpoint.")
    http_port: int = Field(
        default=9100, ge=0, le=65535, description="/livez, /readyz, /metrics; 0 disables."
    )
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING, ERROR.")
    log_format: str = Field(default="json", description="json (one object per line) or text.")
    drain_seconds: float = Field(
        default=20.0, gt=0, description="Grace period for a SIGTERM drain."
    )
    connect_retry_max_s: float = Field(
        default=30.0, gt=0, description="Longest pause between broker connection attempts."
    )
    heartbeat_s: int = Field(
        default=10,
        ge=0,
        description="AMQP heartbeat; a silent broker is noticed after about 3 heartbeats.",
    )

    @field_validator("amqp_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("amqp", "amqps"):
            raise ValueError(
                f"BRIDGE_AMQP_URL must start with amqp:// or amqps://, got {redact_url(value)!r}"
            )
        if not parts.hostname:
            raise ValueError("BRIDGE_AMQP_URL has no host name")
        return value

    @field_validator("log_format")
    @classmethod
    def _check_format(cls, value: str) -> str:
        if value not in ("json", "text"):
            raise ValueError("BRIDGE_LOG_FORMAT must be 'json' or 'text'")
        return value


def load_host_settings(**overrides: Any) -> HostSettings:
    """Read host settings from the environment and the secrets directory."""
    directory = secrets_dir()
    if directory:
        return HostSettings(_secrets_dir=directory, **overrides)  # type: ignore[call-arg]
    return HostSettings(**overrides)


def redact_url(url: str) -> str:
    """The URL with its password replaced, safe for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.username:
        netloc = f"{parts.username}:***@{netloc}"
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
