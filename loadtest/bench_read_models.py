"""Read-model figures through the gateway while appends go on at a steady rate, in one run:

- projection lag (records not yet applied, sampled from GetStatus) and read-your-writes latency (an append,
  then a Get that waits for its position);
- Get and Query throughput of concurrent gRPC callers.

    make up && .venv/bin/python loadtest/bench_read_models.py

Uses the `order_summary` model of examples/definitions.yaml. Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
import uuid
from collections.abc import Sequence

from google.protobuf import struct_pb2
from kpg import GatewayClient
from kpg.v1 import event_store_pb2 as es
from kpg.v1 import read_models_pb2 as rm

CUSTOMERS = [f"c-{i}" for i in range(50)]


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def _seed(client: GatewayClient, run: str, streams: int) -> list[str]:
    keys = [f"bench-{run}-{i}" for i in range(streams)]
    gate = asyncio.Semaphore(16)

    async def one(key: str) -> None:
        async with gate:
            await client.events.AppendEvents(
                es.AppendEventsRequest(
                    category="orders",
                    stream_id=key,
                    events=[
                        es.EventData(
                            type="OrderPlaced",
                            data=json.dumps(
                                {"customer": random.choice(CUSTOMERS), "total": random.randint(1, 500)}
                            ).encode(),
                        )
                    ],
                )
            )

    await asyncio.gather(*(one(k) for k in keys))
    return keys


async def _steady_appends(
    client: GatewayClient, keys: list[str], rate: float, stop: asyncio.Event, visible_ms: list[float]
) -> int:
    """Start one ItemAdded append every 1/rate s (each in its own task, so a slow one does not slow the
    rate); every 10th is followed by a Get that waits for its position: the time from the append's answer
    to the Get's is how long a write takes to become readable."""
    sent = 0
    tasks: set[asyncio.Task[None]] = set()

    async def one(n: int) -> None:
        key = random.choice(keys)
        written = await client.events.AppendEvents(
            es.AppendEventsRequest(
                category="orders",
                stream_id=key,
                events=[es.EventData(type="ItemAdded", data=json.dumps({"item": "sku-1"}).encode())],
            )
        )
        if n % 10 == 0:
            acked = time.perf_counter()
            await client.read_models.Get(
                rm.GetDocumentRequest(read_model="order_summary", key=key, min_position=written.position)
            )
            visible_ms.append((time.perf_counter() - acked) * 1000)

    started = time.perf_counter()
    while not stop.is_set():
        task = asyncio.create_task(one(sent))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        sent += 1
        delay = started + sent / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    await asyncio.gather(*tasks)
    return sent


async def _sample_lag(client: GatewayClient, stop: asyncio.Event, lags: list[int]) -> None:
    while not stop.is_set():
        status = await client.read_models.GetStatus(rm.GetStatusRequest(read_model="order_summary"))
        lags.append(status.lag)
        await asyncio.sleep(0.5)


async def _readers(
    client: GatewayClient, keys: list[str], concurrency: int, seconds: float, query: bool
) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def reader() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            if query:
                value = struct_pb2.Value(string_value=random.choice(CUSTOMERS))
                await client.read_models.Query(
                    rm.QueryRequest(
                        read_model="order_summary",
                        filters=[rm.Filter(field="customer", op=rm.FILTER_OP_EQ, value=value)],
                        limit=20,
                    )
                )
            else:
                await client.read_models.Get(
                    rm.GetDocumentRequest(read_model="order_summary", key=random.choice(keys))
                )
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(reader() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=200.0, help="steady appends per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each read phase")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    async with GatewayClient(args.target) as client:
        keys = await _seed(client, uuid.uuid4().hex[:6], args.streams)
        stop = asyncio.Event()
        visible_ms: list[float] = []
        lags: list[int] = []
        appender = asyncio.create_task(_steady_appends(client, keys, args.rate, stop, visible_ms))
        sampler = asyncio.create_task(_sample_lag(client, stop, lags))
        await asyncio.sleep(2)  # let the lag settle at the steady rate
        gets = await _readers(client, keys, args.concurrency, args.seconds, query=False)
        queries = await _readers(client, keys, args.concurrency, args.seconds, query=True)
        stop.set()
        appended = await appender
        await sampler
    elapsed = 2 + 2 * args.seconds
    print(f"steady appends: {appended / elapsed:8.0f} events/s (target {args.rate:.0f}/s)")
    print(
        f"projection lag (records): median {statistics.median(lags):.0f}, "
        f"p95 {_percentile(lags, 0.95):.0f}, max {max(lags)}"
    )
    print(
        f"append answered -> Get(min_position) answered: median {statistics.median(visible_ms):.1f} ms, "
        f"p99 {_percentile(visible_ms, 0.99):.1f} ms"
    )
    print(f"Get   x{args.concurrency} callers: {gets:8.0f} req/s (while appending)")
    print(
        f"Query x{args.concurrency} callers: {queries:8.0f} req/s "
        "(EQ filter on customer, limit 20, while appending)"
    )


if __name__ == "__main__":
    asyncio.run(main())
