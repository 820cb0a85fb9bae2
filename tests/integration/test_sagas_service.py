"""The saga orchestrator in-process, on a real Kafka, Redis and SQLite database: of two instances on one
database only the owner of a saga's partition drives it, two writers of one saga version never both win,
and a change whose record never reached Kafka (a crash between the commit and the send) is sent by the
sweep, once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from confluent_kafka import Producer, TopicPartition
from prometheus_client import REGISTRY

from gateway.adapters.kafka import KafkaAdmin, TopicSpec
from gateway.adapters.redis import ChangeFeed, IdempotencyStore, RedisClient
from gateway.adapters.sql import Database, SagaStore
from gateway.definitions import parse_definitions
from gateway.domain.sagas import Saga, SagaPlan, SagaStatus, StartRequest, StepStatus, on_deadline, start
from gateway.errors import BackendUnavailable
from gateway.services.idempotency import Idempotency, IdempotencySettings
from gateway.services.sagas import Sagas
from gateway.settings import SagasSettings
from tests.conftest import Backends
from tests.support import checking_consumer, eventually

REPLY_PARTITIONS = 4


def definitions(topic: str) -> dict[str, object]:
    # A step nobody answers, due at once: every sweep finds it overdue.
    step = {"name": "ask", "topic": topic, "command": "Ask"}
    return {"sagas": {"silent": {"step_timeout_ms": 1, "max_attempts": 5, "steps": [step]}}}


@asynccontextmanager
async def orchestrator(
    backends: Backends, database_path: Path, topic: str, unique: str
) -> AsyncIterator[Sagas]:
    """One gateway instance's saga service, started, its background sweep idle (an hour apart): the test
    sweeps."""
    redis = RedisClient(backends.redis())
    database = Database(f"sqlite:///{database_path}")
    sagas = Sagas(
        settings=SagasSettings(
            reply_topic=f"{unique}.replies",
            reply_group=unique,
            dispatch_grace_ms=100,
            sweep_interval_ms=3_600_000,
            reply_topic_partitions=REPLY_PARTITIONS,
        ),
        kafka=backends.kafka(),
        definitions=parse_definitions(definitions(topic)),
        admin=KafkaAdmin(backends.kafka()),
        store=SagaStore(database),
        changes=ChangeFeed(redis, f"kpg:test:{unique}"),
        idempotency=Idempotency(IdempotencyStore(redis), IdempotencySettings()),
    )
    try:
        await sagas.start()
        yield sagas
    finally:
        await sagas.stop(5.0)
        await redis.close()
        database.close()


def commands_for(backends: Backends, topic: str, saga_id: str) -> list[bytes]:
    """The message ids of every command on `topic` for `saga_id` (the whole single-partition topic)."""
    consumer = checking_consumer(backends.bootstrap_servers)
    try:
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        consumer.assign([TopicPartition(topic, 0, 0)])
        found: list[bytes] = []
        position = 0
        while position < high:
            message = consumer.poll(5)
            assert message is not None, "the topic ended before its high watermark"
            position = (message.offset() or 0) + 1
            if message.error() is None and message.key() == saga_id.encode():
                found.append(dict(message.headers() or [])["kpg-message-id"])  # type: ignore[arg-type]
        return found
    finally:
        consumer.close()


async def owning_every_partition(*instances: Sagas) -> None:
    """Wait until the instances' consumers hold the reply topic's partitions between them (the group's
    rebalance, on the consumer thread, offers nothing to wait on)."""

    async def owned() -> bool:
        return len({p for sagas in instances for p in sagas.owned_partitions()}) == REPLY_PARTITIONS

    await eventually(owned, timeout_s=60)


async def test_two_instances_sweeping_one_saga_make_each_change_once(
    backends: Backends, tmp_path: Path, unique: str
) -> None:
    topic = f"{unique}.silent.commands"
    await KafkaAdmin(backends.kafka()).ensure_topics([TopicSpec(topic, 1)])
    resent_before = _sample("kpg_saga_step_timeouts_total", outcome="resent")
    async with (
        orchestrator(backends, tmp_path / "sagas.db", topic, unique) as first,
        orchestrator(backends, tmp_path / "sagas.db", topic, unique) as second,
    ):
        await owning_every_partition(first, second)
        assert set(first.owned_partitions()).isdisjoint(second.owned_partitions())
        saga_id = f"race-{unique}"
        await first.start_saga(StartRequest("silent", {}, saga_id=saga_id))
        rounds = 0
        async with asyncio.timeout(60):
            while not (await first.get(saga_id)).status.final:
                # Both sweep; only the owner of the saga's partition may turn a version into the next.
                await asyncio.gather(first.sweep_deadlines(), second.sweep_deadlines())
                rounds += 1
        final = await second.get(saga_id)
        history = await asyncio.to_thread(
            SagaStore(Database(f"sqlite:///{tmp_path / 'sagas.db'}")).history, final, 0
        )
    assert final.status is SagaStatus.COMPENSATED
    assert (final.steps[0].status, final.steps[0].attempts) == (StepStatus.TIMED_OUT, 5)
    assert [s.version for s in history] == list(range(1, 7))  # the start, 4 re-sends, the time-out
    # One send per attempt: the start's and each committed re-send's, never one per instance.
    assert commands_for(backends, topic, saga_id) == [f"{saga_id}/0/command".encode()] * 5
    assert _sample("kpg_saga_step_timeouts_total", outcome="resent") - resent_before == 4
    assert rounds >= 5


async def test_a_change_that_never_reached_kafka_is_sent_by_the_sweep_once(
    backends: Backends, tmp_path: Path, unique: str
) -> None:
    topic = f"{unique}.silent.commands"
    await KafkaAdmin(backends.kafka()).ensure_topics([TopicSpec(topic, 1)])
    saga_id = f"crashed-{unique}"
    # What a gateway that died between committing and sending leaves behind: a saga not dispatched.
    plan = SagaPlan.of("silent", parse_definitions(definitions(topic)).sagas["silent"])
    written = start(plan, saga_id, StartRequest("silent", {"n": 1}), datetime.now(UTC) - timedelta(seconds=5))
    store = SagaStore(Database(f"sqlite:///{tmp_path / 'sagas.db'}"))
    assert await asyncio.to_thread(store.create, written) is not None
    async with orchestrator(backends, tmp_path / "sagas.db", topic, unique) as sagas:
        await owning_every_partition(sagas)
        assert await sagas.sweep_undispatched() == 1
        assert await sagas.sweep_undispatched() == 0
        after = await sagas.get(saga_id)
    assert after.dispatched and after.version == 1 and after.steps[0].attempts == 1  # no attempt spent
    assert commands_for(backends, topic, saga_id) == [f"{saga_id}/0/command".encode()]


def _sample(name: str, **labels: str) -> float:
    total = 0.0
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def test_no_saga_starts_before_its_reply_topic_is_known(
    backends: Backends, tmp_path: Path, unique: str
) -> None:
    """Before start() (the database or Kafka not reached yet) a command could not name its reply topic."""
    redis = RedisClient(backends.redis())
    database = Database(f"sqlite:///{tmp_path / 'sagas.db'}")
    sagas = Sagas(
        settings=SagasSettings(),
        kafka=backends.kafka(),
        definitions=parse_definitions(definitions(f"{unique}.silent.commands")),
        admin=KafkaAdmin(backends.kafka()),
        store=SagaStore(database),
        changes=ChangeFeed(redis, f"kpg:test:{unique}"),
        idempotency=Idempotency(IdempotencyStore(redis), IdempotencySettings()),
    )
    try:
        with pytest.raises(BackendUnavailable):
            await sagas.start_saga(StartRequest("silent", {}))
    finally:
        await sagas.stop(5.0)
        await redis.close()
        database.close()


async def test_of_two_writers_of_one_saga_version_exactly_one_wins(tmp_path: Path) -> None:
    """The backstop for the moment a partition moves between instances: a change is a compare-and-set."""
    plan = SagaPlan.of("silent", parse_definitions(definitions("t")).sagas["silent"])
    saga = start(plan, "cas", StartRequest("silent", {}), datetime.now(UTC))
    stores = [SagaStore(Database(f"sqlite:///{tmp_path / 'sagas.db'}")) for _ in range(2)]
    assert stores[0].create(saga) is not None
    later = datetime.now(UTC) + timedelta(seconds=1)
    changes = [on_deadline(plan, saga, later) for _ in stores]
    assert all(c is not None and c.version == 2 for c in changes)
    written = await asyncio.gather(
        *(asyncio.to_thread(store.save, [c]) for store, c in zip(stores, changes, strict=True) if c)
    )
    assert sorted(len(w) for w in written) == [0, 1]
    assert [s.version for s in stores[1].history(saga, 0)] == [1, 2]


async def test_a_reply_on_another_partition_is_forwarded_to_its_sagas_owner(
    backends: Backends, tmp_path: Path, unique: str
) -> None:
    """A participant that does not key its reply by saga id: the reply still reaches the saga, through its
    partition (whose owner drives it)."""
    topic = f"{unique}.silent.commands"
    await KafkaAdmin(backends.kafka()).ensure_topics([TopicSpec(topic, 1)])
    forwarded_before = _sample("kpg_saga_replies_total", outcome="forwarded")
    async with orchestrator(backends, tmp_path / "sagas.db", topic, unique) as sagas:
        await owning_every_partition(sagas)
        saga = await sagas.start_saga(StartRequest("silent", {}, saga_id=f"fwd-{unique}"))
        producer = Producer({"bootstrap.servers": backends.bootstrap_servers})
        producer.produce(
            f"{unique}.replies",
            b'{"ok": true, "data": {"answer": 42}}',
            partition=(saga.partition + 1) % REPLY_PARTITIONS,
            headers=[("kpg-correlation-id", f"{saga.saga_id}/0/command".encode())],
        )
        assert producer.flush(10) == 0

        async def completed() -> bool:
            return (await sagas.get(saga.saga_id)).status is SagaStatus.COMPLETED

        await eventually(completed, timeout_s=30)
        final = await sagas.get(saga.saga_id)
    assert final.results == {"ask": {"answer": 42}}
    assert _sample("kpg_saga_replies_total", outcome="forwarded") - forwarded_before == 1


async def test_watchers_on_both_instances_see_every_version_in_order(
    backends: Backends, tmp_path: Path, unique: str
) -> None:
    """The owner's watcher gets the versions it commits handed over; the other instance's reads them from
    the history when Redis announces them. Both stream every version, in order, and end at the final one."""
    topic = f"{unique}.silent.commands"
    await KafkaAdmin(backends.kafka()).ensure_topics([TopicSpec(topic, 1)])
    async with (
        orchestrator(backends, tmp_path / "sagas.db", topic, unique) as first,
        orchestrator(backends, tmp_path / "sagas.db", topic, unique) as second,
    ):
        await owning_every_partition(first, second)
        saga = await first.start_saga(StartRequest("silent", {}, saga_id=f"watch-{unique}"))
        owner, other = (first, second) if saga.partition in first.owned_partitions() else (second, first)

        streams = [await sagas.watch(saga.saga_id) for sagas in (owner, other)]
        firsts = [(await anext(stream)).version for stream in streams]  # both open on version 1

        async def rest(stream: AsyncIterator[Saga]) -> list[int]:
            return [s.version async for s in stream]

        watchers = [asyncio.create_task(rest(stream)) for stream in streams]
        async with asyncio.timeout(60):
            while not (await owner.get(saga.saga_id)).status.final:
                await owner.sweep_deadlines()
                await asyncio.sleep(0.05)  # let the watchers stream between versions
            seen = await asyncio.gather(*watchers)
    assert firsts == [1, 1]
    assert seen == [list(range(2, 7)), list(range(2, 7))]
