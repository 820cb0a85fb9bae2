"""Dead letters listed and reprocessed per second through the gateway, next to raw confluent-kafka reading
and transactional copying of the same records, on the same broker, in one run.

    .venv/bin/kpg dev up && .venv/bin/python loadtest/bench_dead_letters.py

Starts its own gateway (`kpg serve` on free ports, a fresh state folder, empty definitions: a DLT may always
be reprocessed to the topic it is named after; its dead-letter state topic and reply topics under a fresh
prefix), then, on topics under that prefix:
1. raw produce: --records dead letters in the gateway's own format (`dlt_headers`: the failed record's
   headers plus `kpg-dlt-*`; ~200-byte JSON order values, keys `order-<n>`) written to `<prefix>.orders.DLT`
   (3 partitions) by a plain idempotent producer;
2. ListDeadLetters: every page (limit 1000) of the whole DLT, then once with an error_class filter that
   matches 1% (one call scans the whole topic); next to a raw read_committed consumer reading the DLT to
   its end (all partitions assigned at once);
3. Reprocess of the whole topic (no filters), the same call again (everything skipped: the time to check
   the states), and a dry run; then a plain consumer checks that `<prefix>.orders` holds exactly --records
   records with as many distinct `kpg-replayed-from` ids (exit 1 if not);
4. raw transactional copy: the same records read from the DLT and written to a topic of the same shape by a
   transactional producer, one transaction per chunk (500, as the gateway's); and once more with one
   state record per record in the same transaction (as the gateway's chunks carry their states).
Also the CPU each phase cost the gateway process and this process (which holds the gRPC client, or the
raw client), per 1,000 records, and the gateway's CPU per second while idle (during the raw phases).

Prints figures; asserts nothing about time (shared, noisy machines). The topics are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from kpg import GatewayClient
from kpg.v1 import dead_letters_pb2 as dl

from gateway.domain.dead_letters import (
    REPLAYED_FROM,
    DeadLetterState,
    Failure,
    Resolution,
    dead_letter_id,
    dlt_headers,
    dlt_topic,
)
from gateway.settings import DeadLettersSettings, HealthSettings, KafkaSettings, RedisSettings
from loadtest.support import cpu_seconds, create_topics, delete_topics, figure, stop_gateway
from tests.support import SERVING, GatewayProcess, wait_for_health

PARTITIONS = 3
PAGE_LIMIT = DeadLettersSettings().list_max_limit  # 1000
CONSUMER_GROUP = "billing-service"  # the group that "failed" the records
COMMON_ERROR = "com.example.billing.PaymentDeclinedException"
OTHER_ERRORS = ("com.example.billing.CardExpiredException", "java.net.SocketTimeoutException")
RARE_ERROR = "com.example.billing.FraudSuspectedException"  # every 100th record: the 1% filter
RARE_EVERY = 100
CALL_TIMEOUT_S = 600.0
READ_TIMEOUT_S = 120.0  # a raw read to the end of a topic that takes longer than this is stuck
STACK_TRACE = (
    "java.lang.IllegalStateException: payment declined\n"
    "\tat com.example.billing.PaymentService.charge(PaymentService.java:214)\n"
    "\tat com.example.billing.OrderListener.onOrder(OrderListener.java:57)\n"
    "\tat jdk.internal.reflect.GeneratedMethodAccessor42.invoke(Unknown Source)\n"
    "\tat org.springframework.messaging.handler.invocation.InvocableHandlerMethod.doInvoke"
    "(InvocableHandlerMethod.java:169)\n"
    "\tat org.springframework.kafka.listener.KafkaMessageListenerContainer$ListenerConsumer"
    ".doInvokeRecordListener(KafkaMessageListenerContainer.java:2838)\n"
    "\t... 14 more\n"
)


@dataclass(frozen=True)
class Topics:
    """Every topic of one run, under its prefix."""

    prefix: str

    @property
    def orders(self) -> str:
        return f"{self.prefix}.orders"

    @property
    def dlt(self) -> str:
        return dlt_topic(self.orders)

    @property
    def state(self) -> str:
        return f"{self.prefix}.dlt.state"

    @property
    def raw_copy(self) -> str:
        return f"{self.prefix}.raw-copy"

    @property
    def raw_state(self) -> str:
        return f"{self.prefix}.raw-copy.state"

    @property
    def saga_replies(self) -> str:
        return f"{self.prefix}.sagas.replies"

    @property
    def request_replies(self) -> str:
        return f"{self.prefix}.requests.replies"

    def all(self) -> list[str]:
        return [
            self.orders,
            self.dlt,
            self.state,
            self.raw_copy,
            self.raw_state,
            self.saga_replies,
            dlt_topic(self.saga_replies),
            self.request_replies,
            dlt_topic(self.request_replies),
        ]


# --- the records --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutgoingRecord:
    partition: int
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


def error_class(n: int) -> str:
    if n % RARE_EVERY == 0:
        return RARE_ERROR
    return OTHER_ERRORS[n % 2] if n % 10 == 1 else COMMON_ERROR


def dead_letter(n: int, topic: str, now: datetime) -> OutgoingRecord:
    """Dead letter number `n`, as the gateway writes one: the failed order event's key, value and headers
    plus the `kpg-dlt-*` headers of its failure."""
    placed = now - timedelta(minutes=5, seconds=n % 600)
    key = f"order-{n}"
    value = {
        "order_id": key,
        "customer_id": f"customer-{n % 9973:05d}",
        "items": [
            {"sku": f"SKU-{n % 517:04d}", "quantity": 1 + n % 3, "unit_price": 19.99},
            {"sku": f"SKU-{(n * 7) % 517:04d}", "quantity": 1, "unit_price": 4.5},
        ],
        "total": round(19.99 * (1 + n % 3) + 4.5, 2),
        "currency": "EUR",
        "placed_at": placed.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    original = [
        ("content-type", b"application/json"),
        ("ce_id", str(uuid.UUID(int=n)).encode()),
        ("ce_type", b"OrderPlaced"),
    ]
    partition = n % PARTITIONS
    failure = Failure(
        topic=topic,
        partition=partition,
        offset=n // PARTITIONS,
        timestamp_ms=int(placed.timestamp() * 1000),
        consumer_group=CONSUMER_GROUP,
        error_class=error_class(n),
        error_message=f"order {key}: payment declined by the card issuer (code 51)",
        stack_trace=STACK_TRACE,
        attempts=3,
        failed_at=now - timedelta(seconds=n % 600),
    )
    return OutgoingRecord(
        partition,
        key.encode(),
        json.dumps(value, separators=(",", ":")).encode(),
        dlt_headers(original, failure),
    )


# --- the gateway --------------------------------------------------------------------------------------------


def dead_letters_gateway(args: argparse.Namespace, topics: Topics, workdir: Path) -> GatewayProcess:
    """`kpg serve` on free ports with empty definitions, a fresh SQLite database, and a dead-letter state
    topic, reply topics and groups of its own (other gateways may be using this Kafka and Redis)."""
    definitions = workdir / "definitions.yaml"
    definitions.write_text("{}\n")
    return GatewayProcess(
        workdir,
        env={
            "KPG_KAFKA__BOOTSTRAP_SERVERS": args.bootstrap_servers,
            "KPG_REDIS__URL": args.redis_url,
            "KPG_DATABASE__URL": "",  # SQLite in the state folder, whatever the environment says
            "KPG_DEAD_LETTERS__STATE_TOPIC": topics.state,
            "KPG_DEAD_LETTERS__BATCH_SIZE": str(args.chunk),
            "KPG_SAGAS__REPLY_TOPIC": topics.saga_replies,
            "KPG_SAGAS__REPLY_GROUP": f"{topics.prefix}.kpg-sagas",
            "KPG_REQUEST_REPLY__REPLY_TOPIC": topics.request_replies,
            "KPG_REQUEST_REPLY__REPLY_GROUP": f"{topics.prefix}.kpg-requests",
            # GatewayProcess checks health every 0.2 s for tests; the default is what a user runs.
            "KPG_HEALTH__CHECK_INTERVAL_S": str(HealthSettings().check_interval_s),
        },
        args=["--definitions", str(definitions)],
    )


# --- Kafka topics and raw clients ---------------------------------------------------------------------------


def dead_letter_producer(bootstrap_servers: str, topic: str) -> Producer:
    """A producer configured as the gateway's (idempotent, acks=all, lz4, its linger), with the topic's
    metadata fetched: what it writes next is timed without the client's start-up."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": "lz4",
            "linger.ms": KafkaSettings().linger_ms,
        }
    )
    producer.list_topics(topic, 10)
    return producer


