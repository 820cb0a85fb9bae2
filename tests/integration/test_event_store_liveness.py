"""The event store's write path on the real Kafka, Redis and SQLite, where it used to stall or lose:
take-over with a read side that never moves, lost history, read-your-writes, callers that give up,
retries after Redis forgot, records Kafka refuses, partitions added later."""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from confluent_kafka import TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    NewPartitions,
    ResourceType,
)

from gateway.domain.events import AppendResult, Expectation, Expected, ReadStreamQuery, partition_for
from gateway.errors import (
    BackendUnavailable,
    IdempotencyKeyInFlight,
    PayloadTooLarge,
    ReadModelBehind,
    WrongExpectedVersion,
)
from tests.conftest import Backends
from tests.integration.event_store_kit import (
    append,
    create_event_topic,
    event_store,
    exact,
    versions_on_kafka,
)

pytestmark = pytest.mark.integration

NO_STREAM = Expected(Expectation.NO_STREAM)


def _redis_db(backends: Backends, db: int) -> str:
    return backends.redis_url.rsplit("/", 1)[0] + f"/{db}"


async def test_taking_a_partition_never_waits_for_the_index(
    backends: Backends, tmp_path: Path, unique: str
) -> None:
    """Two writers whose stream indexes never move: each learns the heads from the log itself."""
    topic, category = f"it.lag.{unique}.events", f"lag{unique}"
    streams = [f"s{i}" for i in range(20)]
    first_db, second_db = tmp_path / "first.db", tmp_path / "second.db"
    kw: dict[str, Any] = {"category": category, "topic": topic, "partitions": 2, "start_indexer": False}
    async with event_store(backends, first_db, **kw) as first:
        for _ in range(5):
            await asyncio.gather(*(first.store.append(append(category, s)) for s in streams))
    async with event_store(backends, second_db, **kw) as second:
        started = time.monotonic()
        results = await asyncio.gather(
            *(second.store.append(append(category, s, expected=exact(5))) for s in streams)
        )
        print(
            "take-over of 2 partitions + 20 appends, index 100 events behind: "
            f"{time.monotonic() - started:.3f}s"
        )
        assert {r.first_version for r in results} == {6}
        with pytest.raises(WrongExpectedVersion) as conflict:
            await second.store.append(append(category, streams[0], expected=NO_STREAM))
        assert conflict.value.metadata["actual"] == "6"
    # The first writer comes back knowing the log only up to where it left: it reads the rest.
    async with event_store(backends, first_db, **kw) as first:
        result = await first.store.append(append(category, streams[1], expected=exact(6)))
        assert result.first_version == 7
    assert versions_on_kafka(backends, topic, streams[1], 2) == list(range(1, 8))
    assert versions_on_kafka(backends, topic, streams[0], 2) == list(range(1, 7))


async def test_history_deleted_before_it_was_indexed_is_refused_not_guessed(
    backends: Backends, tmp_path: Path, unique: str
) -> None:
    topic, category = f"it.gone.{unique}.events", f"gone{unique}"
    kw: dict[str, Any] = {"category": category, "topic": topic, "start_indexer": False}
    async with event_store(backends, tmp_path / "a.db", **kw) as writer:
        for _ in range(3):
            last = await writer.store.append(append(category, "s"))
        end = last.last_offset + 1  # not the last stable offset: it may lag a moment behind a commit
    # What retention does to an old segment: the log now starts after the stream's events.
    admin = AdminClient({"bootstrap.servers": backends.bootstrap_servers})
    for future in admin.delete_records([TopicPartition(topic, 0, end)]).values():
        future.result()
    async with event_store(backends, tmp_path / "fresh.db", **kw) as fresh:
        with pytest.raises(BackendUnavailable):
            await fresh.store.append(append(category, "s", expected=NO_STREAM))
    assert versions_on_kafka(backends, topic, "s", 1) == []  # nothing written: version 1 was not reused


