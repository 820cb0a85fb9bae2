"""Gateway settings: read once from the environment (prefix `KPG_`, `__` nesting) in `__main__`.

Adapters and servers receive the frozen sub-models, never the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Frozen):
    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "kpg-gateway"
    default_partitions: int = Field(default=3, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    # Producer: batching with a short linger; `delivery_timeout_ms` bounds how long an append may wait
    # for the broker before it fails BACKEND_UNAVAILABLE instead of hanging.
    linger_ms: int = Field(default=5, ge=0)
    delivery_timeout_ms: int = Field(default=30_000, ge=1_000)
    request_timeout_ms: int = Field(default=10_000, ge=500)
    # The largest record a producer sends, and the `max.message.bytes` of the event topics the gateway
    # creates: room for a whole append (events' data plus headers) above librdkafka's 1 MB default.
    max_record_bytes: int = Field(default=8 * 1024 * 1024, ge=1024 * 1024)
    # Consumers (stream index, projections): how soon a crashed instance's partitions are taken over.
    consumer_session_timeout_ms: int = Field(default=10_000, ge=1_000)
    # Extra librdkafka properties (for example security.protocol, sasl.*) passed to every client.
    extra: dict[str, str] = Field(default_factory=dict)


class RedisSettings(_Frozen):
    url: str = "redis://127.0.0.1:6379/0"
    socket_timeout_s: float = Field(default=5.0, gt=0)
    max_connections: int = Field(default=100, ge=1)


class DatabaseSettings(_Frozen):
    # SQLAlchemy URL; empty means a SQLite file in the state folder.
    url: str = ""


class GrpcSettings(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    max_message_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)


class RestSettings(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # A request body over this is refused (PAYLOAD_TOO_LARGE) before it is parsed: a 4 MiB append as JSON
    # or base64 needs room above 4 MiB.
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)


class HealthSettings(_Frozen):
    check_interval_s: float = Field(default=2.0, gt=0)
    check_timeout_s: float = Field(default=3.0, gt=0)


class EventsSettings(_Frozen):
    """append-event: limits, idempotency and the per-partition writers."""

    max_events_per_append: int = Field(default=1000, ge=1)
    max_event_bytes: int = Field(default=1024 * 1024, ge=1)
    max_append_bytes: int = Field(default=4 * 1024 * 1024, ge=1)
    idempotency_ttl_ms: int = Field(default=24 * 3600 * 1000, ge=1000)
    idempotency_in_flight_ttl_ms: int = Field(default=60_000, ge=1000)
    # A writer holds its partition's lease while it appends; a crashed holder's lease ends after lease_ttl_ms.
    lease_ttl_ms: int = Field(default=5_000, ge=500)
    lease_renew_ms: int = Field(default=100, ge=10)
    # How long an append may wait for its partition's writer (another gateway may hold it) and for Kafka.
    append_timeout_ms: int = Field(default=15_000, ge=100)
    transaction_timeout_ms: int = Field(default=10_000, ge=1000)
    max_batch_events: int = Field(default=5_000, ge=1)
    # One Kafka transaction carries at most this many bytes of records (a single larger append goes alone).
    max_batch_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # Appends waiting for one partition's writer, in events: beyond it an append fails RATE_LIMITED at once.
    max_queued_events: int = Field(default=100_000, ge=1)
    # Back-pressure: appends to a partition whose read side (stream index, projections) is more than this
    # many records behind fail RATE_LIMITED until it catches up (services/read_lag.py); 0: no bound.
    max_read_lag: int = Field(default=100_000, ge=0)
    read_default_count: int = Field(default=100, ge=1)
    read_max_count: int = Field(default=1_000, ge=1)
    # ReadStream waits (read-your-writes) until the stream index has what was written; default and bound.
    read_wait_ms: int = Field(default=5_000, ge=0)
    read_max_wait_ms: int = Field(default=60_000, ge=0)
    # Live subscriptions (gRPC and SSE together) one gateway serves; beyond it Subscribe is RATE_LIMITED.
    max_subscribers: int = Field(default=1_000, ge=1)
    # A subscriber that takes no event for this long is disconnected (it can resume from its position).
    subscriber_write_timeout_ms: int = Field(default=30_000, ge=100)


class ReadModelsSettings(_Frozen):
    """query-read-model: the projection engine and queries."""

    # A handler that fails is retried this many times in all (backoff doubling from handler_backoff_ms),
    # then its event goes to `<topic>.DLT` and the projection continues with the next one.
    handler_max_attempts: int = Field(default=3, ge=1)
    handler_backoff_ms: int = Field(default=100, ge=0)
    batch_size: int = Field(default=500, ge=1)
    # Default wait for `min_position` when a call gives no wait_timeout_ms; calls may ask up to the max.
    default_wait_ms: int = Field(default=5_000, ge=0)
    max_wait_ms: int = Field(default=60_000, ge=0)
    # How often an instance looks at the shared registry (rebuilds started or swapped by another instance).
    registry_poll_ms: int = Field(default=1_000, ge=50)


class RequestReplySettings(_Frozen):
    """request-reply: the deployment's reply topic, timeouts and how long replies are kept."""

    # One reply topic per deployment (the gateways sharing one Redis), consumed by one group they share:
    # whichever instance consumes a reply stores it in Redis and wakes the caller's instance (README).
    # Empty means derived from the deployment id kept in Redis (`kpg.replies.<id>`, `kpg-replies-<id>`), so
    # deployments sharing a Kafka cluster never take each other's replies; an explicit value wins.
    reply_topic: str = Field(default="", pattern=r"^([A-Za-z0-9._-]{1,249})?$")
    reply_topic_partitions: int = Field(default=6, ge=1)
    reply_group: str = Field(default="", max_length=249)
    default_timeout_ms: int = Field(default=10_000, ge=1)
    max_timeout_ms: int = Field(default=60_000, ge=1)
    # How long a reply (and a timed-out request's record) stays in Redis for GetReply.
    reply_ttl_ms: int = Field(default=300_000, ge=1_000)
    max_payload_bytes: int = Field(default=1024 * 1024, ge=1)


