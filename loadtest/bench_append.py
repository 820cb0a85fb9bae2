"""Append throughput through the gateway next to raw confluent-kafka on the same broker, in one run.

    make up && .venv/bin/python loadtest/bench_append.py

Prints figures; asserts nothing about time (shared, noisy machines).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from kpg import GatewayClient
from kpg.v1 import event_store_pb2 as es

RAW_TOPIC = "bench.raw-produce"
DATA = json.dumps({"customer": "c-1", "total": 12.5, "items": ["a", "b", "c"]}).encode()


def ensure_raw_topic(bootstrap: str) -> str:
    """A topic like orders.events (6 partitions) for the raw figure: raw records must not land in the
    gateway's own topics, whose index would then have to consume them too."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(RAW_TOPIC, num_partitions=6, replication_factor=1)])
    try:
        futures[RAW_TOPIC].result(30)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise
    return RAW_TOPIC


def raw_produce(bootstrap: str, topic: str, count: int) -> float:
    """Events per second of an idempotent acks=all producer, flushed at the end."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
        }
    )
    started = time.perf_counter()
    for i in range(count):
        while True:
            try:
                producer.produce(topic, DATA, key=f"raw-{i % 500}".encode())
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    producer.flush(60)
    return count / (time.perf_counter() - started)


async def gateway_appends(target: str, *, appends: int, events_per_append: int, concurrency: int) -> float:
    """Events per second appended through AppendEvents by `concurrency` callers, each on its own streams."""
    run = uuid.uuid4().hex[:6]
    async with GatewayClient(target) as client:
        remaining = appends

        async def caller(n: int) -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await client.events.AppendEvents(
                    es.AppendEventsRequest(
                        category="orders",
                        stream_id=f"bench-{run}-{n}-{remaining % 50}",
                        events=[
                            es.EventData(type="Benchmarked", data=DATA) for _ in range(events_per_append)
                        ],
                    )
                )

        started = time.perf_counter()
        await asyncio.gather(*(caller(n) for n in range(concurrency)))
        return appends * events_per_append / (time.perf_counter() - started)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument(
        "--bootstrap", default=os.environ.get("KPG_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    )
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()

    await gateway_appends(args.target, appends=200, events_per_append=1, concurrency=16)  # warm-up
    single = await gateway_appends(
        args.target, appends=3000, events_per_append=1, concurrency=args.concurrency
    )
    batch = await gateway_appends(args.target, appends=100, events_per_append=100, concurrency=8)
    raw = raw_produce(args.bootstrap, ensure_raw_topic(args.bootstrap), 50_000)
    print(f"raw confluent-kafka produce (idempotent, acks=all): {raw:10.0f} events/s")
    print(
        f"gateway, 1-event appends x{args.concurrency} callers:   {single:10.0f} events/s  "
        f"(ratio {single / raw:.3f})"
    )
    print(f"gateway, 100-event appends x8 callers:    {batch:10.0f} events/s  (ratio {batch / raw:.3f})")


if __name__ == "__main__":
    asyncio.run(main())
