"""Every pattern through the gateway next to its reference, in one invocation, on the same broker and Redis.

    make bench                                   # kpg dev up, then this with the dev stack's environment
    .venv/bin/python loadtest/bench.py [--workers 2] [--quick] [--json PATH] [--chart PATH]

Starts its own gateway (`kpg serve --workers N`, a fresh SQLite database in a temporary state
folder, definitions with a category and examples/definitions.yaml's declarative `order_summary` read model,
the `place_order` saga and a request topic, every topic and consumer group under a fresh --topic-prefix),
the example saga participants (`examples/participants.py all`), an echo responder, and as many do-nothing
grpc.aio and FastAPI processes as the gateway has workers (loadtest/references.py), each process apart so
that its CPU is measured apart. Then, --duration seconds per row (one asyncio process drives every row, the
gateway's and its reference's with the same callers and the same messages):

- append 1 event: gRPC AppendEvents, --callers callers on --channels channels, next to a do-nothing
  grpc.aio AppendEvents handler; the same through REST, next to a do-nothing FastAPI endpoint;
- append 100-event batches: --batch-callers callers, next to raw confluent-kafka produce (idempotent,
  acks=all) with a delivery callback per record and each caller awaiting its 100 records, and once more
  flat out without callbacks;
- ReadStream right after an append (the ReadStream's latency), next to a bare produce -> consume (from
  Kafka's acknowledgement until a consumer sees the record);
- lag at half the peak 1-event append rate (open loop): the read model's GetStatus lag in records every
  0.2 s, and for every 10th append the time from its answer until Get(min_position) and
  ReadStream(min_position) answer (projection and stream index lag in time);
- read-model Get and Query (gRPC, --read-callers callers) next to do-nothing handlers; Get through REST
  next to a do-nothing FastAPI endpoint;
- request-reply: peak throughput with --callers callers, then latency in an open loop at half the gateway's
  peak rate, next to a bare produce -> responder -> consume round trip at the same rate;
- the three-step place_order saga, --saga-in-flight in flight, next to the same round trips done bare
  (loadtest/bench_sagas.py's BareSagas);
- DLT reprocess of --dlt-records dead letters, next to a raw transactional copy with a state record each.

Each row says its throughput, p50/p99 latency, and the CPU microseconds per event (request, saga, record)
that the process serving it (the gateway, or the reference server), the broker, Redis, the helpers
(participants and responder) and this harness spent. Then each ratio with its target from issue 12 and
whether it is met: printed, never asserted (shared, noisy machines). Writes the figures as JSON (--json,
default .state/bench/bench-<time>.json) and a chart of throughput and latency per pattern (--chart, default
the JSON's path with .png). Deletes its topics at the end unless --keep-topics.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
import yaml
from google.protobuf import struct_pb2
from kpg import GatewayClient
from kpg.v1 import dead_letters_pb2 as dl
from kpg.v1 import event_store_pb2 as es
from kpg.v1 import read_models_pb2 as rm
from kpg.v1 import request_reply_pb2 as rr

from gateway.devstack.processes import free_ports
from gateway.domain.dead_letters import dlt_topic
from gateway.settings import DeadLettersSettings, GrpcSettings, HealthSettings, KafkaSettings, RedisSettings
from loadtest import bench_dead_letters, bench_sagas
from loadtest.measure import CpuMeter, HttpConnection, Operation, Row, closed_loop, open_loop
from loadtest.references import BareRoundTrip, RawProducer, produce_flat_out
from loadtest.report import Results, report, write_chart
from loadtest.support import (
    ReadyProcess,
    connections_by_pid,
    create_topics,
    delete_topics,
    listening_pid,
    listening_pids,
    percentile,
    stop_gateway,
    tree_cpu_seconds,
)
from tests.support import SERVING, GatewayProcess, wait_for_health

C = TypeVar("C")  # a connection
REPO = Path(__file__).resolve().parents[1]
MODEL = "order_summary"
PARTITIONS = 6  # the category's, as examples/definitions.yaml's orders
CUSTOMERS = [f"c-{i}" for i in range(50)]
ORDERS = [{"customer": c, "total": 10 + i, "status": "new"} for i, c in enumerate(CUSTOMERS)]
PAYLOADS = [json.dumps(o).encode() for o in ORDERS]
STREAMS_PER_CALLER = 20
CALL_TIMEOUT_S = 60.0
SECTIONS = ("append", "rest", "batch", "readstream", "lag", "reads", "request-reply", "saga", "dlt")


@dataclass(frozen=True)
class Topics:
    """Every topic of one run, under its prefix (it ends with a dot)."""

    prefix: str
    steps: tuple[bench_sagas.Step, ...]

    @property
    def category(self) -> str:
        return f"{self.prefix}orders"

    @property
    def events(self) -> str:
        return f"{self.category}.events"

    @property
    def raw_produce(self) -> str:
        return f"{self.prefix}raw-produce"

    @property
    def produce_consume(self) -> str:
        return f"{self.prefix}produce-consume"

    @property
    def requests(self) -> str:
        return f"{self.prefix}rr.requests"

    @property
    def bare_requests(self) -> str:
        return f"{self.prefix}rr.bare-requests"

    @property
    def bare_replies(self) -> str:
        return f"{self.prefix}rr.bare-replies"

    @property
    def saga_replies(self) -> str:
        return f"{self.prefix}sagas.replies"

    @property
    def bare_saga_replies(self) -> str:
        return f"{self.prefix}sagas.bare-replies"

    @property
    def request_replies(self) -> str:
        return f"{self.prefix}requests.replies"

    @property
    def dead_letters(self) -> bench_dead_letters.Topics:
        return bench_dead_letters.Topics(f"{self.prefix}dl")

    def created_here(self) -> dict[str, tuple[int, dict[str, str]]]:
        dead = self.dead_letters
        return {
            **{
                name: (PARTITIONS, {})
                for name in (
                    self.raw_produce,
                    self.produce_consume,
                    self.requests,
                    self.bare_requests,
                    self.bare_replies,
                    self.bare_saga_replies,
                )
            },
            dead.orders: (bench_dead_letters.PARTITIONS, {}),
            dead.dlt: (bench_dead_letters.PARTITIONS, {}),
            dead.raw_copy: (bench_dead_letters.PARTITIONS, {}),
            dead.raw_state: (1, {"cleanup.policy": "compact"}),
        }

    def all(self) -> list[str]:
        dead = self.dead_letters
        return sorted(
            {
                *self.created_here(),
                self.events,
                dlt_topic(self.events),
                *(s.topic for s in self.steps),
                self.saga_replies,
                dlt_topic(self.saga_replies),
                self.request_replies,
                dlt_topic(self.request_replies),
                dead.state,
            }
        )


def definitions(topics: Topics) -> dict[str, Any]:
    """A category, examples/definitions.yaml's order_summary over it, its place_order saga and a request
    topic, all under the run's prefix."""
    example = yaml.safe_load((REPO / "examples" / "definitions.yaml").read_text())
    return {
        "categories": {topics.category: {"topic": topics.events, "partitions": PARTITIONS}},
        "read_models": {MODEL: {**example["read_models"][MODEL], "category": topics.category}},
        "sagas": {bench_sagas.SAGA: bench_sagas.saga_definition(topics.prefix)},
        "request_reply": {"topics": [topics.requests]},
    }