class SagasSettings(_Frozen):
    """start-saga: the orchestrator's reply topic, its sweeps and the read side."""

    # Replies come back on one topic per saga database (the gateways sharing it), consumed by one group they
    # share. Empty means derived from the database's id (`kpg.sagas.<id>.replies`, `kpg-sagas-<id>`).
    reply_topic: str = Field(default="", pattern=r"^([A-Za-z0-9._-]{1,249})?$")
    reply_topic_partitions: int = Field(default=6, ge=1)
    reply_group: str = Field(default="", max_length=249)
    # How often each instance looks for steps past their deadline (the step timeouts' resolution).
    sweep_interval_ms: int = Field(default=250, ge=10)
    # A change whose record is not known to be on Kafka this long after it was written is sent again (the
    # instance that wrote it died before sending); same message id, so participants deduplicate it.
    dispatch_grace_ms: int = Field(default=5_000, ge=100)
    max_input_bytes: int = Field(default=1024 * 1024, ge=1)
    list_default_limit: int = Field(default=100, ge=1)
    list_max_limit: int = Field(default=1_000, ge=1)
    # Live WatchSaga streams (gRPC and SSE together) one gateway serves; beyond it RATE_LIMITED.
    max_watchers: int = Field(default=1_000, ge=1)
    # A watcher looks at the database this often even without a change notification.
    watch_poll_ms: int = Field(default=1_000, ge=10)


class DeadLettersSettings(_Frozen):
    """DLT reprocessing: the state topic, listing pages and reprocessing chunks."""

    # Compacted topic holding each dead letter's state (REPROCESSED, DISCARDED), shared by every gateway
    # on the cluster: dead-letter ids name their topic, which is cluster-wide too.
    state_topic: str = Field(default="kpg.dlt.state", pattern=r"^[A-Za-z0-9._-]{1,249}$")
    list_default_limit: int = Field(default=100, ge=1)
    list_max_limit: int = Field(default=1_000, ge=1)
    # A page ends early (with a next_page_token) before its dead letters pass this many bytes, so it fits a
    # client's default 4 MiB message limit whatever their stack traces.
    page_max_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    # Ids one Reprocess or Discard may name.
    max_ids: int = Field(default=10_000, ge=1)
    # Replays sent per Kafka transaction (with their states): the unit a kill can cut a Reprocess at.
    batch_size: int = Field(default=500, ge=1)
    # Reading a DLT range, the state topic, or initialising a writer, fails BACKEND_UNAVAILABLE past this.
    scan_timeout_ms: int = Field(default=30_000, ge=100)
    # A Reprocess killed mid-transaction holds up read_committed readers of its target (an event topic's
    # projections, say) until the broker aborts it after this long, or the next Reprocess does at once.
    transaction_timeout_ms: int = Field(default=10_000, ge=1_000)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="KPG_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    database: DatabaseSettings = DatabaseSettings()
    grpc: GrpcSettings = GrpcSettings()
    rest: RestSettings = RestSettings()
    health: HealthSettings = HealthSettings()
    events: EventsSettings = EventsSettings()
    read_models: ReadModelsSettings = ReadModelsSettings()
    request_reply: RequestReplySettings = RequestReplySettings()
    sagas: SagasSettings = SagasSettings()
    dead_letters: DeadLettersSettings = DeadLettersSettings()
    definitions: Path | None = None
    # Gateway processes sharing the gRPC and REST ports (SO_REUSEPORT); 0 (the default) means one per core,
    # 1 one process and no supervisor. Each worker owns a share of the partitions' writers (workers.py).
    workers: int = Field(default=0, ge=0, le=256)
    # uvloop: the lower request-reply p99 in each of five paired runs (BENCHMARKS.md);
    # asyncio: the standard library's loop (also used where uvloop is not installed).
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    state_dir: Path = Path(".state")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "text"] = "auto"
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    # A worker whose event loop stays blocked this long (a deadlock) dumps its threads and exits, and the
    # supervisor starts it again (observability.report_loop_stalls); 0: never.
    loop_stall_exit_s: float = Field(default=60.0, ge=0)

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{(self.state_dir / 'gateway.db').resolve()}"
