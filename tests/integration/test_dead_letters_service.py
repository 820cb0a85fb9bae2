"""The DeadLetters service on a real Kafka (services/dead_letters.py). Reading: the three formats side by
side, record counts, keyset pages that return each record once, the filters, one record by position.
Reprocess and Discard: replays carry the contract's headers and go to the original partition, a record is
replayed at most once unless forced (also by two instances at once), states are shared through the state
topic, and the errors."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import cast

import pytest
from confluent_kafka import Producer

from gateway.adapters.kafka import KafkaAdmin, PartitionScanner, TopicSpec, TransactionalProducer
from gateway.definitions import parse_definitions
from gateway.domain.dead_letters import DeadLetterFilter, DeadLetterState, DltFormat, Failure, dlt_headers
from gateway.errors import InvalidArgument, NotFound, TopicNotAllowed
from gateway.services.dead_letters import DeadLetters, ReprocessRequest, ReprocessResult
from gateway.settings import DeadLettersSettings
from tests.conftest import Backends
from tests.support import checking_consumer

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


def service_on(
    backends: Backends, state_topic: str, *targets: str, page_max_bytes: int = 1 << 20
) -> DeadLetters:
    """A DeadLetters service as the gateway builds it, with its own state topic (one per test)."""
    settings = DeadLettersSettings(state_topic=state_topic, batch_size=3, page_max_bytes=page_max_bytes)
    kafka = backends.kafka()
    definitions = parse_definitions({"dead_letters": {"targets": list(targets)}})
    return DeadLetters(
        settings=settings,
        admin=KafkaAdmin(kafka),
        scanners=lambda: PartitionScanner(kafka),
        writers=lambda transactional_id: TransactionalProducer(
            kafka, transactional_id, transaction_timeout_ms=settings.transaction_timeout_ms
        ),
        replay_allowed=definitions.replay_allowed,
    )


@pytest.fixture
async def service(backends: Backends, unique: str) -> AsyncIterator[DeadLetters]:
    built = service_on(backends, f"{unique}.dlt.state", f"{unique}.elsewhere")
    async with running(built, backends) as started:
        yield started


@asynccontextmanager
async def running(service: DeadLetters, backends: Backends) -> AsyncIterator[DeadLetters]:
    await KafkaAdmin(backends.kafka()).ensure_topics(service.topics())
    try:
        yield service
    finally:
        await service.stop(5)


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


async def test_topics_are_listed_with_their_record_counts(service: DeadLetters, dlt: str) -> None:
    listed = {t.topic: t for t in await service.list_topics()}
    assert (listed[dlt].partitions, listed[dlt].record_count) == (2, 6)
    assert all(name.endswith(".DLT") for name in listed)


async def test_pages_return_every_record_once_in_order_with_its_format(
    service: DeadLetters, dlt: str
) -> None:
    seen = []
    token = ""
    pages = 0
    while True:
        page = await service.list_dead_letters(dlt, DeadLetterFilter(), limit=4, page_token=token)
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


async def test_filters(service: DeadLetters, dlt: str) -> None:
    async def ids(filters: DeadLetterFilter) -> list[str]:
        return [d.id for d in (await service.list_dead_letters(dlt, filters, limit=100)).dead_letters]

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


async def test_one_record_by_position_and_the_errors(service: DeadLetters, dlt: str) -> None:
    letter = await service.get(dlt, 1, 1)
    assert letter.details.format is DltFormat.JSON_ENVELOPE and letter.key == b"env"
    for partition, offset in [(1, 2), (2, 0), (0, -1)]:
        with pytest.raises(NotFound):
            await service.get(dlt, partition, offset)
    with pytest.raises(NotFound):
        await service.list_dead_letters(dlt.removesuffix(".DLT") + "-missing.DLT", DeadLetterFilter())
    with pytest.raises(InvalidArgument):
        await service.list_dead_letters("orders.events", DeadLetterFilter())
    with pytest.raises(InvalidArgument):
        await service.list_dead_letters(dlt, DeadLetterFilter(), page_token="garbage")
    with pytest.raises(InvalidArgument):
        await service.list_dead_letters(dlt, DeadLetterFilter(), limit=100_000)


# --- Reprocess and Discard -----------------------------------------------------------------------------


@pytest.fixture
async def failed(backends: Backends, unique: str) -> str:
    """`<unique>.orders.DLT` holding 7 of the gateway's dead letters of `<unique>.orders` (3 partitions),
    each from the partition its key's murmur2 would not necessarily pick, and one with no original topic."""
    source = f"{unique}.orders"
    await KafkaAdmin(backends.kafka()).ensure_topics(
        [TopicSpec(source, 3), TopicSpec(f"{source}.DLT", 1), TopicSpec(f"{unique}.elsewhere", 2)]
    )
    producer = Producer({"bootstrap.servers": backends.bootstrap_servers})
    for i in range(7):
        failure = Failure(source, i % 3, 10 + i, None, "kpg-rm-t", "ValueError", "bad", "", 3, FAILED_AT)
        headers = dlt_headers([("ce_type", b"OrderPlaced"), ("x-trace", b"t-%d" % i)], failure)
        producer.produce(f"{source}.DLT", b"order %d" % i, key=b"k-%d" % i, headers=list(headers))
    producer.produce(f"{source}.DLT", b"who knows", key=b"u", headers=[("x-custom", b"1")])
    assert producer.flush(10) == 0
    return f"{source}.DLT"


