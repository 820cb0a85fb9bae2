"""An in-process EventStore on the real Kafka, Redis and a SQLite database of its own.

`start_indexer=False` gives a store whose stream index never moves: the harshest "lagging read side"
there is, which the write path must not depend on.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import TopicPartition

from gateway.adapters.kafka import AsyncProducer, KafkaAdmin, PartitionScanner, TopicSpec
from gateway.adapters.redis import IdempotencyStore, LeaseStore, RedisClient
from gateway.adapters.sql import Database, StreamIndex
from gateway.definitions import Definitions, parse_definitions
from gateway.domain.events import AppendRequest, Expectation, Expected, NewEvent, partition_for
from gateway.services.dead_letter_writer import DeadLetterWriter
from gateway.services.events import EventStore, event_topic_config
from gateway.services.idempotency import Idempotency, IdempotencySettings
from gateway.services.stream_indexer import StreamIndexer
from gateway.settings import EventsSettings, RedisSettings
from tests.conftest import Backends
from tests.support import checking_consumer


@dataclass
class Kit:
    store: EventStore
    indexer: StreamIndexer
    index: StreamIndex
    redis: RedisClient
    admin: KafkaAdmin
    topic: str
    category: str


def definitions_for(category: str, topic: str, partitions: int) -> Definitions:
    return parse_definitions({"categories": {category: {"topic": topic, "partitions": partitions}}})


async def create_event_topic(backends: Backends, topic: str, partitions: int, **config: str) -> None:
    admin = KafkaAdmin(backends.kafka())
    await admin.ensure_topics(
        [TopicSpec(topic, partitions, {**event_topic_config(backends.kafka()), **config})]
    )


@asynccontextmanager
async def event_store(
    backends: Backends,
    database: Path,
    *,
    category: str,
    topic: str,
    partitions: int = 1,
    start_indexer: bool = True,
    redis_url: str | None = None,
    **events_settings: Any,
) -> AsyncIterator[Kit]:
    kafka = backends.kafka()
    redis = RedisClient(RedisSettings(url=redis_url or backends.redis_url))
    admin = KafkaAdmin(kafka)
    producer = AsyncProducer(kafka)
    db = Database(f"sqlite:///{database}")
    index = StreamIndex(db)
    indexer = StreamIndexer(kafka, index, topics=[topic], dead_letters=DeadLetterWriter(producer))
    settings = EventsSettings(**{"lease_ttl_ms": 2000, **events_settings})
    store = EventStore(
        settings=settings,
        kafka=kafka,
        definitions=definitions_for(category, topic, partitions),
        admin=admin,
        leases=LeaseStore(redis),
        idempotency=Idempotency(IdempotencyStore(redis), IdempotencySettings()),
        indexer=indexer,
        scanner=PartitionScanner(kafka),
    )
    await admin.ensure_topics(store.topics())
    if start_indexer:
        await indexer.start()
    try:
        yield Kit(store, indexer, index, redis, admin, topic, category)
    finally:
        await store.close(5.0)
        await indexer.stop(5.0)
        await producer.close(5.0)
        await redis.close()
        db.close()


def append(
    category: str,
    stream: str,
    count: int = 1,
    *,
    expected: Expected | None = None,
    key: str = "",
    ids: list[str] | None = None,
    data: bytes = b'{"n": 1}',
) -> AppendRequest:
    events = tuple(
        NewEvent(
            event_id=ids[i] if ids else str(uuid.uuid4()),
            type="Tick",
            data=data,
            client_id=ids is not None,
        )
        for i in range(count)
    )
    return AppendRequest(category, stream, events, expected=expected or Expected(), idempotency_key=key)


def exact(version: int) -> Expected:
    return Expected(Expectation.EXACT, version)


def versions_on_kafka(backends: Backends, topic: str, stream: str, partitions: int) -> list[int]:
    """Every version of `stream` in the log (read_committed), in log order, read by a plain consumer."""
    partition = partition_for(stream, partitions)
    consumer = checking_consumer(backends.bootstrap_servers, **{"enable.partition.eof": True})
    consumer.assign([TopicPartition(topic, partition, 0)])
    found: list[int] = []
    try:
        while True:
            message = consumer.poll(10)
            assert message is not None, "no end of partition within 10s"
            if message.error():
                break  # end of partition
            headers = dict(message.headers() or [])
            if message.key() == stream.encode() and "ce_streamversion" in headers:
                found.append(int(headers["ce_streamversion"] or b"0"))
    finally:
        consumer.close()
    return found