def raw_produce(producer: Producer, records: list[OutgoingRecord], topic: str) -> None:
    """Write the records and wait until every one is acknowledged."""
    errors: list[str] = []

    def delivered(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            errors.append(error.str())

    for record in records:
        while True:
            try:
                producer.produce(
                    topic,
                    record.value,
                    key=record.key,
                    headers=cast("list[tuple[str, str | bytes | None]]", record.headers),
                    partition=record.partition,
                    on_delivery=delivered,
                )
                break
            except BufferError:
                producer.poll(0.05)  # the local queue is full: let deliveries drain it
        producer.poll(0)
    left = producer.flush(60)
    if left or errors:
        raise RuntimeError(f"raw produce: {left} not delivered, {len(errors)} failed ({errors[:3]})")


def reading_consumer(bootstrap_servers: str) -> Consumer:
    """A plain read_committed consumer, no group offsets, told when it reaches each partition's end."""
    return Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": f"bench-dlt-read-{uuid.uuid4()}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 10,  # as the gateway's scanner: the end is seen without a 500 ms wait
        }
    )


def read_to_end(
    bootstrap_servers: str, topic: str, partitions: int, each: Callable[[list[Message]], None]
) -> int:
    """Read the topic from the beginning to its end (every partition assigned at once), handing each batch
    of records to `each`; returns how many were read."""
    consumer = reading_consumer(bootstrap_servers)
    try:
        # From each partition's first offset, asked for first (as the gateway's scanner starts from known
        # offsets): assigning OFFSET_BEGINNING costs librdkafka a ~500 ms offset-query retry on a new client.
        starts = [consumer.get_watermark_offsets(TopicPartition(topic, p), 10)[0] for p in range(partitions)]
        consumer.assign([TopicPartition(topic, p, starts[p]) for p in range(partitions)])
        pending = set(range(partitions))
        deadline = time.monotonic() + READ_TIMEOUT_S
        count = 0
        while pending:
            if time.monotonic() > deadline:
                raise RuntimeError(f"reading {topic} to its end took over {READ_TIMEOUT_S:.0f}s")
            batch = []
            # What is fetched already, else wait for the first message (consume(n, t) waits for all n).
            for message in consumer.consume(1000, 0) or consumer.consume(1, 0.5):
                error = message.error()
                if error is None:
                    batch.append(message)
                elif error.code() == KafkaError._PARTITION_EOF:
                    pending.discard(message.partition() or 0)
                else:
                    raise KafkaException(error)
            if batch:
                count += len(batch)
                each(batch)
        return count
    finally:
        consumer.close()


