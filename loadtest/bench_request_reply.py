"""Request-reply latency and throughput through the gateway, next to a bare confluent-kafka round trip
(produce the request, a responder answers, consume the reply) on the same broker, in the same run.

    make up && .venv/bin/python loadtest/bench_request_reply.py

Both paths use the same responder (kpg.responder.serve_requests, echoing the payload). Prints figures;
asserts nothing about time (shared, noisy machines).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from kpg import GatewayClient
from kpg.responder import IncomingRequest, serve_requests
from kpg.v1 import request_reply_pb2 as rr

GATEWAY_TOPIC = "inventory.requests"  # allowed by examples/definitions.yaml
RAW_REQUESTS = "bench.rr-requests"
RAW_REPLIES = "bench.rr-replies"
LOW_LATENCY = {"linger.ms": 0, "socket.nagle.disable": True}


def _ensure_topics(bootstrap: str, *names: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for name, future in admin.create_topics(
        [NewTopic(n, num_partitions=6, replication_factor=1) for n in names]
    ).items():
        try:
            future.result(30)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise RuntimeError(f"creating {name}: {exc}") from exc


class RawRequester:
    """A bare round trip: request with a correlation id and reply topic, a consumer matching replies."""

    def __init__(self, bootstrap: str) -> None:
        self._producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", **LOW_LATENCY})
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"bench-raw-{uuid.uuid4().hex[:6]}",
                "auto.offset.reset": "latest",
                "fetch.wait.max.ms": 5,
                "socket.nagle.disable": True,
            }
        )
        self._waiting: dict[bytes, asyncio.Future[bytes]] = {}
        self._task: asyncio.Task[None] | None = None
        self.assigned = asyncio.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def on_assign(_consumer: Consumer, _partitions: list[TopicPartition]) -> None:
            loop.call_soon_threadsafe(self.assigned.set)

        self._consumer.subscribe([RAW_REPLIES], on_assign=on_assign)
        self._task = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            messages = await loop.run_in_executor(None, self._consumer.consume, 500, 0)
            if not messages:
                messages = await loop.run_in_executor(None, self._consumer.consume, 1, 0.05)
            for message in messages:
                headers = dict(cast("list[tuple[str, bytes]]", message.headers() or []))
                future = self._waiting.pop(headers.get("kpg-correlation-id", b""), None)
                if future is not None and not future.done():
                    future.set_result(message.value() or b"")

    async def request(self, payload: bytes) -> bytes:
        correlation = uuid.uuid4().hex.encode()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = future
        self._producer.produce(
            RAW_REQUESTS,
            payload,
            headers=[("kpg-correlation-id", correlation), ("kpg-reply-topic", RAW_REPLIES.encode())],
        )
        self._producer.poll(0)
        return await asyncio.wait_for(future, 30)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._producer.flush(5)
        self._consumer.close()


async def _measure(
    call: Callable[[bytes], Awaitable[bytes]], *, sequential: int, total: int, concurrency: int
) -> tuple[list[float], float]:
    """(sequential latencies in ms, requests/s of `concurrency` concurrent callers)."""
    latencies = []
    for i in range(sequential):
        started = time.perf_counter()
        assert await call(f"seq-{i}".encode()) == f"seq-{i}".encode()
        latencies.append((time.perf_counter() - started) * 1000)
    remaining = total

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call(b"x")

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies, total / (time.perf_counter() - started)


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument(
        "--bootstrap", default=os.environ.get("KPG_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    )
    parser.add_argument("--sequential", type=int, default=300)
    parser.add_argument("--total", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    _ensure_topics(args.bootstrap, RAW_REQUESTS, RAW_REPLIES)

    async def echo(request: IncomingRequest) -> bytes:
        return request.payload

    responders = []
    for topic in (GATEWAY_TOPIC, RAW_REQUESTS):
        ready = asyncio.Event()
        responders.append(
            asyncio.create_task(
                serve_requests(
                    topic, echo, bootstrap_servers=args.bootstrap, group_id=f"bench-{topic}", ready=ready
                )
            )
        )
        await asyncio.wait_for(ready.wait(), 60)
    raw = RawRequester(args.bootstrap)
    await raw.start()
    await asyncio.wait_for(raw.assigned.wait(), 60)
    await asyncio.sleep(1)

    async with GatewayClient(args.target) as client:

        async def through_gateway(payload: bytes) -> bytes:
            reply = await client.requests.Request(
                rr.RequestMessage(topic=GATEWAY_TOPIC, payload=payload, timeout_ms=30_000)
            )
            return reply.payload

        for _ in range(50):  # warm-up both paths
            await through_gateway(b"w")
            await raw.request(b"w")
        gateway_latency, gateway_rate = await _measure(
            through_gateway, sequential=args.sequential, total=args.total, concurrency=args.concurrency
        )
        raw_latency, raw_rate = await _measure(
            raw.request, sequential=args.sequential, total=args.total, concurrency=args.concurrency
        )

    await raw.close()
    for task in responders:
        task.cancel()
    await asyncio.gather(*responders, return_exceptions=True)
    for name, latency, rate in (
        ("bare confluent-kafka", raw_latency, raw_rate),
        ("gateway (gRPC Request)", gateway_latency, gateway_rate),
    ):
        print(
            f"{name:24s} p50 {statistics.median(latency):6.1f} ms  p99 {_p(latency, 0.99):6.1f} ms  "
            f"{rate:7.0f} req/s with {args.concurrency} callers"
        )
    print(
        "ratio gateway/bare: p50 latency "
        f"x{statistics.median(gateway_latency) / statistics.median(raw_latency):.2f}, "
        f"throughput {gateway_rate / raw_rate:.2f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
