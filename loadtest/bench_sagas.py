"""Saga throughput and duration through the gateway, next to the bare Kafka round trips the same saga needs,
with the same participants on the same broker, in one run.

    .venv/bin/kpg dev up && .venv/bin/python loadtest/bench_sagas.py

Starts its own gateway (`kpg serve` with a fresh SQLite database in its own state folder, and definitions
holding examples/definitions.yaml's `place_order` on topics under a fresh prefix) and the example
participants (`examples/participants.py all`: the three of them in one process, in-memory dedupe). Then, for
each number of sagas in flight, for --duration seconds each:
- gateway: StartSaga, then WatchSaga until a final status (the saga's duration ends when it arrives);
- bare: each step's command produced as the gateway sends it (gateway/domain/sagas.py `_command`: same
  headers and JSON value), the participant's reply awaited by `kpg-correlation-id` on a reply topic of
  its own, then the next step.
Also the CPU time each process spent per completed saga (the gateway's, the participants', this driver's),
and the gateway's CPU per second while idle (during the bare rows, which do not use it).

The participants run in a process of their own, as they would be deployed: the driver's work (64 watch
streams, or the bare path's consumer) never delays their replies, and their CPU is measured apart.
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
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import yaml
from confluent_kafka import Consumer, Message, Producer
from kpg import GatewayClient, error_details
from kpg.v1 import sagas_pb2 as sg

from gateway.domain.dead_letters import dlt_topic
from gateway.domain.sagas import (
    CONTENT_TYPE,
    CORRELATION_ID,
    JSON,
    MESSAGE_ID,
    MESSAGE_TYPE,
    REPLY_TOPIC,
    SAGA_ID,
    SAGA_STEP,
    SAGA_TYPE,
    Kind,
    correlation_id,
)
from gateway.settings import HealthSettings
from loadtest.support import ReadyProcess, cpu_seconds, create_topics, delete_topics, figure, stop_gateway
from tests.support import SERVING, GatewayProcess, wait_for_health

REPO = Path(__file__).resolve().parents[1]
SAGA = "place_order"
# An order that completes under the example participants' rules.
ORDER: dict[str, Any] = {"sku": "A-1", "quantity": 2, "amount": 40, "customer": "bench"}
FINAL = {sg.SAGA_STATUS_COMPLETED, sg.SAGA_STATUS_COMPENSATED, sg.SAGA_STATUS_FAILED}
SAGA_TIMEOUT_S = 60.0
REPLY_PARTITIONS = 6  # the gateway's saga reply topic has 6 by default: the bare one gets as many

Saga = Callable[[], Awaitable[str]]  # runs one saga to its end: "COMPLETED", or what happened instead


@dataclass(frozen=True)
class Step:
    name: str
    topic: str
    command: str


@dataclass(frozen=True)
class Topics:
    """Every topic of one run, under its prefix."""

    prefix: str
    steps: tuple[Step, ...]

    @property
    def saga_replies(self) -> str:
        return f"{self.prefix}sagas.replies"

    @property
    def request_replies(self) -> str:
        return f"{self.prefix}requests.replies"

    @property
    def bare_replies(self) -> str:
        return f"{self.prefix}bare.replies"

    def all(self) -> list[str]:
        return [
            *(s.topic for s in self.steps),
            self.saga_replies,
            dlt_topic(self.saga_replies),
            self.request_replies,
            dlt_topic(self.request_replies),
            self.bare_replies,
        ]


def saga_definition(prefix: str) -> dict[str, Any]:
    """examples/definitions.yaml's `place_order`, its step topics under `prefix`."""
    example = yaml.safe_load((REPO / "examples" / "definitions.yaml").read_text())["sagas"][SAGA]
    return {**example, "steps": [{**s, "topic": prefix + s["topic"]} for s in example["steps"]]}


# --- the processes ------------------------------------------------------------------------------------------


def saga_gateway(args: argparse.Namespace, topics: Topics, workdir: Path) -> GatewayProcess:
    """`kpg serve` on free ports with the saga alone, a fresh SQLite database, and reply topics and groups of
    its own (not the deployment's shared ones: other gateways may be using this Kafka and Redis)."""
    definitions = workdir / "definitions.yaml"
    definitions.write_text(json.dumps({"sagas": {SAGA: saga_definition(topics.prefix)}}))  # JSON is YAML
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
            # GatewayProcess checks health every 0.2 s for tests; the default is what a user runs.
            "KPG_HEALTH__CHECK_INTERVAL_S": str(HealthSettings().check_interval_s),
        },
        args=["--definitions", str(definitions)],
    )


