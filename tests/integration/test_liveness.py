"""Liveness of the building blocks on the real Kafka, Redis and databases: cancellation reaches a task
stuck in a Redis call; the consumer runner never dies and dead-letters what keeps failing; the stream
index only moves forward and reports database trouble as BackendUnavailable."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
import redis.asyncio

from gateway.adapters.kafka import (
    AsyncProducer,
    ConsumerRunner,
    FailurePolicy,
    KafkaAdmin,
    PartitionScanner,
    Record,
    TopicSpec,
)
from gateway.adapters.redis import LeaseStore, RedisClient
from gateway.adapters.sql import Database, StreamIndex
from gateway.devstack.processes import free_port
from gateway.domain.events import StoredEvent
from gateway.errors import BackendUnavailable
from gateway.services.dead_letter_writer import DeadLetterWriter
from gateway.services.events import PartitionWriter
from gateway.services.read_lag import ReadLag
from gateway.settings import EventsSettings, RedisSettings
from gateway.tasks import stop_task
from tests.conftest import Backends
from tests.integration.test_kafka_adapters import _collect

pytestmark = pytest.mark.integration


# --- cancellation inside a Redis call --------------------------------------------------------------------


def _hide_cancellation(client: RedisClient, script: str) -> None:
    """Make the driver report an interrupted call as a connection error, as redis-py does in some paths
    (seen in production: the renewer's cancellation surfaced as BackendUnavailable)."""
    real = client.scripts[script]

    async def call(*args: object, **kwargs: object) -> object:
        try:
            return await real(*args, **kwargs)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            raise redis.ConnectionError("Connection closed by server.") from None

    client.scripts[script] = call  # type: ignore[assignment]


async def test_a_renewer_cancelled_inside_a_redis_call_stops_and_lets_the_lease_expire(
    backends: Backends, unique: str
) -> None:
    client = RedisClient(RedisSettings(url=backends.redis_url, socket_timeout_s=30))
    admin = redis.asyncio.Redis.from_url(backends.redis_url)
    settings = EventsSettings(lease_ttl_ms=1000, lease_renew_ms=50)
    writer = PartitionWriter(
        topic=f"it.renew.{unique}",
        partition=0,
        kafka=backends.kafka(),
        settings=settings,
        leases=LeaseStore(client),
        index=StreamIndex(Database("sqlite://")),
        scanner=PartitionScanner(backends.kafka()),
        admin=KafkaAdmin(backends.kafka()),
        read_lag=ReadLag(max_lag=0),
    )
    lease = f"kpg:lease:{writer.lease_name}"
    try:
        assert await writer.leases.acquire(writer.lease_name, "token", settings.lease_ttl_ms)
        writer._token = "token"
        _hide_cancellation(client, "lease_renew")
        writer._renewer = asyncio.create_task(writer._renew())
        await asyncio.sleep(0.2)
        assert await admin.pttl(lease) > 0  # renewed and held
        await admin.execute_command(  # type: ignore[no-untyped-call]
            "CLIENT", "PAUSE", "1500", "WRITE"
        )  # the next renewal blocks in Redis
        await asyncio.sleep(0.2)
        renewer = writer._renewer
        await writer._release()  # cancels the renewer in the middle of its Redis call
        assert renewer.done(), "the renewer swallowed its cancellation"
        await asyncio.sleep(1.6)  # Redis answers again; nothing may renew the lease any more
        await asyncio.sleep(settings.lease_ttl_ms / 1000 + 0.2)
        assert not await admin.exists(lease), "the lease is still being renewed"
    finally:
        writer._token = "not-ours"  # even a renewer that ignores cancellation ends on a lost lease
        await admin.execute_command(  # type: ignore[no-untyped-call]
            "CLIENT", "UNPAUSE"
        )
        await admin.aclose()
        await client.close()


async def test_redis_client_turns_a_hidden_cancellation_back_into_one(backends: Backends) -> None:
    client = RedisClient(RedisSettings(url=backends.redis_url))
    admin = redis.asyncio.Redis.from_url(backends.redis_url)
    _hide_cancellation(client, "lease_renew")

    async def renew_forever() -> None:
        for _ in range(100):  # bounded, so that a swallowed cancellation fails the test, not hangs it
            try:
                await LeaseStore(client).renew("x", "token", 1000)
            except BackendUnavailable:
                continue  # a loop that retries on outages, as many do

    try:
        await admin.execute_command(  # type: ignore[no-untyped-call]
            "CLIENT", "PAUSE", "1000", "WRITE"
        )
        task = asyncio.create_task(renew_forever())
        await asyncio.sleep(0.1)
        assert await stop_task(task, 0.5), "the cancellation was swallowed"
        assert task.cancelled()
    finally:
        await admin.execute_command(  # type: ignore[no-untyped-call]
            "CLIENT", "UNPAUSE"
        )
        await admin.aclose()
        await client.close()


# --- the consumer runner's failure policy ----------------------------------------------------------------


async def test_the_runner_survives_outages_and_dead_letters_a_poison_record(
    backends: Backends, unique: str
) -> None:
    topic, group = f"it.policy.{unique}", f"it-policy-{unique}"
    admin = KafkaAdmin(backends.kafka())
    await admin.ensure_topics([TopicSpec(topic, 1), TopicSpec(f"{topic}.DLT", 1)])
    producer = AsyncProducer(backends.kafka())
    processed: list[bytes] = []
    calls = {"outage": 3, "bug": 2}
    all_done = asyncio.Event()

    async def handle(batch: Sequence[Record]) -> None:
        if calls["outage"]:
            calls["outage"] -= 1
            raise BackendUnavailable("the database is down")  # never counts against a record
        if calls["bug"]:
            calls["bug"] -= 1
            raise RuntimeError("a bug that goes away")  # retried, then fine
        if any(r.value == b"poison" for r in batch):
            raise ValueError("cannot handle this one")
        processed.extend(r.value or b"" for r in batch)
        if b"last" in processed:
            all_done.set()

    runner = ConsumerRunner(
        backends.kafka(),
        group_id=group,
        topics=[topic],
        handler=handle,
        policy=FailurePolicy(max_attempts=3, backoff_s=0.01, dead_letter=DeadLetterWriter(producer)),
    )
    try:
        await producer.produce_many(
            topic, [(b"k", v, [("h", b"1")]) for v in (b"a", b"b", b"poison", b"c", b"last")]
        )
        await runner.start()
        await runner.start()  # idempotent: still one loop
        await asyncio.wait_for(all_done.wait(), 60)
        assert processed.count(b"c") == 1 and b"poison" not in processed
        assert set(processed) == {b"a", b"b", b"c", b"last"}
        [dead] = await _collect(backends, f"{topic}.DLT", f"dlt-reader-{unique}", 1)
        assert dead.value == b"poison" and dead.key == b"k"
        assert dead.header("h") == b"1"
        assert dead.header("kpg-dlt-original-topic") == topic.encode()
        assert dead.header("kpg-dlt-original-offset") == b"2"
        assert dead.header("kpg-dlt-consumer-group") == group.encode()
        assert dead.header("kpg-dlt-error-class") == b"builtins.ValueError"
        assert dead.header("kpg-dlt-attempts") == b"3"
        assert runner._task is not None and not runner._task.done()
    finally:
        await runner.stop()
        await producer.close()
    # Committed past the poison record only after its dead letter: a new runner starts after "last".
    fresh: list[bytes] = []

    async def count(batch: Sequence[Record]) -> None:
        fresh.extend(r.value or b"" for r in batch)

    again = ConsumerRunner(backends.kafka(), group_id=group, topics=[topic], handler=count)
    await again.start()
    await asyncio.sleep(2)
    await again.stop()
    assert fresh == []


async def test_the_runner_keeps_a_record_it_cannot_dead_letter(backends: Backends, unique: str) -> None:
    """No dead-letter topic to write to: the record is retried, never skipped or committed past."""
    topic, group = f"it.nodlt.{unique}", f"it-nodlt-{unique}"
    await KafkaAdmin(backends.kafka()).ensure_topics([TopicSpec(topic, 1)])  # and no .DLT topic
    producer = AsyncProducer(backends.kafka())
    seen: list[bytes] = []

    async def handle(batch: Sequence[Record]) -> None:
        seen.extend(r.value or b"" for r in batch)
        raise ValueError("always")

    runner = ConsumerRunner(
        backends.kafka(),
        group_id=group,
        topics=[topic],
        handler=handle,
        policy=FailurePolicy(max_attempts=2, backoff_s=0.01, dead_letter=DeadLetterWriter(producer)),
    )
    try:
        await producer.produce(topic, b"poison", key=b"k")
        await runner.start()
        async with asyncio.timeout(30):
            while seen.count(b"poison") < 6:  # noqa: ASYNC110 (a handler's log: nothing to await)
                await asyncio.sleep(0.05)
        assert runner._task is not None and not runner._task.done()
    finally:
        await runner.stop()
        await producer.close()


# --- the stream index --------------------------------------------------------------------------------


def _event(stream: str, version: int, offset: int) -> StoredEvent:
    return StoredEvent(
        event_id=str(uuid.uuid4()),
        category="c",
        stream_id=stream,
        version=version,
        type="T",
        data=b"{}",
        content_type="application/json",
        metadata={},
        recorded_at=datetime.now(UTC),
        topic="t",
        partition=0,
        offset=offset,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


def test_index_heads_and_progress_only_move_forward(database_url: str) -> None:
    database = Database(database_url)
    index = StreamIndex(database)
    stream = f"s-{uuid.uuid4().hex[:8]}"
    try:
        index.apply([_event(stream, 1, 10), _event(stream, 2, 11)], {("t", 0): 12})
        # A second loop (or a restarted one) commits an older batch late: nothing goes backwards.
        index.apply([_event(stream, 1, 10)], {("t", 0): 11})
        assert index.heads([("c", stream)]) == {("c", stream): 2}
        assert index.progress([("t", 0)]) == {("t", 0): 12}
        # A batch that mixes old and new events keeps the new and skips the known versions.
        index.apply([_event(stream, 2, 11), _event(stream, 3, 12)], {("t", 0): 13})
        events, head = index.read("c", stream, from_version=0, max_count=10, backwards=False)
        assert head == 3 and [e.version for e in events] == [1, 2, 3]
    finally:
        database.close()


def test_index_reports_database_trouble_as_backend_unavailable() -> None:
    database = Database(f"postgresql://nobody:nothing@127.0.0.1:{free_port()}/none")
    index = StreamIndex(database)
    try:
        with pytest.raises(BackendUnavailable):
            index.progress([("t", 0)])
        with pytest.raises(BackendUnavailable):
            index.apply([_event("s", 1, 0)], {("t", 0): 1})
    finally:
        database.close()


async def test_the_stream_indexer_starts_once_however_often_start_up_is_retried(
    backends: Backends, tmp_path: Path, unique: str
) -> None:
    from gateway.services.stream_indexer import StreamIndexer

    topic = f"it.once.{unique}.events"
    await KafkaAdmin(backends.kafka()).ensure_topics([TopicSpec(topic, 1)])
    producer = AsyncProducer(backends.kafka())
    database = Database(f"sqlite:///{tmp_path / 'once.db'}")
    indexer = StreamIndexer(
        backends.kafka(), StreamIndex(database), topics=[topic], dead_letters=DeadLetterWriter(producer)
    )
    try:
        await asyncio.gather(indexer.start(), indexer.start())  # a retried start-up racing the first
        await indexer.start()
        runner = indexer._runner
        assert runner is not None and runner._task is not None and not runner._task.done()
        loops = [t for t in asyncio.all_tasks() if t.get_name() == f"consumer:{runner.group_id}"]
        assert len(loops) == 1
    finally:
        await indexer.stop(5.0)
        await producer.close()
        database.close()