def consume_all(
    backends: Backends, topic: str, expected: int
) -> list[tuple[int, bytes, bytes, dict[str, bytes]]]:
    """(partition, key, value, headers) of every record of `topic`, read until `expected` are seen and then
    for one more second (so a surplus would be caught)."""
    consumer = checking_consumer(backends.bootstrap_servers)
    consumer.subscribe([topic])
    found: list[tuple[int, bytes, bytes, dict[str, bytes]]] = []
    deadline = time.monotonic() + 30
    quiet_until = None
    try:
        while time.monotonic() < deadline and (quiet_until is None or time.monotonic() < quiet_until):
            message = consumer.poll(0.2)
            if message is None or message.error() is not None:
                continue
            raw_headers = cast("list[tuple[str, bytes | None]]", message.headers() or [])
            headers = {name: raw or b"" for name, raw in raw_headers}
            found.append((message.partition() or 0, message.key() or b"", message.value() or b"", headers))
            if len(found) >= expected and quiet_until is None:
                quiet_until = time.monotonic() + 1.0
    finally:
        consumer.close()
    return found


async def test_reprocess_replays_each_record_once_to_its_original_partition(
    backends: Backends, service: DeadLetters, failed: str
) -> None:
    source = failed.removesuffix(".DLT")
    dry = await service.reprocess(ReprocessRequest(failed, dry_run=True))
    assert (dry.selected, dry.reprocessed, dry.skipped, dry.failed) == (8, 7, 0, 1)

    first = await service.reprocess(ReprocessRequest(failed))
    assert (first.selected, first.reprocessed, first.skipped, first.failed) == (8, 7, 0, 1)
    again = await service.reprocess(ReprocessRequest(failed))
    assert (again.selected, again.reprocessed, again.skipped, again.failed) == (8, 0, 7, 1)

    replays = consume_all(backends, source, 7)
    assert sorted(key for _, key, _, _ in replays) == [b"k-%d" % i for i in range(7)]
    for partition, key, value, headers in replays:
        i = int(key.split(b"-")[1])
        assert (partition, value) == (i % 3, b"order %d" % i)
        assert headers["x-trace"] == b"t-%d" % i and headers["ce_type"] == b"OrderPlaced"
        assert headers["kpg-replayed-from"] == f"{failed}:0:{i}".encode()
        assert headers["kpg-replay-count"] == b"1"
        assert headers["kpg-replay-consumer-group"] == b"kpg-rm-t"
        assert not [name for name in headers if name.startswith("kpg-dlt-")]

    listed = await service.list_dead_letters(failed, DeadLetterFilter(state=DeadLetterState.REPROCESSED))
    assert [d.offset for d in listed.dead_letters] == list(range(7))
    assert all(d.reprocess_count == 1 for d in listed.dead_letters)
    new = await service.list_dead_letters(failed, DeadLetterFilter(state=DeadLetterState.NEW))
    assert [d.offset for d in new.dead_letters] == [7]


async def test_force_replays_again_and_counts_it(
    backends: Backends, service: DeadLetters, failed: str
) -> None:
    one = [f"{failed}:0:2"]
    assert (await service.reprocess(ReprocessRequest(failed, ids=one))).reprocessed == 1
    assert (await service.reprocess(ReprocessRequest(failed, ids=one))).skipped == 1
    forced = await service.reprocess(ReprocessRequest(failed, ids=one, force=True))
    assert (forced.selected, forced.reprocessed, forced.skipped) == (1, 1, 0)
    assert (await service.get(failed, 0, 2)).reprocess_count == 2
    replays = consume_all(backends, failed.removesuffix(".DLT"), 2)
    assert sorted(h["kpg-replay-count"] for _, _, _, h in replays) == [b"1", b"2"]


async def test_a_record_back_in_the_dlt_after_a_replay_shows_its_count(
    backends: Backends, service: DeadLetters, failed: str
) -> None:
    """A replayed record that fails again is dead-lettered with the replay headers it carried."""
    await service.reprocess(ReprocessRequest(failed, ids=[f"{failed}:0:0"]))
    ((_, key, value, headers),) = consume_all(backends, failed.removesuffix(".DLT"), 1)
    failure = Failure(
        failed.removesuffix(".DLT"), 0, 99, None, "kpg-rm-t", "ValueError", "again", "", 3, FAILED_AT
    )
    producer = Producer({"bootstrap.servers": backends.bootstrap_servers})
    producer.produce(failed, value, key=key, headers=list(dlt_headers(list(headers.items()), failure)))
    assert producer.flush(10) == 0
    back = await service.get(failed, 0, 8)
    assert (back.state, back.reprocess_count, back.details.error_message) == (DeadLetterState.NEW, 1, "again")
    await service.reprocess(ReprocessRequest(failed, ids=[back.id]))
    assert (await service.get(failed, 0, 8)).reprocess_count == 2


