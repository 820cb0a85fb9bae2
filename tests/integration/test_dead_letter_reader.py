"""Reading dead-letter topics on a real Kafka (services/dead_letters.py): the three formats side by side,
record counts, keyset pages that return each record once, the filters, and one record by position."""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from confluent_kafka import Producer

from gateway.adapters.kafka import KafkaAdmin, PartitionScanner, TopicSpec
from gateway.domain.dead_letters import DeadLetterFilter, DltFormat, Failure, dlt_headers
from gateway.errors import InvalidArgument, NotFound
from gateway.services.dead_letters import DeadLetterReader
from tests.conftest import Backends

FAILED_AT = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


Headers = list[tuple[str, str | bytes | None]]


def kpg(error_class: str, offset: int) -> Headers:
    failure = Failure("orders.events", 0, offset, None, "kpg-rm", error_class, "boom", "", 3, FAILED_AT)
    return [(name, value) for name, value in dlt_headers([("ce_type", b"OrderPlaced")], failure)]


SPRING: Headers = [
    ("kafka_dlt-original-topic", b"payments"),
    ("kafka_dlt-original-partition", struct.pack(">i", 4)),
    ("kafka_dlt-original-offset", struct.pack(">q", 77)),
    ("kafka_dlt-exception-fqcn", b"java.lang.IllegalStateException"),
    ("kafka_dlt-exception-message", b"card expired"),
]
ENVELOPE = {
    "originalTopic": "billing",
    "originalPartition": 0,
    "originalOffset": 5,
    "errorClass": "TypeError",
    "errorMessage": "x is undefined",
    "payload": {"invoice": 9},
}


@pytest.fixture
async def reader(backends: Backends) -> AsyncIterator[DeadLetterReader]:
    scanner = PartitionScanner(backends.kafka())
    try:
        yield DeadLetterReader(KafkaAdmin(backends.kafka()), scanner)
    finally:
        await scanner.close()


@pytest.fixture
async def dlt(backends: Backends, unique: str) -> str:
    """A dead-letter topic holding two partitions' worth of records in all three formats and one unknown."""
    topic = f"{unique}.orders.DLT"
    await KafkaAdmin(backends.kafka()).ensure_topics([TopicSpec(topic, 2)])
    producer = Producer({"bootstrap.servers": backends.bootstrap_servers})
    for i, error_class in enumerate(["ValueError", "KeyError", "ValueError"]):
        producer.produce(
            topic, b'{"n": %d}' % i, key=b"order-%d" % i, partition=0, headers=kpg(error_class, i)
        )
    producer.produce(topic, b"no details", key=b"x", partition=0, headers=[("x-custom", b"1")])
    producer.produce(topic, b"spring", key=b"order-1", partition=1, headers=SPRING)
    producer.produce(topic, json.dumps(ENVELOPE).encode(), key=b"env", partition=1)
    assert producer.flush(10) == 0
    return topic


async def test_topics_are_listed_with_their_record_counts(reader: DeadLetterReader, dlt: str) -> None:
    listed = {t.topic: t for t in await reader.topics()}
    assert (listed[dlt].partitions, listed[dlt].record_count) == (2, 6)
    assert all(name.endswith(".DLT") for name in listed)


async def test_pages_return_every_record_once_in_order_with_its_format(
    reader: DeadLetterReader, dlt: str
) -> None:
    seen = []
    token = ""
    pages = 0
    while True:
        page = await reader.list_dead_letters(dlt, DeadLetterFilter(), limit=4, page_token=token)
        seen += page.dead_letters
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 2
    assert [(d.partition, d.offset) for d in seen] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    formats = [d.details.format for d in seen]
    assert formats == [DltFormat.KPG] * 3 + [DltFormat.UNKNOWN, DltFormat.SPRING, DltFormat.JSON_ENVELOPE]
    spring, envelope = seen[4].details, seen[5].details
    assert (spring.original_topic, spring.original_partition, spring.original_offset) == ("payments", 4, 77)
    assert (envelope.original_topic, envelope.payload) == ("billing", b'{"invoice":9}')
    assert seen[0].id == f"{dlt}:0:0" and seen[3].details.payload == b"no details"


async def test_filters(reader: DeadLetterReader, dlt: str) -> None:
    async def ids(filters: DeadLetterFilter) -> list[str]:
        return [d.id for d in (await reader.list_dead_letters(dlt, filters, limit=100)).dead_letters]

    assert await ids(DeadLetterFilter(error_class="ValueError")) == [f"{dlt}:0:0", f"{dlt}:0:2"]
    assert await ids(DeadLetterFilter(original_topic="payments")) == [f"{dlt}:1:0"]
    assert await ids(DeadLetterFilter(key=b"order-1")) == [f"{dlt}:0:1", f"{dlt}:1:0"]
    failed_at = int(FAILED_AT.timestamp() * 1000)
    ours = "orders.events"
    assert await ids(DeadLetterFilter(until_ms=failed_at + 1, original_topic=ours)) == [
        f"{dlt}:0:0",
        f"{dlt}:0:1",
        f"{dlt}:0:2",
    ]
    assert await ids(DeadLetterFilter(since_ms=failed_at + 1, original_topic=ours)) == []


async def test_one_record_by_position_and_the_errors(reader: DeadLetterReader, dlt: str) -> None:
    letter = await reader.get(dlt, 1, 1)
    assert letter.details.format is DltFormat.JSON_ENVELOPE and letter.key == b"env"
    for partition, offset in [(1, 2), (2, 0), (0, -1)]:
        with pytest.raises(NotFound):
            await reader.get(dlt, partition, offset)
    with pytest.raises(NotFound):
        await reader.list_dead_letters(dlt.removesuffix(".DLT") + "-missing.DLT", DeadLetterFilter())
    with pytest.raises(InvalidArgument):
        await reader.list_dead_letters("orders.events", DeadLetterFilter())
    with pytest.raises(InvalidArgument):
        await reader.list_dead_letters(dlt, DeadLetterFilter(), page_token="garbage")
    with pytest.raises(InvalidArgument):
        await reader.list_dead_letters(dlt, DeadLetterFilter(), limit=100_000)
