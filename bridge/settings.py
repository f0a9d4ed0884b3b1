"""Settings shared by every worker: env prefix ``BRIDGE_``, nested delimiter ``__``.

Each worker defines its own settings class with :func:`worker_settings_config`, so its
variables live under ``BRIDGE_<WORKER>__...`` and a third-party worker needs nothing here.
Secrets (the AMQP URL with its password) can come from files in a secrets directory, which
is how a Kubernetes Secret is mounted: one file per setting, named like the variable
(``BRIDGE_AMQP_URL``) or its lower-case form.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bridge.errors import ConfigError

DEFAULT_SECRETS_DIR = "/run/secrets/bridge"
ENV_PREFIX = "BRIDGE_"
SECRETS_DIR_VARIABLE = "BRIDGE_SECRETS_DIR"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# values of these settings are never repeated in an error message
_SECRET_WORDS = ("url", "token", "password", "secret")

S = TypeVar("S", bound=BaseSettings)

# Kubernetes adds <SERVICE>_SERVICE_HOST, <SERVICE>_PORT=tcp://... and the like for every
# Service in the namespace ("bridge-delay" gives BRIDGE_DELAY_PORT): not settings, not typos.
_SERVICE_LINK = re.compile(r"_SERVICE_(HOST|PORT\w*)$|_PORT_\d+_(TCP|UDP|SCTP)\w*$")
_SERVICE_LINK_VALUE = re.compile(r"^(tcp|udp|sctp)://")


def secrets_dir() -> str | None:
    """The secrets directory: ``BRIDGE_SECRETS_DIR`` if set, else the default if it exists."""
    configured = os.environ.get(SECRETS_DIR_VARIABLE)
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
        env_prefix=ENV_PREFIX,
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
    http_keepalive_s: float = Field(
        default=75.0,
        gt=0,
        description="How long an idle keep-alive HTTP connection stays open between requests.",
    )
    http_max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest HTTP request body; beyond, 413 (a worker's API may set a lower cap).",
    )
    http_max_connections: int = Field(
        default=16_384,
        ge=1,
        description="HTTP connections open at once; one more is answered 503 and closed.",
    )
    http_tls_cert: Path | None = Field(
        default=None, description="PEM certificate chain: the HTTP port speaks HTTPS only."
    )
    http_tls_key: Path | None = Field(default=None, description="PEM private key of it.")
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING, ERROR, CRITICAL.")
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

    @model_validator(mode="after")
    def _check_tls(self) -> HostSettings:
        if (self.http_tls_cert is None) != (self.http_tls_key is None):
            raise ValueError("BRIDGE_HTTP_TLS_CERT and BRIDGE_HTTP_TLS_KEY go together")
        return self

    @field_validator("amqp_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("amqp", "amqps"):
            raise ValueError(f"must start with amqp:// or amqps://, got {redact_url(value)!r}")
        if not parts.hostname:
            raise ValueError("has no host name")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return value.upper()

    @field_validator("log_format")
    @classmethod
    def _check_format(cls, value: str) -> str:
        if value not in ("json", "text"):
            raise ValueError("must be 'json' or 'text'")
        return value


def load_settings(cls: type[S], **overrides: Any) -> S:
    """A settings class read from the environment and the secrets directory; invalid values
    raise :class:`ConfigError` with one line per problem, naming the variable."""
    directory = secrets_dir()
    try:
        if directory:
            return cls(_secrets_dir=directory, **overrides)  # type: ignore[call-arg]
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(*settings_problems(cls, exc)) from exc


def load_host_settings(**overrides: Any) -> HostSettings:
    """Read host settings from the environment and the secrets directory."""
    return load_settings(HostSettings, **overrides)


def variable_name(cls: type[BaseSettings], loc: Iterable[int | str]) -> str:
    """The environment variable of a setting: the class's prefix, then the field path joined
    by the nested delimiter (``BRIDGE_DIRECTED__QUEUE_LIMIT``)."""
    prefix = str(cls.model_config.get("env_prefix") or "")
    delimiter = str(cls.model_config.get("env_nested_delimiter") or "__")
    path = delimiter.join(str(p).upper() for p in loc if not isinstance(p, int))
    return f"{prefix}{path}" if path else f"{prefix.rstrip('_')}_*"


def settings_problems(cls: type[BaseSettings], exc: ValidationError) -> list[str]:
    """One line per invalid value: the variable, the value (unless secret), what is wrong."""
    lines = []
    for error in exc.errors(include_url=False):
        name = variable_name(cls, error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        value = error.get("input")
        secret = any(word in name.lower() for word in _SECRET_WORDS)
        if error["loc"] and not secret and isinstance(value, str | int | float):
            lines.append(f"{name}={value}: {message}")
        else:
            lines.append(f"{name}: {message}")
    return lines


def variable_names(cls: type[BaseModel], prefix: str, delimiter: str = "__") -> set[str]:
    """Every variable a settings class reads (nested models included)."""
    names: set[str] = set()
    for field, info in cls.model_fields.items():
        name = f"{prefix}{field.upper()}"
        names.add(name)
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            names |= variable_names(kind, f"{name}{delimiter}", delimiter)
    return names


def unknown_variables(
    classes: Iterable[type[BaseSettings]], environ: Mapping[str, str] | None = None
) -> list[str]:
    """One warning per ``BRIDGE_*`` variable no settings class reads, naming the closest
    valid one: a misspelled setting is otherwise silently ignored."""
    known = {SECRETS_DIR_VARIABLE}
    for cls in classes:
        prefix = str(cls.model_config.get("env_prefix") or "").upper()
        known |= variable_names(cls, prefix, str(cls.model_config.get("env_nested_delimiter")))
    warnings = []
    env = os.environ if environ is None else environ
    for raw, value in sorted(env.items()):
        name = raw.upper()
        if not name.startswith(ENV_PREFIX) or name in known:
            continue
        if _SERVICE_LINK.search(name) or (
            name.endswith("_PORT") and _SERVICE_LINK_VALUE.match(value)
        ):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        warnings.append(f"{name} is not a setting of this program and is ignored{hint}")
    return warnings


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