# --- Kafka topics -------------------------------------------------------------------------------------------


# --- the two paths ------------------------------------------------------------------------------------------


def through_gateway(client: GatewayClient) -> Saga:
    async def saga() -> str:
        request = sg.StartSagaRequest(saga_type=SAGA)
        request.input.update(ORDER)
        started = await client.sagas.StartSaga(request)
        watch = client.sagas.WatchSaga(sg.WatchSagaRequest(saga_id=started.saga_id))
        try:
            async for state in watch:
                if state.status in FINAL:
                    return sg.SagaStatus.Name(state.status).removeprefix("SAGA_STATUS_")
        finally:
            watch.cancel()  # a no-op once the server has ended the stream (it does after a final status)
        return "the watch ended before a final status"

    return saga


class BareSagas:
    """The saga's three round trips straight through confluent-kafka: each step's command as the gateway
    sends it (headers and JSON value of gateway/domain/sagas.py `_command`), then the participant's reply,
    matched by `kpg-correlation-id` on a reply topic of its own, then the next step."""

    def __init__(self, bootstrap_servers: str, steps: tuple[Step, ...], reply_topic: str) -> None:
        self._steps = steps
        self._reply_topic = reply_topic
        # As the gateway's saga producer: idempotent, acks=all, 1 ms linger.
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap_servers,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 1,
                "socket.nagle.disable": True,
            }
        )
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap_servers,
                "group.id": f"{reply_topic}-bench",
                "auto.offset.reset": "earliest",  # the topic is this run's: no reply is missed while joining
                "fetch.wait.max.ms": 5,
                "socket.nagle.disable": True,
            }
        )
        self._kafka_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-bare-replies")
        self._waiting: dict[bytes, asyncio.Future[bytes]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self._kafka_thread, self._consumer.subscribe, [self._reply_topic]
        )
        self._task = asyncio.create_task(self._consume(), name="bench-bare-replies")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._kafka_thread, self._producer.flush, 5)
        await loop.run_in_executor(self._kafka_thread, self._consumer.close)
        self._kafka_thread.shutdown()

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            for message in await loop.run_in_executor(self._kafka_thread, _consume_ready, self._consumer):
                if message.error() is not None:
                    continue
                headers = dict(cast("list[tuple[str, bytes]]", message.headers() or []))
                future = self._waiting.pop(headers.get(CORRELATION_ID, b""), None)
                if future is not None and not future.done():
                    future.set_result(message.value() or b"")

    async def saga(self) -> str:
        saga_id = str(uuid.uuid4())
        results: dict[str, Any] = {}
        for index, step in enumerate(self._steps):
            reply = json.loads(await self._round_trip(saga_id, index, step, results))
            if reply.get("ok") is not True:
                return f"step {step.name} failed: {reply.get('error')}"
            results[step.name] = reply.get("data") or {}
        return "COMPLETED"

    async def _round_trip(self, saga_id: str, index: int, step: Step, results: Mapping[str, Any]) -> bytes:
        ident = correlation_id(saga_id, index, Kind.COMMAND)
        value = {
            "saga_id": saga_id,
            "saga_type": SAGA,
            "step": step.name,
            "command": step.command,
            "kind": Kind.COMMAND.value,
            "input": ORDER,
            "results": results,
        }
        headers = {
            MESSAGE_TYPE: step.command,
            SAGA_ID: saga_id,
            SAGA_TYPE: SAGA,
            SAGA_STEP: step.name,
            MESSAGE_ID: ident,
            CORRELATION_ID: ident,
            REPLY_TOPIC: self._reply_topic,
            CONTENT_TYPE: JSON,
        }
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[ident.encode()] = future
        try:
            self._producer.produce(
                step.topic,
                json.dumps(value, separators=(",", ":")).encode(),
                key=saga_id.encode(),
                headers=[(k, v.encode()) for k, v in headers.items()],
            )
            self._producer.poll(0)  # serve delivery reports
            return await future
        finally:
            self._waiting.pop(ident.encode(), None)


def _consume_ready(consumer: Consumer, max_messages: int = 500) -> list[Message]:
    """What is there now, else the first message within 100 ms and what came with it."""
    messages = consumer.consume(max_messages, 0)
    if not messages:
        messages = consumer.consume(1, 0.1)
        if messages:
            messages += consumer.consume(max_messages - 1, 0)
    return messages