async def test_event_topics_are_kept_forever_and_hold_large_records(
    backends: Backends, tmp_path: Path, unique: str
) -> None:
    topic, category = f"it.keep.{unique}.events", f"keep{unique}"
    async with event_store(backends, tmp_path / "k.db", category=category, topic=topic):
        pass
    admin = AdminClient({"bootstrap.servers": backends.bootstrap_servers})
    resource = ConfigResource(ResourceType.TOPIC, topic)
    configs = admin.describe_configs([resource])[resource].result()
    assert configs["retention.ms"].value == "-1"
    assert configs["retention.bytes"].value == "-1"
    assert int(configs["max.message.bytes"].value) >= 4 * 1024 * 1024 + 1024 * 1024


async def test_read_stream_reads_its_own_writes_without_a_position(
    backends: Backends, tmp_path: Path, unique: str
) -> None:
    topic, category = f"it.ryw.{unique}.events", f"ryw{unique}"
    async with event_store(backends, tmp_path / "r.db", category=category, topic=topic, partitions=3) as kit:

        async def write_then_read(stream: str) -> None:
            for n in range(1, 4):
                result = await kit.store.append(append(category, stream))
                events, head = await kit.store.read_stream(ReadStreamQuery(category, stream))
                assert head == result.last_version == n
                assert [e.version for e in events] == list(range(1, n + 1))

        await asyncio.gather(*(write_then_read(f"s{i}") for i in range(30)))


async def test_read_stream_waits_a_bounded_time_for_an_index_that_does_not_move(
    backends: Backends, tmp_path: Path, unique: str
) -> None:
    topic, category = f"it.stuck.{unique}.events", f"stuck{unique}"
    async with event_store(
        backends, tmp_path / "s.db", category=category, topic=topic, start_indexer=False
    ) as kit:
        await kit.store.append(append(category, "s"))
        started = time.monotonic()
        with pytest.raises(ReadModelBehind):
            await kit.store.read_stream(ReadStreamQuery(category, "s", wait_timeout_ms=300))
        assert time.monotonic() - started < 5


async def test_a_retry_after_the_caller_gave_up_never_appends_twice(
    backends: Backends, tmp_path: Path, unique: str
) -> None:
    """The first call is cancelled at every moment of its life (queued, planned, mid-transaction)."""
    topic, category = f"it.cancel.{unique}.events", f"cancel{unique}"
    async with event_store(backends, tmp_path / "c.db", category=category, topic=topic) as kit:
        for trial, delay_ms in enumerate(range(0, 40, 2)):
            stream, key = f"s{trial}", f"key-{unique}-{trial}"
            first = asyncio.ensure_future(kit.store.append(append(category, stream, 3, key=key)))
            await asyncio.sleep(delay_ms / 1000)
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            while True:
                try:
                    result = await kit.store.append(append(category, stream, 3, key=key))
                    break
                except IdempotencyKeyInFlight:
                    await asyncio.sleep(0.02)
            assert (result.first_version, result.last_version) == (1, 3)
            assert versions_on_kafka(backends, topic, stream, 1) == [1, 2, 3], (
                f"cancelled after {delay_ms} ms"
            )


async def test_a_retry_after_redis_forgot_the_key_never_appends_twice(
    backends: Backends, tmp_path: Path, unique: str
) -> None:
    topic, category = f"it.forgot.{unique}.events", f"forgot{unique}"
    url = _redis_db(backends, 6)
    async with event_store(backends, tmp_path / "f.db", category=category, topic=topic, redis_url=url) as kit:
        first = await kit.store.append(append(category, "s", 2, key=f"k-{unique}"))
        flusher = redis.asyncio.Redis.from_url(url)
        await flusher.flushdb()
        await flusher.aclose()
        again = await kit.store.append(append(category, "s", 2, key=f"k-{unique}"))
        assert (again.first_version, again.last_version, again.duplicate) == (1, 2, True)
        assert again.first_offset == first.first_offset
    assert versions_on_kafka(backends, topic, "s", 1) == [1, 2]