def raw_copy(
    bootstrap_servers: str, topics: Topics, chunk: int, *, transactional_id: str, with_states: bool
) -> int:
    """Read the DLT to its end and write each record (key, value, headers, partition) to the copy topic,
    `chunk` records per transaction; `with_states` adds one state record per record to the transaction,
    as the gateway's Reprocess does."""
    producer = Producer(
        {  # as the gateway's transactional writer (gateway/adapters/kafka/transactional.py)
            "bootstrap.servers": bootstrap_servers,
            "transactional.id": transactional_id,
            "transaction.timeout.ms": DeadLettersSettings().transaction_timeout_ms,
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": "lz4",
            "linger.ms": 0,
            "socket.nagle.disable": True,
        }
    )
    producer.init_transactions(30)
    pending: list[Message] = []

    def commit(messages: list[Message]) -> None:
        producer.begin_transaction()
        now_ms = int(time.time() * 1000)
        for message in messages:
            producer.produce(
                topics.raw_copy,
                message.value(),
                key=message.key(),
                headers=message.headers(),
                partition=message.partition() or 0,
            )
            if with_states:
                ident = dead_letter_id(message.topic() or "", message.partition() or 0, message.offset() or 0)
                state = Resolution(DeadLetterState.REPROCESSED, 1, "", topics.raw_copy, now_ms)
                producer.produce(topics.raw_state, state.encode(), key=ident.encode(), partition=0)
        producer.commit_transaction(30)

    def each(batch: list[Message]) -> None:
        pending.extend(batch)
        while len(pending) >= chunk:
            commit(pending[:chunk])
            del pending[:chunk]

    count = read_to_end(bootstrap_servers, topics.dlt, PARTITIONS, each)
    if pending:
        commit(pending)
    producer.flush(30)
    return count


