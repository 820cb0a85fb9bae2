"""Soak: load-then-idle cycles against a real gateway process, then what must still hold.

Each cycle: a burst (1-event appends from many callers, 100-event appends, request-reply to a responder
and to a topic nobody answers, callers that cancel mid-call, a client process SIGKILLed mid-call), then an
idle gap longer than the writers' lease, so every partition writer releases and must be taken again; then
one probe append per partition (each must be answered promptly) and a ReadStream of it (read-your-writes).
At the end SIGTERM must end the gateway within its grace period, and a plain Kafka consumer checks that
every acknowledged append is in the log with the versions the gateway answered, and no stream has a gap
or a duplicate version.

    make soak                                    # 10 minutes on the dev stack (kpg dev up)
    .venv/bin/python loadtest/soak.py --duration 60

Prints what it saw; exits 1 on any violation. `make test` runs a one-minute version (tests/e2e/test_soak.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from confluent_kafka import Consumer, KafkaError, TopicPartition
from kpg import GatewayClient, error_details
from kpg.v1 import event_store_pb2 as es
from kpg.v1 import request_reply_pb2 as rr

from gateway.domain.events import partition_for
from tests.support import SERVING, GatewayProcess, wait_for_health

PARTITIONS = 6
APPEND_DEADLINE_S = 30.0  # the gateway's own append timeout is 15 s: past this a call counts as hung
PROBE_DEADLINE_S = 10.0


@dataclass(frozen=True)
class SoakConfig:
    bootstrap_servers: str
    redis_url: str
    workdir: Path
    duration_s: float = 60.0
    burst_s: float = 6.0
    idle_s: float = 3.5  # longer than the writers' idle release (the lease TTL below)
    appenders: int = 32
    batch_appenders: int = 4
    requesters: int = 8
    quitters: int = 8
    lease_ttl_ms: int = 2000
    grace_s: float = 10.0
    database_url: str = ""


@dataclass
class Acked:
    stream: str
    first_version: int
    last_version: int
    event_ids: list[str]


@dataclass
class SoakReport:
    cycles: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    acked: list[Acked] = field(default_factory=list)
    append_ms: list[float] = field(default_factory=list)
    probe_ms: list[float] = field(default_factory=list)
    killed_clients: int = 0
    events_on_kafka: int = 0
    sigterm_s: float = 0.0
    exit_code: int | None = None
    violations: list[str] = field(default_factory=list)

    def violate(self, what: str) -> None:
        if len(self.violations) < 50:
            self.violations.append(what)

    def summary(self) -> str:
        def pct(values: list[float], q: float) -> str:
            if not values:
                return "-"
            ordered = sorted(values)
            return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))]:.0f}"

        def spread(values: list[float]) -> str:
            return f"p50 {pct(values, 0.5)} p99 {pct(values, 0.99)} max {pct(values, 1.0)}"

        events = sum(a.last_version - a.first_version + 1 for a in self.acked)
        lines = [
            f"cycles: {self.cycles} (burst, idle gap, probe of all {PARTITIONS} partitions)",
            f"acknowledged appends: {len(self.acked)} ({events} events); "
            f"on Kafka: {self.events_on_kafka} events",
            "append latency ms: " + spread(self.append_ms),
            "probe after idle ms (take-over + append): " + spread(self.probe_ms),
            f"clients killed mid-call: {self.killed_clients}",
            "outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items())),
            f"hung calls: {self.outcomes['append:hung'] + self.outcomes['request:hung']}",
            f"SIGTERM to exit: {self.sigterm_s:.1f}s (exit code {self.exit_code})",
            f"violations: {len(self.violations)}",
            *(f"  - {v}" for v in self.violations),
        ]
        return "\n".join(lines)


def soak_gateway(config: SoakConfig, definitions: Path) -> GatewayProcess:
    """`kpg serve` on free ports with the soak's definitions and settings; its log in the work folder."""
    env = {
        "KPG_KAFKA__BOOTSTRAP_SERVERS": config.bootstrap_servers,
        "KPG_REDIS__URL": config.redis_url,
        "KPG_EVENTS__LEASE_TTL_MS": str(config.lease_ttl_ms),
        "KPG_SHUTDOWN_GRACE_S": str(config.grace_s),
        "KPG_HEALTH__CHECK_INTERVAL_S": "0.5",
    }
    if config.database_url:
        env["KPG_DATABASE__URL"] = config.database_url
    return GatewayProcess(config.workdir, env=env, args=["--definitions", str(definitions)])