async def test_the_same_event_ids_with_a_refreshed_expected_version_are_a_duplicate(
    backends: Backends, tmp_path: Path, unique: str
) -> None:
    topic, category = f"it.ids.{unique}.events", f"ids{unique}"
    ids = [str(uuid.uuid4()), str(uuid.uuid4())]
    async with event_store(backends, tmp_path / "i.db", category=category, topic=topic) as kit:
        first = await kit.store.append(append(category, "s", 2, ids=ids, expected=exact(0)))
        again = await kit.store.append(append(category, "s", 2, ids=ids, expected=exact(2)))
        assert (again.first_version, again.last_version, again.duplicate) == (1, 2, True)
        assert not first.duplicate
    assert versions_on_kafka(backends, topic, "s", 1) == [1, 2]


async def test_callers_that_give_up_never_fail_the_others(
    backends: Backends, tmp_path: Path, unique: str
) -> None:
    topic, category = f"it.quit.{unique}.events", f"quit{unique}"
    async with event_store(backends, tmp_path / "q.db", category=category, topic=topic) as kit:
        for round_ in range(5):
            calls = [
                asyncio.ensure_future(
                    kit.store.append(append(category, f"r{round_}-{i}", ids=[str(uuid.uuid4())]))
                )
                for i in range(100)
            ]
            quitters = set(random.sample(range(100), 50))

            async def quit_later(call: asyncio.Future[AppendResult]) -> None:
                await asyncio.sleep(random.uniform(0, 0.03))
                call.cancel()

            await asyncio.gather(*(quit_later(calls[i]) for i in quitters))
            results = await asyncio.gather(*calls, return_exceptions=True)
            for i, result in enumerate(results):
                if i not in quitters:
                    assert not isinstance(result, BaseException), f"append {i} failed: {result!r}"


async def test_a_record_kafka_refuses_fails_alone(backends: Backends, tmp_path: Path, unique: str) -> None:
    topic, category = f"it.big.{unique}.events", f"big{unique}"
    await create_event_topic(backends, topic, 1, **{"max.message.bytes": "100000"})
    async with event_store(backends, tmp_path / "b.db", category=category, topic=topic) as kit:
        calls = [kit.store.append(append(category, f"small-{i}")) for i in range(10)]
        calls.insert(
            5,
            kit.store.append(append(category, "big", data=b'"' + os.urandom(100_000).hex().encode() + b'"')),
        )
        calls += [kit.store.append(append(category, f"small-{i}")) for i in range(10, 20)]
        results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[5], PayloadTooLarge), results[5]
    failures = [r for i, r in enumerate(results) if i != 5 and isinstance(r, BaseException)]
    assert not failures, failures
    assert versions_on_kafka(backends, topic, "big", 1) == []


async def test_partitions_added_later_never_move_a_stream(
    backends: Backends, tmp_path: Path, unique: str
) -> None:
    topic, category = f"it.grow.{unique}.events", f"grow{unique}"
    streams = [f"s{i}" for i in range(20)]
    database = tmp_path / "g.db"
    async with event_store(backends, database, category=category, topic=topic, partitions=2) as kit:
        before = {s: (await kit.store.append(append(category, s))).partition for s in streams}
    admin = AdminClient({"bootstrap.servers": backends.bootstrap_servers})
    for future in admin.create_partitions([NewPartitions(topic, 6)]).values():
        future.result()
    assert any(partition_for(s, 6) != p for s, p in before.items())  # they would move
    async with event_store(backends, database, category=category, topic=topic, partitions=6) as kit:
        for s in streams:
            result = await kit.store.append(append(category, s, expected=exact(1)))
            assert (result.partition, result.first_version) == (before[s], 2)


async def test_read_stream_reads_a_write_made_through_another_gateway(
    backends: Backends, tmp_path: Path, unique: str
) -> None:
    topic, category = f"it.other.{unique}.events", f"other{unique}"
    kw: dict[str, Any] = {"category": category, "topic": topic, "partitions": 2}
    async with (
        event_store(backends, tmp_path / "writer.db", **kw) as writer,
        event_store(backends, tmp_path / "reader.db", **kw) as reader,
    ):
        for i in range(20):
            stream = f"s{i}"
            result = await writer.store.append(append(category, stream, 2))
            events, head = await reader.store.read_stream(ReadStreamQuery(category, stream))
            assert head == result.last_version == 2 and [e.version for e in events] == [1, 2]
