"""Writer take-over time under a lagging stream index, and ReadStream-after-append latency.

    make up && .venv/bin/python loadtest/bench_liveness.py

1. Take-over: two event stores in this process (the code a gateway runs), sharing Kafka and Redis, each
   with a database of its own whose stream index never moves (the worst lag there is). They append to
   the same partition in turn, so every append takes the partition from the other: lease hand-over,
   fencing the other's transactional producer, and reading from the log what the other wrote.
   Then the first take-over by a store that has never seen the partition, for growing index lags: it
   reads the whole lag from the log (the index is not waited for).
2. ReadStream right after AppendEvents, through the running gateway (`make up`), with no position: the
   read waits until the stream index has the append. Idle, then while 16 other callers append.

Prints figures; asserts nothing about time (shared, noisy machines).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from kpg import GatewayClient
from kpg.v1 import event_store_pb2 as es

from gateway.adapters.kafka import AsyncProducer, KafkaAdmin, PartitionScanner
from gateway.adapters.redis import IdempotencyStore, LeaseStore, RedisClient
from gateway.adapters.sql import Database, StreamIndex
from gateway.definitions import parse_definitions
from gateway.domain.events import AppendRequest, NewEvent
from gateway.services.dead_letter_writer import DeadLetterWriter
from gateway.services.events import EventStore
from gateway.services.idempotency import Idempotency, IdempotencySettings
from gateway.services.stream_indexer import StreamIndexer
from gateway.settings import EventsSettings, KafkaSettings, RedisSettings


def _quantiles(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return f"p50 {statistics.median(ordered):.1f} ms, p99 {p99:.1f} ms (n={len(ordered)})"


@asynccontextmanager
async def _store(kafka: KafkaSettings, redis_url: str, topic: str, folder: Path) -> AsyncIterator[EventStore]:
    """An event store whose stream index is never started: it lags behind everything."""
    redis = RedisClient(RedisSettings(url=redis_url))
    producer = AsyncProducer(kafka)
    database = Database(f"sqlite:///{folder / uuid.uuid4().hex}.db")
    indexer = StreamIndexer(
        kafka, StreamIndex(database), topics=[topic], dead_letters=DeadLetterWriter(producer)
    )
    store = EventStore(
        settings=EventsSettings(),
        kafka=kafka,
        definitions=parse_definitions({"categories": {"bench": {"topic": topic, "partitions": 1}}}),
        admin=KafkaAdmin(kafka),
        leases=LeaseStore(redis),
        idempotency=Idempotency(IdempotencyStore(redis), IdempotencySettings()),
        indexer=indexer,
        scanner=PartitionScanner(kafka),
    )
    await KafkaAdmin(kafka).ensure_topics(store.topics())
    try:
        yield store
    finally:
        await store.close(5)
        await producer.close(5)
        await redis.close()
        database.close()


def _append(stream: str, count: int = 1) -> AppendRequest:
    events = tuple(NewEvent(str(uuid.uuid4()), "Bench", b'{"n": 1}', client_id=False) for _ in range(count))
    return AppendRequest("bench", stream, events)


async def takeovers(kafka: KafkaSettings, redis_url: str, rounds: int) -> None:
    topic = f"bench-takeover-{uuid.uuid4().hex[:8]}.events"
    with tempfile.TemporaryDirectory() as folder:
        async with (
            _store(kafka, redis_url, topic, Path(folder)) as first,
            _store(kafka, redis_url, topic, Path(folder)) as second,
        ):
            await first.append(_append("warm"))
            timings = []
            for i in range(rounds):
                store = second if i % 2 == 0 else first
                started = time.perf_counter()
                await store.append(_append(f"s{i % 10}"))
                timings.append(1000 * (time.perf_counter() - started))
            print(
                f"take-over by the other writer (append included), index never moving: {_quantiles(timings)}"
            )
        for lag in (1_000, 10_000, 50_000):
            topic = f"bench-lag-{uuid.uuid4().hex[:8]}.events"
            async with _store(kafka, redis_url, topic, Path(folder)) as writer:
                for _ in range(lag // 1000):
                    await writer.append(_append(f"s{uuid.uuid4().hex[:4]}", 1000))
            async with _store(kafka, redis_url, topic, Path(folder)) as fresh:
                started = time.perf_counter()
                await fresh.append(_append("after-lag"))
                took = 1000 * (time.perf_counter() - started)
            print(f"first take-over with the index {lag:>6} events behind (read from the log): {took:.0f} ms")


async def read_after_append(target: str, rounds: int) -> None:
    async with GatewayClient(target) as kpg:

        async def one() -> float:
            stream = f"ryw-{uuid.uuid4().hex[:10]}"
            await kpg.events.AppendEvents(
                es.AppendEventsRequest(
                    category="orders", stream_id=stream, events=[es.EventData(type="OrderPlaced", data=b"{}")]
                )
            )
            started = time.perf_counter()
            read = await kpg.events.ReadStream(es.ReadStreamRequest(category="orders", stream_id=stream))
            assert read.stream_version == 1
            return 1000 * (time.perf_counter() - started)

        idle = [await one() for _ in range(rounds)]
        print(f"ReadStream right after AppendEvents, idle gateway: {_quantiles(idle)}")
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                await kpg.events.AppendEvents(
                    es.AppendEventsRequest(
                        category="orders",
                        stream_id=f"load-{uuid.uuid4().hex[:6]}",
                        events=[es.EventData(type="OrderPlaced", data=b"{}")],
                    )
                )

        loaders = [asyncio.create_task(load()) for _ in range(16)]
        await asyncio.sleep(1)
        busy = [await one() for _ in range(rounds)]
        stop.set()
        await asyncio.gather(*loaders)
        print(f"ReadStream right after AppendEvents, 16 callers appending meanwhile: {_quantiles(busy)}")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    kafka = KafkaSettings(bootstrap_servers=args.bootstrap)
    await takeovers(kafka, args.redis_url, args.rounds)
    await read_after_append(args.target, args.rounds)


if __name__ == "__main__":
    asyncio.run(main())
