"""Settings of the directed worker (``BRIDGE_DIRECTED__*``) and the wire names it uses.

Every exchange and queue name is the default of a setting; headers and content types are
defined here once.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings

from bridge.amqp.poison import H_DEAD_DETAIL as H_DEAD_DETAIL
from bridge.amqp.poison import H_DEAD_REASON as H_DEAD_REASON
from bridge.settings import worker_settings_config
from bridge.sharding import ShardFields

H_TARGETS = "x-targets"
H_TARGET_GROUPS = "x-target-groups"
H_TTL = "x-ttl-ms"
H_SHARD = "x-shard"
H_FORWARDED_FROM = "x-forwarded-from"
H_ORIGINAL_ROUTING_KEY = "x-routing-key"
ENVELOPE_CONTENT_TYPE = "application/vnd.bridge.directed-envelope+json"
REPLY_CONTENT_TYPE = "application/json"
HTTP_PULL_PATH = "/directed/v1/targets/{target}/pull"
# an HTTP pull that accepts this gets the reply with unencoded bodies (wire.encode_binary_reply)
BINARY_REPLY_CONTENT_TYPE = "application/vnd.bridge.directed-batch"
ANY_TARGET = "*"  # the key of the one token every target may use in HTTP_TOKENS
_HASHED_TOKEN = re.compile(r"sha256:[0-9a-f]{64}")


class DirectedSettings(ShardFields, BaseSettings):
    """Settings of the directed worker. With ``shard_count`` > 1 each replica keeps only the
    targets the consistent-hash exchange ``pull_shards_exchange`` routes to it."""

    model_config = worker_settings_config("directed")

    requests_exchange: str = "directed.requests"
    requests_queue: str = "directed.requests"
    pull_exchange: str = "directed.pull"
    pull_exchange_type: Literal["topic", "direct", "fanout"] = "topic"
    pull_queue: str = "directed.pull"
    pull_shards_exchange: str = Field(
        default="directed.pull.shards",
        description="sharded mode: consistent-hash exchange between the pull exchange and the "
        "shards' pull queues",
    )
    shard_query_timeout_s: float = Field(
        default=2.0,
        gt=0,
        description="sharded mode: how long a status query waits for the other shards",
    )
    pull_queue_type: Literal["quorum", "classic"] = Field(
        default="quorum",
        description="quorum survives a broker node loss; classic has lower pull latency",
    )
    control_exchange: str = "directed.control"
    control_queue: str = "directed.control"
    dead_exchange: str = "directed.dead"
    dead_queue: str = "directed.dead"

    queue_limit: int = Field(default=50, ge=1, le=100_000, description="ids kept per target")
    overflow: Literal["drop-head", "reject"] = "drop-head"
    max_batch: int = Field(default=100, ge=1, le=10_000, description="cap on a pull's max")
    default_max: int = Field(default=10, ge=0, description="max when a pull omits it")
    max_wait_ms: int = Field(default=30_000, ge=0, description="cap on a pull's wait_ms")
    default_ttl_ms: int = Field(
        default=86_400_000, ge=1, description="content TTL without x-ttl-ms"
    )
    max_ttl_ms: int = Field(default=30 * 86_400_000, ge=1)
    max_targets: int = Field(default=100_000, ge=1)
    max_target_length: int = Field(default=255, ge=1)
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1)
    max_pull_bytes: int = Field(default=64 * 1024, ge=64, description="largest accepted pull body")
    dedup_retention_ms: int = Field(
        default=86_400_000, ge=0, description="how long a finished message_id is remembered"
    )
    request_prefetch: int = Field(default=512, ge=1)
    pull_prefetch: int = Field(default=1024, ge=1)
    max_inflight_pulls: int = Field(
        default=20_000,
        ge=1,
        description="pulls handled at once (long polls included); beyond, an 'overloaded' error reply",
    )
    cache_bytes: int = Field(default=64 * 1024 * 1024, ge=0, description="content cache in memory")
    pull_commit_interval_ms: float = Field(
        default=10.0,
        ge=0,
        le=1000,
        description="least time between the starts of two group commits that answer pulls: "
        "under load more pulls share one commit (fewer fsyncs), each waiting up to this long",
    )
    synchronous: Literal["FULL", "NORMAL"] = Field(
        default="FULL",
        description="SQLite fsync policy; NORMAL survives a process crash, not power loss",
    )
    backlog_metric_targets: int = Field(
        default=50, ge=0, description="per-target backlog gauge keeps only the N largest"
    )
    housekeeping_interval_s: float = Field(default=1.0, gt=0)
    http_tokens: dict[str, str] | None = Field(
        default=None,
        description="HTTP pull API: JSON object target -> bearer token ('*': one token for "
        "every target; a value 'sha256:<hex>' is the token's SHA-256); unset: no authentication",
    )
    http_rate_per_target: float = Field(
        default=10.0,
        ge=0,
        description="HTTP pulls a second one target may make on average (0: no limit); "
        "beyond, 429 'overloaded' with Retry-After",
    )
    http_rate_burst: int = Field(
        default=20, ge=1, description="HTTP pulls one target may make at once before the rate"
    )

    @field_validator("http_tokens")
    @classmethod
    def _check_tokens(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("an empty object would refuse every pull; leave it unset instead")
        for target, token in value.items():
            if not target:
                raise ValueError("a target name is empty")
            if not token:
                raise ValueError(f"the token of {target!r} is empty")
            if token.startswith("sha256:") and not _HASHED_TOKEN.fullmatch(token):
                raise ValueError(
                    f"the token of {target!r} starts with 'sha256:' but is not 64 lower-case "
                    "hex digits after it"
                )
        return value
