"""The Kafka adapters against the real broker: what the producer writes, the consumer runner reads."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import pytest

from gateway.adapters.kafka import (
    AsyncProducer,
    ConsumerRunner,
    FailurePolicy,
    KafkaAdmin,
    Record,
    TopicSpec,
)
from gateway.devstack.processes import free_port
from gateway.errors import BackendUnavailable, NotFound
from tests.conftest import Backends
from tests.support import eventually

pytestmark = pytest.mark.integration


async def _collect(backends: Backends, topic: str, group: str, count: int) -> list[Record]:
    received: list[Record] = []
    done = asyncio.Event()

    async def handle(batch: Sequence[Record]) -> None:
        received.extend(batch)
        if len(received) >= count:
            done.set()

    runner = ConsumerRunner(backends.kafka(), group_id=group, topics=[topic], handler=handle)
    await runner.start()
    try:
        await asyncio.wait_for(done.wait(), 60)
    finally:
        await runner.stop()
    return received


async def test_produced_records_are_consumed_with_key_and_headers(backends: Backends, unique: str) -> None:
    topic = f"it.roundtrip.{unique}"
    admin = KafkaAdmin(backends.kafka())
    assert await admin.ensure_topics([TopicSpec(topic, 2)]) == [topic]
    assert (await admin.list_topics())[topic] == 2
    producer = AsyncProducer(backends.kafka())
    try:
        deliveries = await producer.produce_many(
            topic,
            [
                (b"stream-1", f"event-{i}".encode(), [("ce_type", b"Tested"), ("n", str(i).encode())])
                for i in range(5)
            ],
        )
    finally:
        await producer.close()

    # Same key, same partition, contiguous offsets in send order.
    assert len({d.partition for d in deliveries}) == 1
    assert [d.offset for d in deliveries] == list(range(deliveries[0].offset, deliveries[0].offset + 5))

    records = await _collect(backends, topic, f"it-group-{unique}", 5)
    assert [r.value for r in records] == [f"event-{i}".encode() for i in range(5)]
    assert {r.key for r in records} == {b"stream-1"}
    assert [r.header("n") for r in records] == [str(i).encode() for i in range(5)]
    assert all(r.header("ce_type") == b"Tested" for r in records)
    assert [(r.partition, r.offset) for r in records] == [(d.partition, d.offset) for d in deliveries]


async def test_committed_offsets_are_not_redelivered_and_failures_are_retried(
    backends: Backends, unique: str
) -> None:
    topic = f"it.commit.{unique}"
    group = f"it-commit-{unique}"
    await KafkaAdmin(backends.kafka()).ensure_topics([TopicSpec(topic, 1)])
    producer = AsyncProducer(backends.kafka())
    try:
        for i in range(3):
            await producer.produce(topic, f"first-{i}".encode(), key=b"k")

        # A handler that fails once: the batch is retried from its first record, nothing is skipped.
        seen: list[bytes] = []
        done = asyncio.Event()
        failures = 0

        async def flaky(batch: Sequence[Record]) -> None:
            nonlocal failures
            if failures == 0:
                failures += 1
                raise RuntimeError("transient")
            seen.extend(r.value or b"" for r in batch)
            if len(seen) >= 3:
                done.set()

        runner = ConsumerRunner(
            backends.kafka(),
            group_id=group,
            topics=[topic],
            handler=flaky,
            policy=FailurePolicy(backoff_s=0.05),
        )
        await runner.start()
        await asyncio.wait_for(done.wait(), 60)
        await runner.stop()
        assert failures == 1
        assert seen == [b"first-0", b"first-1", b"first-2"]

        # The same group resumes after its committed offsets.
        await producer.produce(topic, b"second", key=b"k")
    finally:
        await producer.close()
    records = await _collect(backends, topic, group, 1)
    assert [r.value for r in records] == [b"second"]


async def test_a_handler_that_does_not_return_is_reported_with_where_it_waits(
    backends: Backends, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    topic = f"it.stuck.{unique}"
    await KafkaAdmin(backends.kafka()).ensure_topics([TopicSpec(topic, 1)])
    producer = AsyncProducer(backends.kafka())
    try:
        await producer.produce(topic, b"held", key=b"k")
    finally:
        await producer.close()
    release = asyncio.Event()
    handled = asyncio.Event()

    async def waits_for_something_that_never_comes(batch: Sequence[Record]) -> None:
        await release.wait()
        handled.set()

    runner = ConsumerRunner(
        backends.kafka(),
        group_id=f"it-stuck-{unique}",
        topics=[topic],
        handler=waits_for_something_that_never_comes,
        step_report_s=0.6,
    )
    caplog.set_level(logging.ERROR, logger="gateway.adapters.kafka.consumer")
    await runner.start()
    try:
        await _until(lambda: any("handling 1 record(s)" in r.message for r in caplog.records))
        [report] = [r.message for r in caplog.records if "handling 1 record(s)" in r.message]
        assert f"consumer it-stuck-{unique}: handling 1 record(s) for " in report
        assert "in waits_for_something_that_never_comes" in report and "await release.wait()" in report
        await asyncio.sleep(1.0)  # reported once per step, not again and again
        assert sum("handling 1 record(s)" in r.message for r in caplog.records) == 1
        release.set()
        await asyncio.wait_for(handled.wait(), 10)
    finally:
        await runner.stop()


async def test_each_rebalance_step_is_logged_with_what_the_member_holds(
    backends: Backends, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    topic = f"it.rebalance.{unique}"
    await KafkaAdmin(backends.kafka()).ensure_topics([TopicSpec(topic, 2)])

    async def ignore(batch: Sequence[Record]) -> None:
        pass

    first, second = (
        ConsumerRunner(backends.kafka(), group_id=f"it-rebalance-{unique}", topics=[topic], handler=ignore)
        for _ in range(2)
    )
    caplog.set_level(logging.INFO, logger="gateway.adapters.kafka.consumer")
    await first.start()
    try:
        await _until(lambda: len(first.assignment) == 2)
        await second.start()
        await _until(lambda: len(first.assignment) == 1 and len(second.assignment) == 1)
        [(_, moved)] = second.assignment
    finally:
        await asyncio.gather(first.stop(), second.stop())
    lines = [r.message for r in caplog.records if r.message.startswith(f"consumer it-rebalance-{unique}: ")]
    assert any(f"assigned {topic}[0,1]; now holds {topic}[0,1]" in line for line in lines), lines
    assert any(f"revoked {topic}[{moved}]; now holds " in line for line in lines), lines
    assert any(f"assigned {topic}[{moved}]; now holds {topic}[{moved}]" in line for line in lines), lines
    assert len({line.rsplit("(member ", 1)[1] for line in lines}) == 2  # each member names itself


async def test_a_batch_handled_record_by_record_does_not_hold_up_a_rebalance(
    backends: Backends, unique: str
) -> None:
    """Every record of the first member's batch fails: it handles them one by one (two attempts each, then
    a dead letter), which takes seconds, and a second member joining meanwhile gets its partition then, not
    once the whole batch is through. Nothing is lost: each record is dead-lettered, or handled by the new
    owner of its partition."""
    topic = f"it.settle.{unique}"
    group = f"it-settle-{unique}"
    await KafkaAdmin(backends.kafka()).ensure_topics([TopicSpec(topic, 2)])
    producer = AsyncProducer(backends.kafka())
    per_partition = 60
    try:
        await asyncio.gather(
            *(
                producer.produce(topic, f"{p}-{i}".encode(), partition=p)
                for p in range(2)
                for i in range(per_partition)
            )
        )
    finally:
        await producer.close()
    dead: list[Record] = []
    handled: list[Record] = []

    async def always_fails(batch: Sequence[Record]) -> None:
        raise ValueError("poison")

    async def to_dead_letters(record: Record, error: BaseException, attempts: int, group_id: str) -> None:
        await asyncio.sleep(0.05)
        dead.append(record)

    async def handle(batch: Sequence[Record]) -> None:
        handled.extend(batch)

    first = ConsumerRunner(
        backends.kafka(),
        group_id=group,
        topics=[topic],
        handler=always_fails,
        policy=FailurePolicy(max_attempts=2, backoff_s=0.02, dead_letter=to_dead_letters),
        linger_s=2.0,  # the whole backlog in its first batch
    )
    second = ConsumerRunner(backends.kafka(), group_id=group, topics=[topic], handler=handle)
    await first.start()
    try:
        await _until(lambda: len(dead) >= 5)
        await second.start()
        await _until(lambda: second.assignment)
        assert len(dead) < per_partition, "the second member got a partition only after the whole batch"
        [(_, moved)] = second.assignment
        await _until(lambda: len(dead) + len(handled) >= 2 * per_partition)
    finally:
        await asyncio.gather(first.stop(), second.stop())
    # None lost. (At least once: a commit refused while the group rebalances sends a record round again.)
    assert {(r.partition, r.offset) for r in [*dead, *handled]} == {
        (p, o) for p in range(2) for o in range(per_partition)
    }
    assert {r.partition for r in handled} == {moved}


async def test_missing_topic_is_not_found(backends: Backends, unique: str) -> None:
    producer = AsyncProducer(backends.kafka(delivery_timeout_ms=5000))
    try:
        with pytest.raises(NotFound, match="does not exist"):
            await producer.produce(f"it.missing.{unique}", b"x")
    finally:
        await producer.close()


async def test_unreachable_broker_fails_instead_of_acknowledging() -> None:
    from gateway.settings import KafkaSettings

    producer = AsyncProducer(
        KafkaSettings(
            bootstrap_servers=f"127.0.0.1:{free_port()}", delivery_timeout_ms=1500, request_timeout_ms=1000
        )
    )
    try:
        with pytest.raises(BackendUnavailable):
            await producer.produce("anything", b"x")
    finally:
        await producer.close(timeout_s=0.5)
    admin = KafkaAdmin(KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}"))
    assert await admin.ping(0.5) is False


async def test_watermarks(backends: Backends, unique: str) -> None:
    topic = f"it.watermarks.{unique}"
    admin = KafkaAdmin(backends.kafka())
    await admin.ensure_topics([TopicSpec(topic, 2)])
    producer = AsyncProducer(backends.kafka())
    try:
        delivery = await producer.produce(topic, b"x", key=b"k")
        await producer.produce(topic, b"y", key=b"k")
    finally:
        await producer.close()
    marks = await admin.watermarks(topic)
    assert marks[delivery.partition] == (0, 2)
    assert marks[1 - delivery.partition] == (0, 0)


async def _until(predicate: Callable[[], object], timeout_s: float = 60) -> None:
    async def check() -> object:
        return predicate()

    await eventually(check, timeout_s=timeout_s)


class _StoredOffsets:
    """Start offsets kept "with the data", as the stream index and projections keep them: unreadable (an
    outage) until `available` is set."""

    def __init__(self, start: dict[tuple[str, int], int]) -> None:
        self.start = start
        self.available = False
        self.failed = 0

    def __call__(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        if not self.available:
            self.failed += 1
            raise BackendUnavailable("the database is down")
        return {tp: self.start.get(tp, 0) for tp in partitions}


async def _produce_to_partitions(backends: Backends, topic: str, per_partition: dict[int, int]) -> None:
    producer = AsyncProducer(backends.kafka())
    try:
        for partition, count in per_partition.items():
            for i in range(count):
                await producer.produce(topic, f"{partition}-{i}".encode(), partition=partition)
    finally:
        await producer.close()


def _stored_runner(
    backends: Backends, topic: str, group: str, stored: _StoredOffsets, seen: list[tuple[int, int]]
) -> ConsumerRunner:
    async def handle(batch: Sequence[Record]) -> None:
        seen.extend((r.partition, r.offset) for r in batch)

    async def moved(positions: dict[tuple[str, int], int]) -> None:
        pass

    return ConsumerRunner(
        backends.kafka(),
        group_id=group,
        topics=[topic],
        handler=handle,
        start_offsets=stored,
        on_positions=moved,
    )


async def test_partitions_assigned_while_their_start_offsets_are_unreadable_start_there_later(
    backends: Backends, unique: str
) -> None:
    # Not from Kafka's committed offsets (there are none: the offsets live with the data), which would
    # read each partition again from the beginning.
    topic = f"it.stored.{unique}"
    await KafkaAdmin(backends.kafka()).ensure_topics([TopicSpec(topic, 2)])
    await _produce_to_partitions(backends, topic, {0: 10, 1: 4})
    stored = _StoredOffsets({(topic, 0): 7, (topic, 1): 2})
    seen: list[tuple[int, int]] = []
    runner = _stored_runner(backends, topic, f"it-stored-{unique}", stored, seen)
    await runner.start()
    try:
        await _until(lambda: stored.failed >= 3 and len(runner.assignment) == 2)
        assert seen == []  # nothing is read while the start offsets are unknown
        stored.available = True
        await _until(lambda: len(seen) >= 5)
        await asyncio.sleep(0.5)  # nothing more arrives
    finally:
        await runner.stop()
    assert sorted(seen) == [(0, 7), (0, 8), (0, 9), (1, 2), (1, 3)]


async def test_a_rebalance_while_start_offsets_are_unreadable_hands_every_partition_over(
    backends: Backends, unique: str
) -> None:
    topic = f"it.stored.{unique}"
    group = f"it-stored-{unique}"
    await KafkaAdmin(backends.kafka()).ensure_topics([TopicSpec(topic, 4)])
    await _produce_to_partitions(backends, topic, {p: 3 for p in range(4)})
    stored = _StoredOffsets({(topic, p): 1 for p in range(4)})
    seen: list[tuple[int, int]] = []
    first = _stored_runner(backends, topic, group, stored, seen)
    second = _stored_runner(backends, topic, group, stored, seen)
    await first.start()
    try:
        await _until(lambda: len(first.assignment) == 4)
        # The second member joins: the first gives up partitions it never assigned (their offsets unread).
        await second.start()
        await _until(lambda: first.assignment and second.assignment)
        stored.available = True
        await _until(lambda: len(seen) >= 8)
        await asyncio.sleep(0.5)
        assert first.assignment | second.assignment == {(topic, p) for p in range(4)}
    finally:
        await asyncio.gather(first.stop(), second.stop())
    assert sorted(seen) == [(p, o) for p in range(4) for o in (1, 2)]
