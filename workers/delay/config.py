"""Settings of the delay worker (``BRIDGE_DELAY__*``) and the wire names it uses.

Every exchange and queue name is the default of a setting. The control headers a producer
sends (``x-delay``, ``x-deliver-at``, ``x-target-exchange``, ``x-delay-key``) are defined
once in :mod:`workers.delay.wire`; the headers and reasons the worker adds are here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings

from bridge.amqp.consumer import DELIVERY_LIMIT_REASON, PROCESSING_FAILED
from bridge.amqp.poison import H_DEAD_DETAIL as H_DEAD_DETAIL
from bridge.amqp.poison import H_DEAD_REASON as H_DEAD_REASON
from bridge.settings import worker_settings_config
from bridge.sharding import ShardFields
from workers.delay.wire import INVALID_HEADERS, REJECT_REASONS, TopicBy

REPLY_CONTENT_TYPE = "application/json"

# Reasons a due message is dead-lettered instead of delivered (ingress reasons come from the
# model's REJECT_REASONS).
UNROUTABLE = "unroutable"
EXCHANGE_NOT_FOUND = "exchange_not_found"
ACCESS_REFUSED = "access_refused"  # the broker refuses the worker's user that exchange (403)
ACCESS_REFUSED_ATTEMPTS = 3  # refused publishes to a topic before its messages are dead
MISSING_REPLY_TO = "missing_reply_to"
DEAD_REASONS = (
    *REJECT_REASONS,
    INVALID_HEADERS,
    UNROUTABLE,
    EXCHANGE_NOT_FOUND,
    ACCESS_REFUSED,
    MISSING_REPLY_TO,
    PROCESSING_FAILED,
    DELIVERY_LIMIT_REASON,
)

DAY_MS = 86_400_000


class DelaySettings(ShardFields, BaseSettings):
    model_config = worker_settings_config("delay")

    in_exchange: str = Field(default="delay.in", description="topic exchange producers publish to")
    in_queue: str = Field(default="delay.in", description="the worker's quorum queue, bound '#'")
    dead_exchange: str = "delay.dead"
    dead_queue: str = "delay.dead"
    control_exchange: str = "delay.control"
    control_queue: str = "delay.control"
    shards_exchange: str = Field(
        default="delay.in.shards",
        description="sharded mode: consistent-hash exchange between in_exchange and the shards' "
        "queues",
    )
    shard_query_timeout_s: float = Field(
        default=2.0,
        gt=0,
        description="sharded mode: how long a control call waits for the other shards",
    )

    lanes: int = Field(
        default=8, ge=1, le=256, description="sender lanes (tasks, each with its own connection)"
    )
    batch: int = Field(
        default=500, ge=1, le=100_000, description="most messages a topic sends per lane turn"
    )
    lane_pack: int = Field(
        default=100,
        ge=1,
        le=100_000,
        description="a lane turn whose first topic has fewer due messages than this also "
        "takes other due topics, up to this many messages in all: small batches of many topics "
        "share one store read and one socket write, each reported on its own confirms (1: a "
        "turn per topic)",
    )
    lane_grow_ms: float = Field(
        default=10.0,
        ge=0,
        description="a due topic that waited this long for a lane makes the worker use one "
        "more lane (up to LANES); 0 uses every lane from the start",
    )
    lane_idle_s: float = Field(
        default=5.0, gt=0, description="an extra lane unused this long is given up again"
    )
    publish_window: int = Field(
        default=256,
        ge=1,
        le=10_000,
        description="unconfirmed publishes of a lane (one socket write each)",
    )
    publish_timeout_s: float = Field(default=30.0, gt=0)
    horizon_ms: int = Field(
        default=365 * DAY_MS, ge=0, description="longest accepted delay; longer is dead-lettered"
    )
    default_target: str | None = Field(
        default=None, description="target exchange when a message has no x-target-exchange"
    )
    topic_by: str = Field(
        default="exchange",
        description="what names a message's topic (its lane, and the name in counts, list and "
        "the metrics): 'exchange' (the target exchange), 'exchange+routing_key', or "
        "'header:<name>' (for example header:x-tenant; without it, the target exchange); "
        "computed when a message arrives and stored with it",
    )
    window_ms: int = Field(
        default=60_000, ge=1, description="near-term window held in memory (due within it)"
    )
    window_max_entries: int = Field(
        default=200_000,
        ge=1,
        description="memory bound: most pending messages held in memory at once",
    )
    window_content_mb: float = Field(
        default=32.0,
        ge=0,
        description="memory bound: MiB of message content (properties, body and ~200 bytes "
        "of bookkeeping each) the window keeps for messages accepted when already due within "
        "WINDOW_MS, so their lane publishes them without reading them back from the store; "
        "beyond it (and for what the loader brings in) the lane reads the store",
    )
    load_chunk: int = Field(default=20_000, ge=1, description="rows read per loader step")
    load_interval_s: float = Field(
        default=0.5, gt=0, description="how often the loader checks whether to refill"
    )
    prefetch: int = Field(default=1000, ge=1, description="unacknowledged ingress deliveries")
    control_prefetch: int = Field(default=32, ge=1)
    synchronous: Literal["FULL", "NORMAL"] = Field(
        default="FULL",
        description="SQLite fsync policy; NORMAL survives a process crash, not power loss",
    )
    cache_mb: int = Field(default=16, ge=1, description="SQLite page cache of the writer")
    list_max: int = Field(default=1000, ge=1, description="cap on a list request's limit")
    max_control_bytes: int = Field(default=64 * 1024, ge=64)
    scheduled_metric_topics: int = Field(
        default=50,
        ge=0,
        description="per-topic scheduled gauge keeps the N largest topics; the rest are "
        "added up as topic 'other'",
    )
    lateness_metric_topics: int = Field(
        default=20,
        ge=0,
        description="per-topic lateness histogram: the first N topics stored get a series of "
        "their own, later ones share topic 'other' (until the worker restarts)",
    )
    consumer_check_s: float = Field(
        default=1.0,
        gt=0,
        description="how often the worker checks that the broker has not cancelled its "
        "ingress consumer (a deleted queue); it declares the queue again and consumes it",
    )
    retry_backoff_max_s: float = Field(
        default=5.0, gt=0, description="longest pause of a lane after a failed publish"
    )
    switch_interval_ms: float = Field(
        default=1.0,
        ge=0,
        description="Python thread switch interval the worker sets (0 keeps the default 5 ms); "
        "shorter gives the event loop (ingress, dispatcher and lanes) the interpreter back "
        "sooner from the store's threads",
    )

    dispatch_interval_ms: float = Field(
        default=10.0,
        ge=0,
        description="the clock wakes the dispatcher at most this often: what falls due "
        "meanwhile goes to the lanes in one batch per topic (at most this much later); a "
        "lane that reports gets work at once",
    )
    ingress_commit_linger_ms: float = Field(
        default=10.0,
        ge=0,
        description="how long an ingress delivery due soon may wait for others to share its "
        "commit (its acknowledgement, and its entering the window, wait for that commit)",
    )
    ingress_commit_linger_max_ms: float = Field(
        default=50.0,
        ge=0,
        description="how long an ingress delivery due later may wait for its commit: a "
        "twentieth of the time until it is due, at least INGRESS_COMMIT_LINGER_MS and at most "
        "this; a commit is asked for at once when PREFETCH / 4 deliveries wait for it",
    )
    delete_commit_delay_ms: float = Field(
        default=100.0,
        ge=0,
        description="how long deletes of confirmed messages may wait to share a commit; a "
        "crash within this time re-publishes them (at-least-once, same message_id)",
    )
    gc_gen2_threshold: int = Field(
        default=1000,
        ge=0,
        description="young-generation collections between full garbage collections (Python's "
        "default is 10; under load that is a full pass over the in-memory window, tens of ms, "
        "several times a second); 0 keeps the interpreter's setting",
    )

    @field_validator("topic_by")
    @classmethod
    def _topic_by(cls, value: str) -> str:
        TopicBy.parse(value)  # its ValueError names the three forms
        return value

    @property
    def topic_rule(self) -> TopicBy:
        return TopicBy.parse(self.topic_by)

    @model_validator(mode="after")
    def _check(self) -> DelaySettings:
        names = [self.in_exchange, self.dead_exchange, self.control_exchange]
        if len(set(names)) != len(names):
            raise ValueError("in_exchange, dead_exchange and control_exchange must differ")
        if self.default_target is not None and not self.default_target:
            self.default_target = None
        return self