# --- measuring ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    path: str
    in_flight: int
    seconds: float = 0.0
    durations_ms: list[float] = field(default_factory=list)  # of the sagas that COMPLETED
    errors: Counter[str] = field(default_factory=Counter)
    cpu_s: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds used during the row

    @property
    def sagas(self) -> int:
        return len(self.durations_ms)

    @property
    def rate(self) -> float:
        return self.sagas / self.seconds if self.seconds else math.nan

    def p(self, q: float) -> float:
        ordered = sorted(self.durations_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else math.nan

    @property
    def per_saga(self) -> list[str]:
        """The processes that worked on this row's sagas (the bare path leaves the gateway idle)."""
        return [name for name in self.cpu_s if not (self.path == "bare" and name == "gateway")]

    def cpu_ms_per_saga(self, process: str) -> float:
        if process not in self.per_saga or not self.sagas:
            return math.nan
        return 1000 * self.cpu_s[process] / self.sagas

    @property
    def idle_gateway_cpu_ms_per_s(self) -> float:
        """The gateway's CPU while only the bare path runs: its baseline (sweeps, health checks, polls)."""
        return 1000 * self.cpu_s["gateway"] / self.seconds if self.path == "bare" else math.nan

    def to_json(self) -> dict[str, Any]:
        figures = {
            "path": self.path,
            "in_flight": self.in_flight,
            "seconds": figure(self.seconds, 3),
            "sagas": self.sagas,
            "sagas_per_s": figure(self.rate, 1),
            "p50_ms": figure(self.p(0.5), 1),
            "p99_ms": figure(self.p(0.99), 1),
            "errors": dict(self.errors),
            "cpu_ms_per_saga": {name: figure(self.cpu_ms_per_saga(name), 2) for name in self.per_saga},
        }
        if self.path == "bare":
            figures["idle_gateway_cpu_ms_per_s"] = figure(self.idle_gateway_cpu_ms_per_s, 1)
        return figures


async def run_row(row: Row, saga: Saga, duration_s: float, cpu: Callable[[], dict[str, float]]) -> Row:
    """`row.in_flight` callers, each running one saga after another until `duration_s` has passed."""
    deadline = time.perf_counter() + duration_s

    async def caller() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(SAGA_TIMEOUT_S):
                    outcome = await saga()
            except TimeoutError:
                outcome = f"no final status within {SAGA_TIMEOUT_S:.0f}s"
            except grpc.aio.AioRpcError as exc:
                _raise_if_cancelling()
                outcome = f"{exc.code().name} {error_details(exc).reason}".strip()
            if outcome == "COMPLETED":
                row.durations_ms.append(1000 * (time.perf_counter() - started))
            else:
                row.errors[outcome] += 1

    before = cpu()
    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(row.in_flight)))
    row.seconds = time.perf_counter() - started
    row.cpu_s = {name: spent - before[name] for name, spent in cpu().items()}
    return row