def sigterm(gateway: GatewayProcess, timeout_s: float) -> tuple[float, int | None]:
    """SIGTERM; (seconds until it exited, exit code or None if it did not within `timeout_s`: then killed)."""
    started = time.monotonic()
    try:
        code = gateway.terminate(timeout_s)
    except subprocess.TimeoutExpired:
        gateway.kill()
        return time.monotonic() - started, None
    return time.monotonic() - started, code


# A client that is SIGKILLed while its appends are in flight (the connection drops mid-call).
_DOOMED_CLIENT = textwrap.dedent(
    """
    import asyncio, json, sys, uuid
    from kpg import GatewayClient
    from kpg.v1 import event_store_pb2 as es

    async def main(target, category):
        async with GatewayClient(target) as kpg:
            async def one(i):
                while True:
                    await kpg.events.AppendEvents(es.AppendEventsRequest(
                        category=category, stream_id=f"doomed-{i % 20}",
                        events=[es.EventData(event_id=str(uuid.uuid4()), type="Doomed", data=b"{}")]))
            await asyncio.gather(*(one(i) for i in range(40)), return_exceptions=True)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


# The responder runs in a process of its own, so the load generator never starves it of CPU.
_RESPONDER = textwrap.dedent(
    """
    import asyncio, sys
    from kpg.responder import serve_requests

    async def echo(request):
        return request.payload

    async def main(bootstrap, topic):
        ready = asyncio.Event()
        task = asyncio.create_task(serve_requests(topic, echo, bootstrap_servers=bootstrap, ready=ready))
        await ready.wait()
        print("ready", flush=True)
        await task

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


class Soak:
    def __init__(self, config: SoakConfig) -> None:
        self.config = config
        self.category = f"soak{uuid.uuid4().hex[:8]}"
        self.topic = f"{self.category}.events"
        self.report = SoakReport()
        self.streams = [f"s-{i}" for i in range(300)]

    def _definitions(self) -> Path:
        path = self.config.workdir / "soak-definitions.yaml"
        path.write_text(
            json.dumps(
                {
                    "categories": {self.category: {"topic": self.topic, "partitions": PARTITIONS}},
                    "request_reply": {"topics": [f"{self.category}.requests", f"{self.category}.silent"]},
                }
            )
        )
        return path

    async def run(self) -> SoakReport:
        self.config.workdir.mkdir(parents=True, exist_ok=True)
        gateway = soak_gateway(self.config, self._definitions()).start()
        responder = subprocess.Popen(  # noqa: ASYNC220 (started once; its output is read off the loop)
            [sys.executable, "-c", _RESPONDER, self.config.bootstrap_servers, f"{self.category}.requests"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            await wait_for_health(gateway.target, SERVING, timeout_s=90, process=gateway)
            assert responder.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(responder.stdout.readline), 60)
            if line.strip() != b"ready":
                raise RuntimeError("the responder did not start")
            async with GatewayClient(gateway.target) as kpg:
                deadline = time.monotonic() + self.config.duration_s
                while time.monotonic() < deadline:
                    self.report.cycles += 1
                    await self._burst(kpg, gateway.target)
                    await asyncio.sleep(self.config.idle_s)
                    await self._probe(kpg)
        finally:
            responder.kill()
            await asyncio.to_thread(responder.wait)
            self.report.sigterm_s, self.report.exit_code = sigterm(gateway, self.config.grace_s + 20)
        limit = self.config.grace_s + 5
        if self.report.exit_code is None or self.report.sigterm_s > limit:
            self.report.violate(
                f"SIGTERM: still running after {self.report.sigterm_s:.1f}s (limit {limit:.0f}s)"
                if self.report.exit_code is None
                else f"SIGTERM: took {self.report.sigterm_s:.1f}s (limit {limit:.0f}s)"
            )
        elif self.report.exit_code != 0:
            self.report.violate(f"SIGTERM: exit code {self.report.exit_code}")
        await asyncio.to_thread(self._check_kafka)
        return self.report

    # --- load --------------------------------------------------------------------------------------------

    async def _burst(self, kpg: GatewayClient, target: str) -> None:
        until = time.monotonic() + self.config.burst_s
        doomed = subprocess.Popen(  # noqa: ASYNC220 (starting it does not block; it is killed, then waited off the loop)
            [sys.executable, "-c", _DOOMED_CLIENT, target, self.category],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        killer = asyncio.create_task(self._kill_later(doomed))
        workers = [self._appender(kpg, until, 1) for _ in range(self.config.appenders)]
        workers += [self._appender(kpg, until, 100) for _ in range(self.config.batch_appenders)]
        workers += [self._requester(kpg, until, answered=i % 2 == 0) for i in range(self.config.requesters)]
        workers += [self._quitter(kpg, until) for _ in range(self.config.quitters)]
        await asyncio.gather(*workers)
        await killer

    async def _kill_later(self, doomed: subprocess.Popen[bytes]) -> None:
        await asyncio.sleep(random.uniform(0.5, self.config.burst_s * 0.8))
        doomed.kill()
        await asyncio.to_thread(doomed.wait)
        self.report.killed_clients += 1

    def _request(self, stream: str, count: int) -> es.AppendEventsRequest:
        return es.AppendEventsRequest(
            category=self.category,
            stream_id=stream,
            events=[
                es.EventData(event_id=str(uuid.uuid4()), type="Soaked", data=b'{"n": 1}')
                for _ in range(count)
            ],
        )

    async def _append(self, kpg: GatewayClient, request: es.AppendEventsRequest, kind: str) -> None:
        started = time.monotonic()
        try:
            answer = await kpg.events.AppendEvents(request, timeout=APPEND_DEADLINE_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                self.report.outcomes["append:hung"] += 1
                self.report.violate(f"append to {request.stream_id} hung past {APPEND_DEADLINE_S:.0f}s")
            else:
                reason = error_details(exc).reason or exc.code().name
                self.report.outcomes[f"append:{reason}"] += 1
                self.report.violate(f"{kind} append to {request.stream_id} failed: {reason}: {exc.details()}")
            return
        self.report.append_ms.append(1000 * (time.monotonic() - started))
        self.report.outcomes["append:ok"] += 1
        self.report.acked.append(
            Acked(
                request.stream_id,
                answer.first_version,
                answer.last_version,
                [e.event_id for e in request.events],
            )
        )

    async def _appender(self, kpg: GatewayClient, until: float, count: int) -> None:
        while time.monotonic() < until:
            await self._append(kpg, self._request(random.choice(self.streams), count), f"{count}-event")

    async def _quitter(self, kpg: GatewayClient, until: float) -> None:
        """Callers that give up mid-call (client-side cancel: the server sees the call cancelled)."""
        while time.monotonic() < until:
            call: grpc.aio.Call = (
                kpg.events.AppendEvents(self._request(random.choice(self.streams), 1))
                if random.random() < 0.5
                else kpg.requests.Request(
                    rr.RequestMessage(topic=f"{self.category}.requests", payload=b"quit", timeout_ms=5000)
                )
            )
            await asyncio.sleep(random.uniform(0, 0.02))
            call.cancel()
            self.report.outcomes["cancelled"] += 1
            await asyncio.sleep(0.05)

    async def _requester(self, kpg: GatewayClient, until: float, *, answered: bool) -> None:
        topic = f"{self.category}.requests" if answered else f"{self.category}.silent"
        while time.monotonic() < until:
            try:
                reply = await kpg.requests.Request(
                    rr.RequestMessage(topic=topic, payload=b"ping", timeout_ms=10_000 if answered else 300),
                    timeout=APPEND_DEADLINE_S,
                )
            except grpc.aio.AioRpcError as exc:
                reason = error_details(exc).reason or exc.code().name
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and not reason:
                    self.report.outcomes["request:hung"] += 1
                    self.report.violate(f"request to {topic} hung")
                    continue
                self.report.outcomes[f"request:{reason}"] += 1
                if answered or reason != "REPLY_TIMEOUT":
                    self.report.violate(f"request to {topic} failed: {reason}: {exc.details()}")
                continue
            self.report.outcomes["request:replied"] += 1
            if not answered or reply.payload != b"ping":
                self.report.violate(f"request to {topic} got an unexpected reply {reply.payload!r}")

    async def _probe(self, kpg: GatewayClient) -> None:
        """After the idle gap every writer has released its partition: each must take appends promptly,
        and ReadStream must see the append at once."""
        for partition in range(PARTITIONS):
            stream = _stream_on(partition, f"probe-{self.report.cycles}")
            started = time.monotonic()
            try:
                answer = await kpg.events.AppendEvents(self._request(stream, 1), timeout=PROBE_DEADLINE_S)
                self.report.probe_ms.append(1000 * (time.monotonic() - started))
                read = await kpg.events.ReadStream(
                    es.ReadStreamRequest(category=self.category, stream_id=stream), timeout=PROBE_DEADLINE_S
                )
            except grpc.aio.AioRpcError as exc:
                self.report.outcomes["probe:failed"] += 1
                self.report.violate(f"partition {partition} after idle: {exc.code().name} {exc.details()}")
                continue
            if read.stream_version != answer.last_version:
                self.report.violate(f"ReadStream of {stream} right after its append: {read.stream_version}")
            self.report.outcomes["probe:ok"] += 1

    # --- checks ------------------------------------------------------------------------------------------

    def _check_kafka(self) -> None:
        """Read the whole topic (read_committed) with a plain consumer and compare with what was acked."""
        log: dict[str, list[tuple[int, str]]] = {}
        consumer = Consumer(
            {
                "bootstrap.servers": self.config.bootstrap_servers,
                "group.id": f"soak-check-{uuid.uuid4().hex}",
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
            }
        )
        consumer.assign([TopicPartition(self.topic, p, 0) for p in range(PARTITIONS)])
        ended: set[int] = set()
        try:
            while len(ended) < PARTITIONS:
                messages = consumer.consume(5000, 10)
                if not messages:
                    self.report.violate("reading the topic back stalled")
                    break
                for message in messages:
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            ended.add(message.partition() or 0)
                        continue
                    headers = dict(message.headers() or [])
                    key = message.key() or b""
                    stream = key.decode() if isinstance(key, bytes) else key
                    version = int(headers.get("ce_streamversion") or b"0")
                    event_id = headers.get("ce_id") or b""
                    log.setdefault(stream, []).append(
                        (version, event_id.decode() if isinstance(event_id, bytes) else event_id)
                    )
        finally:
            consumer.close()
        self.report.events_on_kafka = sum(len(v) for v in log.values())
        for stream, entries in log.items():
            versions = [v for v, _ in entries]
            if versions != list(range(1, len(versions) + 1)):
                duplicates = [v for v, n in Counter(versions).items() if n > 1]
                self.report.violate(f"stream {stream}: versions not 1..n (duplicates {duplicates[:5]})")
        for acked in self.report.acked:
            entries = log.get(acked.stream, [])
            found = entries[acked.first_version - 1 : acked.last_version]
            expected = list(
                zip(range(acked.first_version, acked.last_version + 1), acked.event_ids, strict=True)
            )
            if found != expected:
                self.report.violate(
                    f"acknowledged append lost: {acked.stream} v{acked.first_version}-{acked.last_version}"
                )


def _stream_on(partition: int, prefix: str) -> str:
    for i in range(10_000):
        stream = f"{prefix}-{i}"
        if partition_for(stream, PARTITIONS) == partition:
            return stream
    raise AssertionError("no stream id for the partition")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load-idle cycles")
    parser.add_argument("--workdir", type=Path, default=Path(".state/soak"))
    args = parser.parse_args()
    config = SoakConfig(
        bootstrap_servers=os.environ.get("KPG_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        redis_url=os.environ.get("KPG_REDIS__URL", "redis://127.0.0.1:6379/0"),
        workdir=args.workdir,
        duration_s=args.duration,
    )
    started = time.monotonic()
    report = asyncio.run(Soak(config).run())
    print(f"soak: {time.monotonic() - started:.0f}s in all")
    print(report.summary())
    if report.append_ms:
        print(f"append latency mean: {statistics.fmean(report.append_ms):.0f} ms")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