# --- the processes ------------------------------------------------------------------------------------------


def the_gateway(args: argparse.Namespace, topics: Topics, workdir: Path, workers: int) -> GatewayProcess:
    path = workdir / "definitions.yaml"
    path.write_text(json.dumps(definitions(topics), indent=1))  # JSON is YAML
    return GatewayProcess(
        workdir,
        env={
            "KPG_KAFKA__BOOTSTRAP_SERVERS": args.bootstrap_servers,
            "KPG_REDIS__URL": args.redis_url,
            "KPG_DATABASE__URL": "",  # SQLite in the state folder, whatever the environment says
            "KPG_SAGAS__REPLY_TOPIC": topics.saga_replies,
            "KPG_SAGAS__REPLY_GROUP": f"{topics.prefix}kpg-sagas",
            "KPG_REQUEST_REPLY__REPLY_TOPIC": topics.request_replies,
            "KPG_REQUEST_REPLY__REPLY_GROUP": f"{topics.prefix}kpg-requests",
            "KPG_DEAD_LETTERS__STATE_TOPIC": topics.dead_letters.state,
            "KPG_LOG_LEVEL": "WARNING",
            # GatewayProcess checks health every 0.2 s for tests; the default is what a user runs.
            "KPG_HEALTH__CHECK_INTERVAL_S": str(HealthSettings().check_interval_s),
        },
        args=["--definitions", str(path)],
        workers=workers,  # always passed: without it, kpg serve starts one worker per core
    )


@dataclass
class Processes:
    gateway: GatewayProcess
    participants: ReadyProcess
    responder: ReadyProcess
    grpc_port: int
    rest_port: int
    grpc_refs: list[ReadyProcess]
    rest_refs: list[ReadyProcess]

    def helpers(self) -> list[ReadyProcess]:
        return [self.participants, self.responder, *self.grpc_refs, *self.rest_refs]


def the_processes(args: argparse.Namespace, topics: Topics, workdir: Path, workers: int) -> Processes:
    python = sys.executable
    grpc_port, rest_port = free_ports(2)

    def reference(kind: str, port: int, n: int) -> ReadyProcess:
        return ReadyProcess(
            f"do-nothing {kind} server {n}",
            [python, "-m", "loadtest.references", kind, "--port", str(port)],
            log_path=workdir / f"{kind}-noop-{n}.log",
            cwd=REPO,
        )

    return Processes(
        gateway=the_gateway(args, topics, workdir, workers),
        participants=ReadyProcess(
            "participants",
            [
                python,
                str(REPO / "examples" / "participants.py"),
                "all",
                "--bootstrap-servers",
                args.bootstrap_servers,
                "--topic-prefix",
                topics.prefix,
            ],
            log_path=workdir / "participants.log",
        ),
        responder=ReadyProcess(
            "responder",
            [
                python,
                "-m",
                "loadtest.references",
                "responder",
                "--bootstrap-servers",
                args.bootstrap_servers,
                "--topic",
                topics.requests,
                "--topic",
                topics.bare_requests,
            ],
            log_path=workdir / "responder.log",
            cwd=REPO,
        ),
        grpc_port=grpc_port,
        rest_port=rest_port,
        grpc_refs=[reference("grpc", grpc_port, n) for n in range(workers)],
        rest_refs=[reference("rest", rest_port, n) for n in range(workers)],
    )