def _raise_if_cancelling() -> None:
    """A call that failed while this task was being cancelled is the cancellation."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def measure(
    args: argparse.Namespace, topics: Topics, gateway: GatewayProcess, participants: ReadyProcess
) -> list[Row]:
    assert gateway.process is not None and participants.process is not None
    gateway_pid, participants_pid = gateway.process.pid, participants.process.pid
    await wait_for_health(gateway.target, SERVING, timeout_s=90, process=gateway)

    def cpu() -> dict[str, float]:
        return {
            "gateway": cpu_seconds(gateway_pid),
            "participants": cpu_seconds(participants_pid),
            "driver": time.process_time(),
        }

    bare = BareSagas(args.bootstrap_servers, topics.steps, topics.bare_replies)
    await bare.start()
    try:
        async with GatewayClient(gateway.target) as client:
            paths = [("gateway", through_gateway(client)), ("bare", bare.saga)]
            for name, saga in paths:  # warm-up: connections, metadata, the consumers' partitions
                warm = await run_row(Row(name, 8), saga, args.warmup, cpu)
                if warm.errors:
                    raise RuntimeError(f"warm-up of the {name} path failed: {dict(warm.errors)}")
            rows = []
            for in_flight in args.in_flight:
                for name, saga in paths:
                    rows.append(await run_row(Row(name, in_flight), saga, args.duration, cpu))
            return rows
    finally:
        await bare.close()


# --- reporting ----------------------------------------------------------------------------------------------


def ratios(rows: list[Row]) -> list[dict[str, float]]:
    """gateway/bare throughput and p50, per number in flight."""
    by = {(r.path, r.in_flight): r for r in rows}
    out = []
    for in_flight in sorted({r.in_flight for r in rows}):
        gateway, bare = by[("gateway", in_flight)], by[("bare", in_flight)]
        out.append(
            {
                "in_flight": in_flight,
                "throughput": round(gateway.rate / bare.rate, 3),
                "p50": round(gateway.p(0.5) / bare.p(0.5), 3),
            }
        )
    return out


def report(rows: list[Row], args: argparse.Namespace) -> str:
    def ms(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:.2f}"

    lines = [
        f"{SAGA} (3 steps), {args.duration:.0f} s per row; participants: examples/participants.py all "
        "(own process, in-memory dedupe)",
        f"{'path':8s} {'in flight':>9s} {'sagas':>6s} {'sagas/s':>8s} {'p50 ms':>7s} {'p99 ms':>7s} "
        f"{'errors':>6s}   CPU ms/saga: {'gateway':>7s} {'participants':>12s} {'driver':>6s}",
    ]
    for row in rows:
        lines.append(
            f"{row.path:8s} {row.in_flight:9d} {row.sagas:6d} {row.rate:8.1f} {row.p(0.5):7.1f} "
            f"{row.p(0.99):7.1f} {sum(row.errors.values()):6d}   {'':12s} "
            f"{ms(row.cpu_ms_per_saga('gateway')):>7s} {ms(row.cpu_ms_per_saga('participants')):>12s} "
            f"{ms(row.cpu_ms_per_saga('driver')):>6s}"
        )
    idle = ", ".join(f"{r.idle_gateway_cpu_ms_per_s:.0f}" for r in rows if r.path == "bare")
    lines.append(f"gateway CPU while idle (during the bare rows): {idle} ms per second")
    lines.append(
        "ratio gateway/bare: "
        + "; ".join(
            f"{r['in_flight']:.0f} in flight: throughput {r['throughput']:.2f}, p50 x{r['p50']:.2f}"
            for r in ratios(rows)
        )
    )
    for row in rows:
        if row.errors:
            what = ", ".join(f"{outcome}: {count}" for outcome, count in row.errors.items())
            lines.append(f"errors, {row.path} x{row.in_flight}: {what}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--bootstrap-servers", default=os.environ.get("KPG_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    )
    parser.add_argument("--redis-url", default=os.environ.get("KPG_REDIS__URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument(
        "--in-flight",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1, 16, 64],
        help="sagas in flight for each row, comma-separated (default 1,16,64)",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per row (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per path (default 2)")
    parser.add_argument("--topic-prefix", default=f"bench-{uuid.uuid4().hex[:8]}.")
    parser.add_argument("--workdir", type=Path, help="the gateway's state and the logs (default: temporary)")
    parser.add_argument("--keep-topics", action="store_true", help="do not delete the run's topics")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    args = parser.parse_args()

    definition = saga_definition(args.topic_prefix)
    topics = Topics(
        args.topic_prefix, tuple(Step(s["name"], s["topic"], s["command"]) for s in definition["steps"])
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kpg-bench-sagas-"))
    workdir.mkdir(parents=True, exist_ok=True)
    create_topics(args.bootstrap_servers, {topics.bare_replies: (REPLY_PARTITIONS, {})})
    # The three participants in one process of their own (in-memory dedupe); it prints `ready` once they
    # have their partitions.
    participants = ReadyProcess(
        "participants",
        [
            sys.executable,
            str(REPO / "examples" / "participants.py"),
            "all",
            "--bootstrap-servers",
            args.bootstrap_servers,
            "--topic-prefix",
            args.topic_prefix,
        ],
        log_path=workdir / "participants.log",
    )
    gateway = saga_gateway(args, topics, workdir)
    finished = False
    try:
        participants.start()
        gateway.start()
        participants.wait_ready(90)
        rows = asyncio.run(measure(args, topics, gateway, participants))
        finished = True
    finally:
        participants.stop()
        stop_gateway(gateway)
        if not args.keep_topics:
            delete_topics(args.bootstrap_servers, topics.all())
        if finished and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not finished:
            print(f"logs kept in {workdir}", file=sys.stderr)

    print(report(rows, args))
    if args.json is not None:
        figures = {
            "saga_type": SAGA,
            "steps": len(topics.steps),
            "seconds_per_row": args.duration,
            "participants": "examples/participants.py all, own process, MemoryDedupe",
            "rows": [row.to_json() for row in rows],
            "ratios_gateway_over_bare": ratios(rows),
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