def _ignore(_batch: list[Message]) -> None:
    pass


def replays_on(bootstrap_servers: str, topic: str) -> tuple[int, int]:
    """(records on the topic, distinct `kpg-replayed-from` ids among them), read_committed."""
    ids: set[bytes] = set()

    def each(batch: list[Message]) -> None:
        for message in batch:
            headers = cast("list[tuple[str, bytes]]", message.headers() or [])
            ids.update(value for name, value in headers if name == REPLAYED_FROM)

    return read_to_end(bootstrap_servers, topic, PARTITIONS, each), len(ids)


# --- measuring ----------------------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    path: str  # "gateway" or "raw"
    records: int = 0  # records produced, listed, scanned, reprocessed, checked or copied
    seconds: float = 0.0
    gateway_cpu_s: float = 0.0
    bench_cpu_s: float = 0.0  # this process: the gRPC client, or the raw client
    page_ms: list[float] = field(default_factory=list)
    page_kib: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds else math.nan

    def p(self, q: float) -> float:
        ordered = sorted(self.page_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else math.nan

    def cpu_ms_per_1000(self, seconds: float) -> float:
        return 1_000_000 * seconds / self.records if self.records else math.nan

    @property
    def gateway_cpu_ms_per_1000(self) -> float:
        """Only where the gateway did the work (during raw phases it is idle)."""
        return self.cpu_ms_per_1000(self.gateway_cpu_s) if self.path == "gateway" else math.nan

    def to_json(self) -> dict[str, Any]:
        figures: dict[str, Any] = {
            "phase": self.name,
            "path": self.path,
            "records": self.records,
            "seconds": figure(self.seconds, 3),
            "records_per_s": figure(self.rate, 0),
            "bench_cpu_ms_per_1000": figure(self.cpu_ms_per_1000(self.bench_cpu_s), 1),
        }
        if self.path == "gateway":
            figures["gateway_cpu_ms_per_1000"] = figure(self.gateway_cpu_ms_per_1000, 1)
        if self.page_ms:
            figures |= {
                "pages": len(self.page_ms),
                "page_p50_ms": figure(self.p(0.5), 1),
                "page_p99_ms": figure(self.p(0.99), 1),
                "page_mean_kib": figure(sum(self.page_kib) / len(self.page_kib), 1),
            }
        if self.note:
            figures["note"] = self.note
        return figures


class Meter:
    """Wall time and CPU (the gateway's, this process's) of one phase at a time."""

    def __init__(self, gateway_pid: int) -> None:
        self._pid = gateway_pid
        self.phases: list[Phase] = []

    @contextmanager
    def phase(self, name: str, path: str) -> Iterator[Phase]:
        phase = Phase(name, path)
        gateway_before, bench_before = cpu_seconds(self._pid), time.process_time()
        started = time.perf_counter()
        yield phase
        phase.seconds = time.perf_counter() - started
        phase.gateway_cpu_s = cpu_seconds(self._pid) - gateway_before
        phase.bench_cpu_s = time.process_time() - bench_before
        self.phases.append(phase)


@dataclass
class Results:
    phases: list[Phase]
    answers: dict[str, dict[str, int]]  # the Reprocess calls' answers, and what the check read
    problems: list[str]
    sizes: dict[str, int]  # mean record and value bytes


def _answer(response: Any) -> dict[str, int]:
    return {
        "selected": response.selected,
        "reprocessed": response.reprocessed,
        "skipped": response.skipped,
        "failed": response.failed,
    }


async def list_pages(client: GatewayClient, phase: Phase, dlt: str, *, error_class: str = "") -> int:
    """Every page of the DLT (limit PAGE_LIMIT); returns the dead letters listed."""
    token, listed = "", 0
    while True:
        started = time.perf_counter()
        page = await client.dead_letters.ListDeadLetters(
            dl.ListDeadLettersRequest(
                dlt_topic=dlt, error_class=error_class, limit=PAGE_LIMIT, page_token=token
            ),
            timeout=CALL_TIMEOUT_S,
        )
        phase.page_ms.append(1000 * (time.perf_counter() - started))
        phase.page_kib.append(page.ByteSize() / 1024)
        listed += len(page.dead_letters)
        token = page.next_page_token
        if not token:
            return listed


async def measure(args: argparse.Namespace, topics: Topics, gateway: GatewayProcess) -> Results:
    assert gateway.process is not None
    await wait_for_health(gateway.target, SERVING, timeout_s=90, process=gateway)
    meter = Meter(gateway.process.pid)
    n, servers = args.records, args.bootstrap_servers
    problems: list[str] = []
    answers: dict[str, dict[str, int]] = {}
    now = datetime.now(UTC)
    records = [dead_letter(i, topics.orders, now) for i in range(n)]
    rare = sum(1 for i in range(n) if i % RARE_EVERY == 0)

    producer = await asyncio.to_thread(dead_letter_producer, servers, topics.dlt)
    with meter.phase("produce the dead letters", "raw") as phase:
        await asyncio.to_thread(raw_produce, producer, records, topics.dlt)
        phase.records = n
    sizes = {
        "mean_record_bytes": round(
            sum(len(r.key) + len(r.value) + sum(len(k) + len(v) for k, v in r.headers) for r in records) / n
        ),
        "mean_value_bytes": round(sum(len(r.value) for r in records) / n),
    }
    del records

    async with GatewayClient(gateway.target) as client:
        # Warm-up: the channel, and the gateway's listing scanner and metadata.
        await client.dead_letters.ListDeadLetters(
            dl.ListDeadLettersRequest(dlt_topic=topics.dlt, limit=1), timeout=CALL_TIMEOUT_S
        )

        with meter.phase("list all (limit 1000)", "gateway") as phase:
            phase.records = await list_pages(client, phase, topics.dlt)
        if phase.records != n:
            problems.append(f"ListDeadLetters listed {phase.records} dead letters, not {n}")

        with meter.phase("list, 1% match (error_class)", "gateway") as phase:
            matched = await list_pages(client, phase, topics.dlt, error_class=RARE_ERROR)
            phase.records = n  # scanned
            phase.note = f"{matched} matched"
        if matched != rare:
            problems.append(f"the error_class filter matched {matched} dead letters, not {rare}")

        with meter.phase("read the DLT to its end", "raw") as phase:
            phase.records = await asyncio.to_thread(read_to_end, servers, topics.dlt, PARTITIONS, _ignore)

        calls = [
            ("reprocess all", dl.ReprocessRequest(dlt_topic=topics.dlt), {"reprocessed": n}),
            ("reprocess all again (skipped)", dl.ReprocessRequest(dlt_topic=topics.dlt), {"skipped": n}),
            ("reprocess dry run", dl.ReprocessRequest(dlt_topic=topics.dlt, dry_run=True), {"skipped": n}),
        ]
        for name, request, expected in calls:
            with meter.phase(name, "gateway") as phase:
                response = await client.dead_letters.Reprocess(request, timeout=CALL_TIMEOUT_S)
                phase.records = n
            answers[name] = _answer(response)
            wanted = {"selected": n, "reprocessed": 0, "skipped": 0, "failed": 0, **expected}
            if answers[name] != wanted:
                problems.append(f"{name}: answered {answers[name]}, expected {wanted}")

    on_orders, distinct = await asyncio.to_thread(replays_on, servers, topics.orders)
    answers["check"] = {"records_on_orders": on_orders, "distinct_replayed_from": distinct}
    if on_orders != n or distinct != n:
        problems.append(
            f"{topics.orders} holds {on_orders} records ({distinct} distinct replayed dead letters), "
            f"not exactly {n}"
        )

    for name, with_states in (
        (f"transactional copy, {args.chunk}/txn", False),
        (f"transactional copy + states, {args.chunk}/txn", True),
    ):
        with meter.phase(name, "raw") as phase:
            phase.records = await asyncio.to_thread(
                raw_copy,
                servers,
                topics,
                args.chunk,
                transactional_id=f"{topics.prefix}-raw-copy-{with_states}",
                with_states=with_states,
            )
        if phase.records != n:
            problems.append(f"{name}: read {phase.records} records, not {n}")

    return Results(meter.phases, answers, problems, sizes)


# --- reporting ----------------------------------------------------------------------------------------------


def idle_gateway_cpu_ms_per_s(phases: list[Phase]) -> float:
    """The gateway's CPU over all the raw phases (which leave it idle): its baseline."""
    raw = [p for p in phases if p.path == "raw"]
    seconds = sum(p.seconds for p in raw)
    return 1000 * sum(p.gateway_cpu_s for p in raw) / seconds if seconds else math.nan


def ratios(phases: list[Phase]) -> dict[str, float]:
    """gateway/raw throughput."""
    by = {p.name: p for p in phases}

    def ratio(gateway: str, raw: str) -> float:
        return round(by[gateway].rate / by[raw].rate, 3)

    copy = [p.name for p in phases if p.name.startswith("transactional copy")]
    return {
        "list_all_over_raw_read": ratio("list all (limit 1000)", "read the DLT to its end"),
        "reprocess_over_raw_copy": ratio("reprocess all", copy[0]),
        "reprocess_over_raw_copy_with_states": ratio("reprocess all", copy[1]),
    }


def report(results: Results, args: argparse.Namespace) -> str:
    def num(value: float, digits: int = 1) -> str:
        return "-" if math.isnan(value) else f"{value:.{digits}f}"

    sizes = results.sizes
    lines = [
        f"{args.records} dead letters (gateway format) on {PARTITIONS} partitions; records of "
        f"~{sizes['mean_record_bytes']} bytes (key + value + headers), values "
        f"~{sizes['mean_value_bytes']} bytes; Reprocess chunk {args.chunk}",
        f"{'phase':44s} {'path':7s} {'records':>8s} {'s':>7s} {'records/s':>10s} "
        f"{'page p50':>8s} {'page p99':>8s}   CPU ms/1k: {'gateway':>7s} {'bench':>6s}",
    ]
    for phase in results.phases:
        name = f"{phase.name} ({phase.note})" if phase.note else phase.name
        lines.append(
            f"{name:44s} {phase.path:7s} {phase.records:8d} {phase.seconds:7.2f} {phase.rate:10.0f} "
            f"{num(phase.p(0.5)):>8s} {num(phase.p(0.99)):>8s}   {'':10s} "
            f"{num(phase.gateway_cpu_ms_per_1000):>7s} {num(phase.cpu_ms_per_1000(phase.bench_cpu_s)):>6s}"
        )
    pages = [p for p in results.phases if p.page_kib]
    if pages:
        lines.append(
            "page size: "
            + "; ".join(
                f"{p.name}: {len(p.page_ms)} pages, {sum(p.page_kib) / len(p.page_kib):.0f} KiB mean"
                for p in pages
            )
        )
    lines.append(
        f"gateway CPU while idle (during the raw phases): {idle_gateway_cpu_ms_per_s(results.phases):.0f} ms "
        "per second"
    )
    r = ratios(results.phases)
    lines.append(
        f"ratio gateway/raw throughput: list all / raw read {r['list_all_over_raw_read']:.3f}; "
        f"reprocess / raw transactional copy {r['reprocess_over_raw_copy']:.3f} "
        f"(/ copy + states {r['reprocess_over_raw_copy_with_states']:.3f})"
    )
    for name, answer in results.answers.items():
        lines.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in answer.items()))
    lines.append("problems: " + ("; ".join(results.problems) if results.problems else "none"))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(  # else the dev stack's (`kpg dev up`), which the settings' defaults point at
        "--bootstrap-servers",
        default=os.environ.get("KPG_KAFKA__BOOTSTRAP_SERVERS", KafkaSettings().bootstrap_servers),
    )
    parser.add_argument("--redis-url", default=os.environ.get("KPG_REDIS__URL", RedisSettings().url))
    parser.add_argument("--records", type=int, default=20_000, help="dead letters (default 20,000)")
    parser.add_argument(
        "--chunk",
        type=int,
        default=DeadLettersSettings().batch_size,
        help="replays per Kafka transaction, the gateway's and the raw copy's (default: the gateway's, 500)",
    )
    parser.add_argument("--topic-prefix", default=f"bench-dlt-{uuid.uuid4().hex[:8]}")
    parser.add_argument("--workdir", type=Path, help="the gateway's state and log (default: temporary)")
    parser.add_argument("--keep-topics", action="store_true", help="do not delete the run's topics")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    args = parser.parse_args()
    if args.records < RARE_EVERY:
        parser.error(f"--records must be at least {RARE_EVERY}")

    topics = Topics(args.topic_prefix)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kpg-bench-dead-letters-"))
    workdir.mkdir(parents=True, exist_ok=True)
    gateway = dead_letters_gateway(args, topics, workdir)
    finished = False
    try:
        create_topics(
            args.bootstrap_servers,
            {
                topics.orders: (PARTITIONS, {}),
                topics.dlt: (PARTITIONS, {}),
                topics.raw_copy: (PARTITIONS, {}),
                topics.raw_state: (1, {"cleanup.policy": "compact"}),
            },
        )
        gateway.start()
        results = asyncio.run(measure(args, topics, gateway))
        finished = True
    finally:
        stop_gateway(gateway)
        if not args.keep_topics:
            delete_topics(args.bootstrap_servers, topics.all())
        if finished and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not finished:
            print(f"logs kept in {workdir}", file=sys.stderr)

    print(report(results, args))
    if args.json is not None:
        figures = {
            "records": args.records,
            "partitions": PARTITIONS,
            "chunk": args.chunk,
            "page_limit": PAGE_LIMIT,
            "sizes": results.sizes,
            "phases": [phase.to_json() for phase in results.phases],
            "ratios_gateway_over_raw": ratios(results.phases),
            "idle_gateway_cpu_ms_per_s": figure(idle_gateway_cpu_ms_per_s(results.phases), 1),
            "answers": results.answers,
            "problems": results.problems,
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if results.problems else 0


if __name__ == "__main__":
    sys.exit(main())