def port_of(address: str) -> int | None:
    """The port of the first `host:port` (or URL) in a bootstrap list or Redis URL."""
    tail = address.split(",")[0].rsplit("@", 1)[-1].split("/")[2 if "://" in address else 0]
    try:
        return int(tail.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


# --- the run ------------------------------------------------------------------------------------------------


async def open_spread(
    open_one: Callable[[], Awaitable[C]], close: Callable[[C], Awaitable[None]], *, count: int, port: int
) -> tuple[list[C], dict[int, int]]:
    """`count` connections to a port that several processes share (SO_REUSEPORT), spread evenly over them:
    the kernel picks the process by a hash of the connection, so one landing on a process that has its
    share already is put aside and another opened (within a bound); those put aside are closed at the end.
    Returns the connections and how many each process took."""
    pids = listening_pids(port)
    if len(pids) < 2:
        return [await open_one() for _ in range(count)], {}
    share = -(-count // len(pids))
    taken = dict.fromkeys(pids, 0)
    kept: list[C] = []
    aside: list[C] = []
    unknown = 0
    for _ in range(20 * count):
        if len(kept) == count or unknown > 3:  # owners cannot be told: stop trying
            break
        before = connections_by_pid(pids, port)
        connection = await open_one()
        owner = await _owner_of_new_connection(before, pids, port)
        if owner is None:
            unknown += 1
        if owner is None or taken[owner] >= share:
            aside.append(connection)
            continue
        kept.append(connection)
        taken[owner] += 1
    kept += [await open_one() for _ in range(count - len(kept))]
    await asyncio.gather(*(close(c) for c in aside))
    return kept, taken


async def _owner_of_new_connection(before: dict[int, int], pids: list[int], port: int) -> int | None:
    """The process that accepted the connection just opened (None when it cannot be told)."""
    for _ in range(200):
        now = connections_by_pid(pids, port)
        grown = [pid for pid in pids if now.get(pid, 0) > before.get(pid, 0)]
        if grown:
            return grown[0] if len(grown) == 1 else None
        await asyncio.sleep(0.01)
    return None


async def open_clients(target: str, count: int) -> tuple[list[GatewayClient], dict[int, int]]:
    """`count` clients, each on a channel with a TCP connection of its own (a local subchannel pool),
    spread over the processes serving the port."""
    limit = GrpcSettings().max_message_bytes
    options = [
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
    ]

    async def open_one() -> GatewayClient:
        channel = grpc.aio.insecure_channel(target, options=options)
        await asyncio.wait_for(channel.channel_ready(), 30)
        return GatewayClient(target, channel=channel)

    async def close(client: GatewayClient) -> None:
        await client.close()

    return await open_spread(open_one, close, count=count, port=int(target.rsplit(":", 1)[1]))


@dataclass
class Bench:
    args: argparse.Namespace
    topics: Topics
    processes: Processes
    meter: CpuMeter
    gateway: list[GatewayClient]
    noop: list[GatewayClient]
    spread: dict[str, dict[int, int]] = field(default_factory=dict)  # connections each worker took
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)  # streams written, so documents of order_summary

    @property
    def duration(self) -> float:
        return float(self.args.duration)

    async def warm_up(self, operation: Operation, callers: int) -> None:
        """Connections, metadata and caches: a short row that is not kept."""
        scratch = Row("warm-up", "", "", "", "", None)
        await closed_loop(scratch, operation, callers=callers, seconds=self.args.warmup, meter=CpuMeter({}))
        if scratch.errors and not scratch.ops:
            raise RuntimeError(f"warm-up failed: {dict(scratch.errors)}")

    async def row(self, row: Row, operation: Operation, callers: int, *, seconds: float | None = None) -> Row:
        await self.settle()
        await self.warm_up(operation, callers)
        await closed_loop(row, operation, callers=callers, seconds=seconds or self.duration, meter=self.meter)
        return self.keep(row)

    def keep(self, row: Row) -> Row:
        self.rows.append(row)
        errors = f", errors {dict(row.errors)}" if row.errors else ""
        print(
            f"  {row.pattern} | {row.path}: {row.rate:,.0f} {row.unit}/s, p50 {row.p(0.5):.1f} ms{errors}",
            file=sys.stderr,
        )
        return row

    def find(self, pattern: str, path: str) -> Row | None:
        return next((r for r in self.rows if r.pattern == pattern and r.path == path), None)

    async def settle(self, timeout_s: float = 60) -> None:
        """Until the read model has caught up (a row's backlog must not cost the next row's CPU)."""
        deadline = time.monotonic() + timeout_s
        lag = -1
        while time.monotonic() < deadline:
            status = await self.gateway[0].read_models.GetStatus(
                rm.GetStatusRequest(read_model=MODEL), timeout=CALL_TIMEOUT_S
            )
            lag = status.lag
            if lag == 0:
                return
            await asyncio.sleep(0.2)
        self.notes.append(f"the read model still lagged {lag} events {timeout_s:.0f} s after a row")

    # --- operations ---

    def append_one(self, clients: list[GatewayClient], tag: str, *, writes: bool = True) -> Operation:
        """1-event appends; `writes`: to the gateway (their streams have documents to read later)."""
        sequence = itertools.count()

        async def append(n: int) -> int:
            i = next(sequence)
            stream = f"{tag}-{self.run}-{n}-{i % STREAMS_PER_CALLER}"
            await clients[n % len(clients)].events.AppendEvents(
                es.AppendEventsRequest(
                    category=self.topics.category,
                    stream_id=stream,
                    events=[es.EventData(type="OrderPlaced", data=PAYLOADS[i % len(PAYLOADS)])],
                ),
                timeout=CALL_TIMEOUT_S,
            )
            if writes:
                self.keys.add(stream)
            return 1

        return append

    async def http(self, name: str, port: int, count: int) -> list[HttpConnection]:
        """`count` keep-alive connections, spread over the processes serving the port."""

        async def open_one() -> HttpConnection:
            connection = HttpConnection("127.0.0.1", port)
            await connection.open()
            return connection

        async def close(connection: HttpConnection) -> None:
            await connection.close()

        connections, taken = await open_spread(open_one, close, count=count, port=port)
        if taken:
            self.spread[name] = taken
        return connections

    def append_rest(self, connections: list[HttpConnection], tag: str, *, writes: bool) -> Operation:
        bodies = [
            json.dumps({"events": [{"type": "OrderPlaced", "data": order}]}).encode() for order in ORDERS
        ]
        sequence = itertools.count()

        async def append(n: int) -> int:
            i = next(sequence)
            stream = f"{tag}-{self.run}-{n}-{i % STREAMS_PER_CALLER}"
            await connections[n].request(
                "POST", f"/v1/streams/{self.topics.category}/{stream}/events", bodies[i % len(bodies)]
            )
            if writes:
                self.keys.add(stream)
            return 1

        return append

    def append_batch(self, clients: list[GatewayClient], size: int) -> Operation:
        sequence = itertools.count()

        async def append(n: int) -> int:
            i = next(sequence)
            stream = f"batch-{self.run}-{n}-{i % STREAMS_PER_CALLER}"
            await clients[n % len(clients)].events.AppendEvents(
                es.AppendEventsRequest(
                    category=self.topics.category,
                    stream_id=stream,
                    events=[
                        es.EventData(type="OrderPlaced", data=PAYLOADS[(i + k) % len(PAYLOADS)])
                        for k in range(size)
                    ],
                ),
                timeout=CALL_TIMEOUT_S,
            )
            self.keys.add(stream)
            return size

        return append


# --- the sections -------------------------------------------------------------------------------------------


async def append_section(bench: Bench) -> None:
    callers = bench.args.callers
    load = f"{callers} callers"
    pattern = "append 1 event"
    await bench.row(
        Row(pattern, "gateway gRPC", "gateway", "events", load, "gateway"),
        bench.append_one(bench.gateway, "one"),
        callers,
    )
    await bench.row(
        Row(pattern, "do-nothing grpc.aio", "reference", "events", load, "grpc-noop"),
        bench.append_one(bench.noop, "noop", writes=False),
        callers,
    )


async def rest_section(bench: Bench) -> None:
    callers = bench.args.callers
    load = f"{callers} connections"
    pattern = "append 1 event (REST)"
    processes = bench.processes
    for path, side, server, port, writes in (
        ("gateway REST", "gateway", "gateway", processes.gateway.rest_port, True),
        ("do-nothing FastAPI", "reference", "rest-noop", processes.rest_port, False),
    ):
        connections = await bench.http(f"{path}, append", port, callers)
        try:
            await bench.row(
                Row(pattern, path, side, "events", load, server),
                bench.append_rest(connections, "rest", writes=writes),
                callers,
            )
        finally:
            await asyncio.gather(*(c.close() for c in connections))


async def batch_section(bench: Bench) -> None:
    callers: int = bench.args.batch_callers
    size: int = bench.args.batch_size
    load = f"{callers} callers x {size}"
    pattern = f"append {size}-event batches"
    await bench.row(
        Row(pattern, "gateway gRPC", "gateway", "events", load, "gateway"),
        bench.append_batch(bench.gateway, size),
        callers,
    )
    producer = await asyncio.to_thread(RawProducer, bench.args.bootstrap_servers, bench.topics.raw_produce)
    keys = [f"raw-{n}".encode() for n in range(callers * STREAMS_PER_CALLER)]
    values = [PAYLOADS[k % len(PAYLOADS)] for k in range(size)]
    sequence = itertools.count()

    async def raw_batch(n: int) -> int:
        await producer.batch(keys[(n * STREAMS_PER_CALLER + next(sequence)) % len(keys)], values)
        return size

    try:
        await bench.row(
            Row(pattern, "raw produce, callback per record", "reference", "events", load, None),
            raw_batch,
            callers,
        )
    finally:
        await asyncio.to_thread(producer.close)

    await bench.settle()
    row = Row(pattern, "raw produce, no callbacks", "reference", "events", "1 thread, flat out", None)
    before = bench.meter.read()
    row.units, row.seconds = await asyncio.to_thread(
        produce_flat_out,
        bench.args.bootstrap_servers,
        bench.topics.raw_produce,
        PAYLOADS,
        keys,
        bench.duration,
    )
    row.ops = row.units
    row.cpu_s = CpuMeter.spent(before, bench.meter.read())
    bench.keep(row)


async def readstream_section(bench: Bench) -> None:
    callers = bench.args.readstream_callers
    load = f"{callers} callers"
    pattern = "ReadStream after append"
    read_ms: list[float] = []
    sequence = itertools.count()
    clients = bench.gateway

    async def append_then_read(n: int) -> int:
        client = clients[n % len(clients)]
        stream = f"rs-{bench.run}-{n}-{next(sequence) % STREAMS_PER_CALLER}"
        written = await client.events.AppendEvents(
            es.AppendEventsRequest(
                category=bench.topics.category,
                stream_id=stream,
                events=[es.EventData(type="OrderPlaced", data=PAYLOADS[n % len(PAYLOADS)])],
            ),
            timeout=CALL_TIMEOUT_S,
        )
        bench.keys.add(stream)
        started = time.perf_counter()
        answer = await client.events.ReadStream(
            es.ReadStreamRequest(
                category=bench.topics.category,
                stream_id=stream,
                from_version=written.first_version,
                max_count=1,
            ),
            timeout=CALL_TIMEOUT_S,
        )
        read_ms.append(1000 * (time.perf_counter() - started))
        if not answer.events or answer.events[0].version != written.first_version:
            raise RuntimeError("ReadStream did not return the event just appended")
        return 1

    row = await bench.row(
        Row(pattern, "gateway gRPC (AppendEvents, then ReadStream)", "gateway", "reads", load, "gateway"),
        append_then_read,
        callers,
    )
    _only_the_read(row, read_ms)

    bare = BareRoundTrip(
        bench.args.bootstrap_servers,
        request_topic=bench.topics.produce_consume,
        reply_topic=bench.topics.produce_consume,
        group=f"{bench.topics.prefix}produce-consume",
    )
    await bare.start()
    consumed_ms: list[float] = []

    async def write_then_read(n: int) -> int:
        _acked, read = await bare.write_then_read(PAYLOADS[n % len(PAYLOADS)], f"pc-{n}".encode())
        consumed_ms.append(read)
        return 1

    try:
        row = await bench.row(
            Row(pattern, "bare produce (acked), then consumed", "reference", "reads", load, None),
            write_then_read,
            callers,
        )
        _only_the_read(row, consumed_ms)
    finally:
        await bare.close()


def _only_the_read(row: Row, read_ms: list[float]) -> None:
    """The row's latency becomes the read's alone (from the write's answer); the pair's stays in extra."""
    row.extra["write_and_read_p50_ms"] = round(row.p(0.5), 2)
    row.extra["write_and_read_p99_ms"] = round(row.p(0.99), 2)
    row.extra["latency_is"] = "from the write's answer until the read's"
    row.latencies_ms = read_ms[-row.ops :] if row.ops else []


async def lag_section(bench: Bench) -> None:
    peak = bench.find("append 1 event", "gateway gRPC")
    rate = bench.args.lag_rate or (peak.rate / 2 if peak is not None and peak.rate > 0 else 100.0)
    clients = bench.gateway
    keys = [f"lag-{bench.run}-{n}" for n in range(500)]
    projection_ms: list[float] = []
    index_ms: list[float] = []
    lags: list[int] = []
    failures: list[str] = []

    async def follow(client: GatewayClient, key: str, position: str, acked: float) -> None:
        async def projection() -> None:
            await client.read_models.Get(
                rm.GetDocumentRequest(
                    read_model=MODEL, key=key, min_position=position, wait_timeout_ms=30_000
                ),
                timeout=CALL_TIMEOUT_S,
            )
            projection_ms.append(1000 * (time.perf_counter() - acked))

        async def index() -> None:
            await client.events.ReadStream(
                es.ReadStreamRequest(
                    category=bench.topics.category,
                    stream_id=key,
                    min_position=position,
                    wait_timeout_ms=30_000,
                    backwards=True,
                    max_count=1,
                ),
                timeout=CALL_TIMEOUT_S,
            )
            index_ms.append(1000 * (time.perf_counter() - acked))

        for outcome in await asyncio.gather(projection(), index(), return_exceptions=True):
            if isinstance(outcome, Exception):
                failures.append(type(outcome).__name__)

    async def append(n: int) -> int:
        client = clients[n % len(clients)]
        key = keys[n % len(keys)]
        written = await client.events.AppendEvents(
            es.AppendEventsRequest(
                category=bench.topics.category,
                stream_id=key,
                events=[es.EventData(type="OrderPlaced", data=PAYLOADS[n % len(PAYLOADS)])],
            ),
            timeout=CALL_TIMEOUT_S,
        )
        bench.keys.add(key)
        if n % 10 == 0:
            await follow(client, key, written.position, time.perf_counter())
        return 1

    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            status = await clients[0].read_models.GetStatus(
                rm.GetStatusRequest(read_model=MODEL), timeout=CALL_TIMEOUT_S
            )
            lags.append(status.lag)
            await asyncio.sleep(0.2)

    await bench.settle()
    row = Row(
        "lag at half peak append rate",
        "gateway gRPC (1-event appends)",
        "gateway",
        "events",
        f"open loop {rate:,.0f}/s",
        "gateway",
    )
    sampler = asyncio.create_task(sample())
    try:
        await open_loop(
            row,
            append,
            rate=rate,
            seconds=bench.duration,
            meter=bench.meter,
            max_outstanding=20 * bench.args.callers,
        )
    finally:
        stop.set()
        await sampler
    row.extra |= {
        "lag_records_p50": percentile(lags, 0.5),
        "lag_records_p99": percentile(lags, 0.99),
        "lag_records_max": max(lags, default=0),
        "projection_lag_ms_p50": round(percentile(projection_ms, 0.5), 2),
        "projection_lag_ms_p99": round(percentile(projection_ms, 0.99), 2),
        "index_lag_ms_p50": round(percentile(index_ms, 0.5), 2),
        "index_lag_ms_p99": round(percentile(index_ms, 0.99), 2),
        "lag_probes": len(projection_ms),
        "lag_probe_failures": len(failures),
    }
    bench.keep(row)


async def reads_section(bench: Bench) -> None:
    callers = bench.args.read_callers
    load = f"{callers} callers"
    if len(bench.keys) < 100:  # the append rows did not run: documents to read
        seed = bench.append_one(bench.gateway, "seed")
        await closed_loop(Row("seed", "", "", "", "", None), seed, callers=16, seconds=2, meter=CpuMeter({}))
    keys = sorted(bench.keys)

    def get(clients: list[GatewayClient]) -> Operation:
        async def one(n: int) -> int:
            await clients[n % len(clients)].read_models.Get(
                rm.GetDocumentRequest(read_model=MODEL, key=random.choice(keys)), timeout=CALL_TIMEOUT_S
            )
            return 1

        return one

    def query(clients: list[GatewayClient]) -> Operation:
        async def one(n: int) -> int:
            value = struct_pb2.Value(string_value=random.choice(CUSTOMERS))
            await clients[n % len(clients)].read_models.Query(
                rm.QueryRequest(
                    read_model=MODEL,
                    filters=[rm.Filter(field="customer", op=rm.FILTER_OP_EQ, value=value)],
                    limit=20,
                ),
                timeout=CALL_TIMEOUT_S,
            )
            return 1

        return one

    for pattern, operation in (("read-model Get", get), ("read-model Query (EQ, limit 20)", query)):
        await bench.row(
            Row(pattern, "gateway gRPC", "gateway", "requests", load, "gateway"),
            operation(bench.gateway),
            callers,
        )
        await bench.row(
            Row(pattern, "do-nothing grpc.aio", "reference", "requests", load, "grpc-noop"),
            operation(bench.noop),
            callers,
        )

    processes = bench.processes
    for path, side, server, port in (
        ("gateway REST", "gateway", "gateway", processes.gateway.rest_port),
        ("do-nothing FastAPI", "reference", "rest-noop", processes.rest_port),
    ):
        connections = await bench.http(f"{path}, Get", port, callers)

        async def get_rest(n: int, connections: list[HttpConnection] = connections) -> int:
            await connections[n].request("GET", f"/v1/read-models/{MODEL}/documents/{random.choice(keys)}")
            return 1

        try:
            await bench.row(
                Row("read-model Get (REST)", path, side, "requests", f"{callers} connections", server),
                get_rest,
                callers,
            )
        finally:
            await asyncio.gather(*(c.close() for c in connections))


async def request_reply_section(bench: Bench) -> None:
    callers = bench.args.callers
    topics = bench.topics
    clients = bench.gateway
    payload = json.dumps({"sku": "A-1", "quantity": 2}).encode()

    async def through_gateway(n: int) -> int:
        reply = await clients[n % len(clients)].requests.Request(
            rr.RequestMessage(topic=topics.requests, payload=payload, timeout_ms=30_000),
            timeout=CALL_TIMEOUT_S,
        )
        if reply.payload != payload:
            raise RuntimeError("the reply is not the echo of the request")
        return 1

    bare = BareRoundTrip(
        bench.args.bootstrap_servers,
        request_topic=topics.bare_requests,
        reply_topic=topics.bare_replies,
        group=f"{topics.prefix}rr-bare",
    )
    await bare.start()

    async def bare_round_trip(_n: int) -> int:
        if await bare.request(payload) != payload:
            raise RuntimeError("the reply is not the echo of the request")
        return 1

    try:
        pattern = "request-reply, peak"
        peak = await bench.row(
            Row(pattern, "gateway gRPC Request", "gateway", "requests", f"{callers} callers", "gateway"),
            through_gateway,
            callers,
        )
        await bench.row(
            Row(
                pattern,
                "bare produce -> responder -> consume",
                "reference",
                "requests",
                f"{callers} callers",
                None,
            ),
            bare_round_trip,
            callers,
        )
        rate = max(1.0, peak.rate / 2)
        pattern = "request-reply, half peak"
        load = f"open loop {rate:,.0f}/s"
        for path, side, server, operation in (
            ("gateway gRPC Request", "gateway", "gateway", through_gateway),
            ("bare produce -> responder -> consume", "reference", None, bare_round_trip),
        ):
            await bench.settle()
            row = Row(pattern, path, side, "requests", load, server)
            before = await asyncio.to_thread(scrape, bench.processes.gateway.rest_url)
            await open_loop(
                row,
                operation,
                rate=rate,
                seconds=bench.duration,
                meter=bench.meter,
                max_outstanding=20 * callers,
            )
            bench.keep(row)
            if side == "gateway":
                after = await asyncio.to_thread(scrape, bench.processes.gateway.rest_url)
                bench.notes.append(
                    f"request-reply legs at {load} ({LEGS_NOTE}): "
                    + describe(before[LEG_METRIC], after[LEG_METRIC], LEGS, "leg")
                )
                bench.notes.append(
                    f"garbage collections in the gateway at {load} (kpg_gc_pause_seconds, every worker): "
                    + describe(before[GC_METRIC], after[GC_METRIC], ("0", "1", "2"), "generation")
                )
    finally:
        await bare.close()


LEG_METRIC = "kpg_request_reply_leg_seconds"
LEGS = ("record", "send", "service", "fetch", "deliver")
LEGS_NOTE = "the gateway's kpg_request_reply_leg_seconds, quantiles interpolated within buckets"
GC_METRIC = "kpg_gc_pause_seconds"
# A histogram as scraped: its one label's value -> bucket bound (inf: the count) -> cumulative count.
Histogram = dict[str, dict[float, float]]


def scrape(rest_url: str) -> dict[str, Histogram]:
    """The gateway's request-reply leg and garbage-collection histograms (every worker's, added up)."""
    with urllib.request.urlopen(f"{rest_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    found: dict[str, Histogram] = {LEG_METRIC: {}, GC_METRIC: {}}
    for line in text.splitlines():
        name, _, rest = line.partition("_bucket{")
        if name in found and rest:
            labels, _, value = rest.rpartition("} ")
            fields = dict(part.split("=", 1) for part in labels.split(","))
            bound = float(fields.pop("le").strip('"'))
            (label,) = fields.values()
            found[name].setdefault(label.strip('"'), {})[bound] = float(value)
    return found


def describe(before: Histogram, after: Histogram, labels: Sequence[str], what: str) -> str:
    """How many, and the p50 and p99, of each label's observations between two scrapes."""
    parts = []
    for label in labels:
        counts = {b: n - before.get(label, {}).get(b, 0.0) for b, n in sorted(after.get(label, {}).items())}
        total = counts.get(float("inf"), 0.0)
        if total <= 0:
            continue
        quantiles = [f"{_bucket_quantile(counts, total, q) * 1000:.2f}" for q in (0.5, 0.99)]
        parts.append(f"{what} {label}: {total:,.0f}, p50 {quantiles[0]} ms, p99 {quantiles[1]} ms")
    return "; ".join(parts) or "none measured"


def _bucket_quantile(cumulative: dict[float, float], total: float, q: float) -> float:
    lower, below = 0.0, 0.0
    for bound, count in cumulative.items():
        if count >= q * total:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (q * total - below) / max(count - below, 1e-9)
        lower, below = bound, count
    return lower


async def saga_section(bench: Bench) -> None:
    in_flight = bench.args.saga_in_flight
    load = f"{in_flight} in flight"
    pattern = f"saga ({len(bench.topics.steps)} steps)"
    sagas = [bench_sagas.through_gateway(client) for client in bench.gateway]

    def completed(saga: Callable[[], Awaitable[str]]) -> Awaitable[int]:
        async def run() -> int:
            outcome = await saga()
            if outcome != "COMPLETED":
                raise RuntimeError(outcome)
            return 1

        return run()

    await bench.row(
        Row(pattern, "gateway gRPC (StartSaga, WatchSaga)", "gateway", "sagas", load, "gateway"),
        lambda n: completed(sagas[n % len(sagas)]),
        in_flight,
    )
    bare = bench_sagas.BareSagas(
        bench.args.bootstrap_servers, bench.topics.steps, bench.topics.bare_saga_replies
    )
    await bare.start()
    try:
        await bench.row(
            Row(pattern, "bare round trips (command, reply)", "reference", "sagas", load, None),
            lambda _n: completed(bare.saga),
            in_flight,
        )
    finally:
        await bare.close()


async def dlt_section(bench: Bench) -> None:
    topics = bench.topics.dead_letters
    servers = bench.args.bootstrap_servers
    count = bench.args.dlt_records
    chunk = DeadLettersSettings().batch_size
    now = datetime.now(UTC)
    records = [bench_dead_letters.dead_letter(i, topics.orders, now) for i in range(count)]
    producer = await asyncio.to_thread(bench_dead_letters.dead_letter_producer, servers, topics.dlt)
    await asyncio.to_thread(bench_dead_letters.raw_produce, producer, records, topics.dlt)
    del records
    pattern = "DLT reprocess"
    load = f"{count:,} dead letters"

    await bench.settle()
    row = Row(pattern, "gateway gRPC Reprocess", "gateway", "records", load, "gateway")
    before = bench.meter.read()
    started = time.perf_counter()
    answer = await bench.gateway[0].dead_letters.Reprocess(
        dl.ReprocessRequest(dlt_topic=topics.dlt), timeout=600
    )
    row.seconds = time.perf_counter() - started
    row.cpu_s = CpuMeter.spent(before, bench.meter.read())
    row.latencies_ms = [1000 * row.seconds]
    row.ops, row.units = 1, answer.reprocessed
    if answer.reprocessed != count:
        row.errors[f"reprocessed {answer.reprocessed} of {count}"] += 1
    row.extra["note"] = "one call; its latency is the whole call"
    bench.keep(row)

    for path, states in (
        (f"raw transactional copy + states, {chunk}/txn", True),
        (f"raw transactional copy, {chunk}/txn", False),
    ):
        await bench.settle()
        row = Row(pattern, path, "reference", "records", load, None)
        before = bench.meter.read()
        started = time.perf_counter()
        row.units = await asyncio.to_thread(
            bench_dead_letters.raw_copy,
            servers,
            topics,
            chunk,
            transactional_id=f"{topics.prefix}-raw-copy-{states}",
            with_states=states,
        )
        row.seconds = time.perf_counter() - started
        row.cpu_s = CpuMeter.spent(before, bench.meter.read())
        row.ops = 1
        row.latencies_ms = [1000 * row.seconds]
        bench.keep(row)


SECTION_RUNNERS: dict[str, Callable[[Bench], Awaitable[None]]] = {
    "append": append_section,
    "rest": rest_section,
    "batch": batch_section,
    "readstream": readstream_section,
    "lag": lag_section,
    "reads": reads_section,
    "request-reply": request_reply_section,
    "saga": saga_section,
    "dlt": dlt_section,
}


async def measure(args: argparse.Namespace, topics: Topics, processes: Processes) -> Results:
    gateway = processes.gateway
    assert gateway.process is not None
    await wait_for_health(gateway.target, SERVING, timeout_s=120, process=gateway)
    broker_port, redis_port = port_of(args.bootstrap_servers), port_of(args.redis_url)
    broker_pid = listening_pid(broker_port) if broker_port else None
    redis_pid = listening_pid(redis_port) if redis_port else None

    def cpu_of(pids: Callable[[], list[int | None]]) -> Callable[[], float]:
        def read() -> float:
            known = [pid for pid in pids() if pid is not None]
            return sum(tree_cpu_seconds(pid) for pid in known) if known else float("nan")

        return read

    meter = CpuMeter(
        {
            "gateway": cpu_of(lambda: [gateway.process.pid if gateway.process else None]),
            "grpc-noop": cpu_of(lambda: [p.pid for p in processes.grpc_refs]),
            "rest-noop": cpu_of(lambda: [p.pid for p in processes.rest_refs]),
            "broker": cpu_of(lambda: [broker_pid]),
            "redis": cpu_of(lambda: [redis_pid]),
            "helpers": cpu_of(lambda: [processes.participants.pid, processes.responder.pid]),
            "harness": time.process_time,
        }
    )
    clients, spread_gateway = await open_clients(gateway.target, args.channels)
    noop, spread_noop = await open_clients(f"127.0.0.1:{processes.grpc_port}", args.channels)
    bench = Bench(args, topics, processes, meter, clients, noop)
    if spread_gateway:
        bench.spread |= {"gateway gRPC": spread_gateway, "do-nothing grpc.aio": spread_noop}
    if broker_pid is None or redis_pid is None:
        bench.notes.append(
            "the broker's or Redis's process is not on this machine (or not visible): its CPU is not measured"
        )
    try:
        for name in args.sections:
            print(f"{name} ...", file=sys.stderr)
            await SECTION_RUNNERS[name](bench)
    finally:
        await asyncio.gather(*(c.close() for c in [*clients, *noop]), return_exceptions=True)
    return Results(
        rows=bench.rows,
        notes=bench.notes,
        spread=bench.spread,
        pids={"broker": broker_pid, "redis": redis_pid, "gateway": gateway.process.pid},
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(  # else the dev stack's (`kpg dev up`), which the settings' defaults point at
        "--bootstrap-servers",
        default=os.environ.get("KPG_KAFKA__BOOTSTRAP_SERVERS", KafkaSettings().bootstrap_servers),
    )
    parser.add_argument("--redis-url", default=os.environ.get("KPG_REDIS__URL", RedisSettings().url))
    parser.add_argument("--workers", type=int, default=1, help="gateway processes, and reference processes")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per row (default 10)")
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of warm-up before a row (default 2)"
    )
    parser.add_argument("--quick", action="store_true", help="2 s rows, 0.5 s warm-ups, 2,000 dead letters")
    parser.add_argument("--callers", type=int, default=64, help="1-event appends and request-reply (64)")
    parser.add_argument("--channels", type=int, default=4, help="gRPC channels the callers share (4)")
    parser.add_argument("--batch-callers", type=int, default=8, help="callers of batch appends (8)")
    parser.add_argument("--batch-size", type=int, default=100, help="events per batch append (100)")
    parser.add_argument("--readstream-callers", type=int, default=8, help="append-then-read callers (8)")
    parser.add_argument("--read-callers", type=int, default=32, help="read-model callers (32)")
    parser.add_argument("--saga-in-flight", type=int, default=16, help="sagas in flight (16)")
    parser.add_argument("--lag-rate", type=float, default=0, help="appends/s of the lag row (half the peak)")
    parser.add_argument("--dlt-records", type=int, default=10_000, help="dead letters reprocessed (10,000)")
    parser.add_argument(
        "--sections",
        type=lambda text: [s for s in text.split(",") if s],
        default=list(SECTIONS),
        help=f"which, comma-separated (default all: {','.join(SECTIONS)})",
    )
    parser.add_argument("--topic-prefix", default=f"bench-{uuid.uuid4().hex[:8]}.")
    parser.add_argument("--workdir", type=Path, help="the gateway's state and the logs (default: temporary)")
    parser.add_argument("--keep-topics", action="store_true", help="do not delete the run's topics")
    parser.add_argument("--json", type=Path, metavar="PATH", help="default .state/bench/bench-<time>.json")
    parser.add_argument("--chart", type=Path, metavar="PATH", help="default: the JSON's path with .png")
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if args.quick:
        args.duration, args.warmup, args.dlt_records = 2.0, 0.5, 2_000
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def main() -> int:
    args = parse_args()
    # SIGTERM (`timeout`, a CI job's end) stops the run as Ctrl-C does: processes stopped, topics deleted.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started_at = datetime.now(UTC)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    args.json = args.json or REPO / ".state" / "bench" / f"bench-{stamp}.json"
    args.chart = args.chart or args.json.with_suffix(".png")
    workers = args.workers

    definition = bench_sagas.saga_definition(args.topic_prefix)
    topics = Topics(
        args.topic_prefix,
        tuple(bench_sagas.Step(s["name"], s["topic"], s["command"]) for s in definition["steps"]),
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kpg-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    processes = the_processes(args, topics, workdir, workers)
    finished = False
    try:
        create_topics(args.bootstrap_servers, topics.created_here())
        for helper in processes.helpers():
            helper.start()
        processes.gateway.start()
        for helper in processes.helpers():
            helper.wait_ready(120)
        results = asyncio.run(measure(args, topics, processes))
        finished = True
    finally:
        stop_gateway(processes.gateway)
        for helper in processes.helpers():
            helper.stop()
        if not args.keep_topics:
            delete_topics(args.bootstrap_servers, topics.all())
        if finished and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not finished:
            print(f"logs kept in {workdir}", file=sys.stderr)

    results.setup = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "workers": workers,
        "seconds_per_row": args.duration,
        "warmup_s": args.warmup,
        "bootstrap_servers": args.bootstrap_servers,
        "redis_url": args.redis_url,
        "topic_prefix": args.topic_prefix,
        "channels": args.channels,
        "sections": args.sections,
    }
    print(report(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results.to_json(), indent=2) + "\n")
    args.chart.parent.mkdir(parents=True, exist_ok=True)
    write_chart(results, args.chart)
    print(f"figures: {args.json}\nchart:   {args.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