async def test_a_target_topic_must_be_allowed_and_never_internal(
    backends: Backends, service: DeadLetters, failed: str, unique: str
) -> None:
    moved = await service.reprocess(
        ReprocessRequest(failed, ids=[f"{failed}:0:7"], target_topic=f"{unique}.elsewhere")
    )
    assert (moved.reprocessed, moved.failed) == (1, 0)
    ((_, key, value, _),) = consume_all(backends, f"{unique}.elsewhere", 1)
    assert (key, value) == (b"u", b"who knows")
    for target in [f"{unique}.other", "kpg.sagas.DLT", "__consumer_offsets", failed]:
        with pytest.raises(TopicNotAllowed):
            await service.reprocess(ReprocessRequest(failed, target_topic=target))
    anything = service_on(backends, f"{unique}.dlt.state", "*")
    async with running(anything, backends):
        for target in ["kpg.dlt.state", "_schemas", failed]:
            with pytest.raises(TopicNotAllowed):
                await anything.reprocess(ReprocessRequest(failed, target_topic=target))


async def test_selection_errors(service: DeadLetters, failed: str) -> None:
    with pytest.raises(InvalidArgument):
        await service.reprocess(
            ReprocessRequest(failed, ids=[f"{failed}:0:1"], filters=DeadLetterFilter(error_class="X"))
        )
    with pytest.raises(InvalidArgument):
        await service.reprocess(ReprocessRequest(failed, ids=["other.DLT:0:1"]))
    with pytest.raises(NotFound):
        await service.reprocess(ReprocessRequest(failed, ids=[f"{failed}:0:99"]))
    with pytest.raises(NotFound):
        await service.reprocess(ReprocessRequest(failed, ids=[f"{failed}:3:0"]))
    with pytest.raises(InvalidArgument):
        await service.discard(failed, [], "why")
    with pytest.raises(InvalidArgument):
        await service.discard(failed, [f"{failed}:0:1"], " ")


async def test_discarded_records_are_skipped_unless_forced(service: DeadLetters, failed: str) -> None:
    ids = [f"{failed}:0:1", f"{failed}:0:3"]
    assert await service.discard(failed, ids, "customer cancelled") == 2
    assert await service.discard(failed, [*ids, f"{failed}:0:4"], "again") == 1
    letter = await service.get(failed, 0, 1)
    assert (letter.state, letter.resolution.reason) == (DeadLetterState.DISCARDED, "customer cancelled")
    result = await service.reprocess(
        ReprocessRequest(failed, filters=DeadLetterFilter(error_class="ValueError"))
    )
    assert (result.selected, result.reprocessed, result.skipped) == (7, 4, 3)
    forced = await service.reprocess(ReprocessRequest(failed, ids=ids, force=True))
    assert forced.reprocessed == 2
    assert (await service.get(failed, 0, 1)).state is DeadLetterState.REPROCESSED


async def test_two_instances_at_once_replay_each_record_once(
    backends: Backends, failed: str, unique: str
) -> None:
    """Two services (as two gateways) with their own views of the state topic reprocess the same DLT at
    the same time: the transactional fence lets each record through once."""
    state_topic = f"{unique}.dlt.state"
    async with (
        running(service_on(backends, state_topic), backends) as one,
        running(service_on(backends, state_topic), backends) as two,
    ):
        results = await asyncio.gather(
            *(s.reprocess(ReprocessRequest(failed)) for s in [one, two, one, two]), return_exceptions=True
        )
        done = [r for r in results if isinstance(r, ReprocessResult)]
        assert done, results
        assert sum(r.reprocessed for r in done) == 7
        assert all(r.reprocessed + r.skipped == 7 for r in done)
        # Each sees what the other did.
        for s in (one, two):
            page = await s.list_dead_letters(failed, DeadLetterFilter(state=DeadLetterState.REPROCESSED))
            assert len(page.dead_letters) == 7
    replays = consume_all(backends, failed.removesuffix(".DLT"), 7)
    assert sorted(key for _, key, _, _ in replays) == [b"k-%d" % i for i in range(7)]


async def test_a_page_ends_before_its_byte_budget(backends: Backends, failed: str, unique: str) -> None:
    """However large the records, a page stays within `page_max_bytes` (one record at least), and the
    pages still return every record once."""
    async with running(service_on(backends, f"{unique}.dlt.state", page_max_bytes=1024), backends) as small:
        seen: list[int] = []
        pages, token = 0, ""
        while True:
            page = await small.list_dead_letters(failed, DeadLetterFilter(), limit=100, page_token=token)
            assert page.dead_letters and sum(d.size for d in page.dead_letters[1:]) <= 1024
            seen += [d.offset for d in page.dead_letters]
            pages, token = pages + 1, page.next_page_token
            if not token:
                break
    assert seen == list(range(8)) and pages >= 3
