"""append-event with several gateways, crashes and a Redis that forgets: versions stay contiguous."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
import redis.asyncio
from confluent_kafka import IsolationLevel, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]
from kpg import GatewayClient, error_details
from kpg.v1 import event_store_pb2 as es

from gateway.devstack.processes import free_port
from tests.conftest import Backends
from tests.e2e.test_event_store import _landed
from tests.support import SERVING, GatewayProcess, checking_consumer, wait_for_health

pytestmark = pytest.mark.e2e


async def _start(
    backends: Backends,
    workdir: Path,
    definitions: Path,
    *,
    redis_url: str | None = None,
) -> GatewayProcess:
    for _ in range(3):
        process = GatewayProcess(
            workdir,
            env={
                "KPG_KAFKA__BOOTSTRAP_SERVERS": backends.bootstrap_servers,
                "KPG_REDIS__URL": redis_url or backends.redis_url,
                "KPG_EVENTS__LEASE_TTL_MS": "2000",
            },
            args=["--definitions", str(definitions)],
        )
        while process.rest_port == process.grpc_port:  # free_port() may hand out the same port twice
            process.rest_port = free_port()
        process.start()
        if await _serving(process):
            return process
        # A port taken by another process between free_port() and the bind: try other ports.
        assert "cannot bind" in process.log(), process.log()
    raise AssertionError(f"the gateway never bound its ports:\n{process.log()}")


async def _serving(process: GatewayProcess) -> bool:
    """Waits for SERVING; False when the process exited first (wait_for_health alone would not notice
    while nothing listens on the port)."""
    assert process.process is not None
    health = asyncio.create_task(wait_for_health(process.target, SERVING, process=process))
    try:
        while not health.done():
            if process.process.poll() is not None:
                return False
            await asyncio.wait({health}, timeout=0.1)
        await health
        return True
    finally:
        health.cancel()


def _own_category(tmp_path: Path, prefix: str) -> tuple[str, Path]:
    """A category (and so an event topic, partition leases and transactional ids) no other test touches."""
    category = f"{prefix}{uuid.uuid4().hex[:10]}"
    path = tmp_path / f"{category}.yaml"
    path.write_text(json.dumps({"categories": {category: {"partitions": 3}}}))  # JSON is YAML
    return category, path


def _delete_topics(backends: Backends, category: str) -> None:
    admin = AdminClient({"bootstrap.servers": backends.bootstrap_servers})
    for future in admin.delete_topics([f"{category}.events", f"{category}.events.DLT"]).values():
        try:
            future.result()
        except Exception:  # not created (a gateway that never started): nothing to tidy
            pass


@pytest.fixture
async def two_gateways(
    backends: Backends, tmp_path: Path, repo_root: Path
) -> AsyncIterator[tuple[GatewayProcess, GatewayProcess]]:
    # Each with a database of its own (its own stream index), sharing Kafka and Redis.
    definitions = repo_root / "examples" / "definitions.yaml"
    first = await _start(backends, tmp_path / "a", definitions)
    second = await _start(backends, tmp_path / "b", definitions)
    try:
        yield first, second
    finally:
        first.kill()
        second.kill()


def _append(
    stream: str, expected_version: int | None = None, category: str = "orders"
) -> es.AppendEventsRequest:
    request = es.AppendEventsRequest(
        category=category,
        stream_id=stream,
        events=[es.EventData(type="Tick", data=json.dumps({"at": stream}).encode())],
    )
    if expected_version is not None:
        request.expected_version = expected_version
    return request


async def test_200_concurrent_appends_through_two_gateways(
    two_gateways: tuple[GatewayProcess, GatewayProcess], backends: Backends
) -> None:
    stream = f"race-{uuid.uuid4().hex[:8]}"
    clients = [GatewayClient(g.target) for g in two_gateways]
    head = 0  # a hint of the head, so expected versions land near it
    successes: list[es.AppendEventsResponse] = []
    conflicts = 0

    async def one(i: int) -> None:
        nonlocal head, conflicts
        expected = max(0, head + random.randint(-2, 1))
        try:
            response = await clients[i % 2].events.AppendEvents(_append(stream, expected_version=expected))
        except grpc.aio.AioRpcError as exc:
            details = error_details(exc)
            assert details.reason == "WRONG_EXPECTED_VERSION", details
            head = max(head, int(details.metadata["actual"]))
            conflicts += 1
            return
        assert response.first_version == expected + 1
        head = max(head, response.last_version)
        successes.append(response)

    try:
        await asyncio.gather(*(one(i) for i in range(200)))
    finally:
        for client in clients:
            await client.close()
    landed = _landed(backends, "orders.events", stream)
    versions = [v for v, _ in landed]
    assert versions == list(range(1, len(versions) + 1)), "a gap or a duplicate version"
    assert sorted(r.first_version for r in successes) == versions  # every success matches a record
    assert len(successes) + conflicts == 200 and successes


# --- SIGKILL in the middle of appends --------------------------------------------------------------------


def _wait_until_settled(backends: Backends, topic: str, timeout_s: float) -> None:
    """Until no transaction is open on the topic (each partition's last stable offset is its high
    watermark): what a dead writer left open is aborted by the broker, a commit it asked for completes."""
    admin = AdminClient({"bootstrap.servers": backends.bootstrap_servers})
    partitions = [
        TopicPartition(topic, p) for p in admin.list_topics(topic, timeout=10).topics[topic].partitions
    ]
    deadline = time.monotonic() + timeout_s
    while True:
        ends = [
            {
                tp.partition: future.result().offset
                for tp, future in admin.list_offsets(
                    {tp: OffsetSpec.latest() for tp in partitions},  # type: ignore[no-untyped-call]
                    isolation_level=level,
                ).items()
            }
            for level in (IsolationLevel.READ_COMMITTED, IsolationLevel.READ_UNCOMMITTED)
        ]
        if ends[0] == ends[1]:
            return
        assert time.monotonic() < deadline, f"a transaction stays open on {topic}: {ends}"
        time.sleep(0.2)


def _streams_on_kafka(backends: Backends, topic: str) -> dict[str, list[tuple[int, str]]]:
    """Per stream (record key), (version, ce_id) of each record in offset order, as a plain read_committed
    consumer sees the whole (settled) topic; like `_landed`, for every stream of the topic in one pass."""
    consumer = checking_consumer(backends.bootstrap_servers)
    try:
        partitions = [
            TopicPartition(topic, p) for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ]
        ends = [consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in partitions]
        consumer.assign([TopicPartition(topic, tp.partition, 0) for tp in partitions])
        found: dict[str, list[tuple[int, str]]] = {}
        deadline = time.monotonic() + 60
        # The consumer's position moves past commit markers too: at the high watermark, all is read.
        while any(
            end > 0 and p.offset < end for p, end in zip(consumer.position(partitions), ends, strict=True)
        ):
            assert time.monotonic() < deadline, f"{topic} was not read to its end {ends}"
            for m in consumer.consume(500, 0.2):
                assert m.error() is None, m.error()
                headers = dict(cast("list[tuple[str, bytes]]", m.headers() or []))
                stream = (m.key() or b"").decode()
                found.setdefault(stream, []).append(
                    (int(headers["ce_streamversion"]), headers["ce_id"].decode())
                )
        return found
    finally:
        consumer.close()


@dataclass
class _Call:
    stream: str
    event_ids: list[str]
    response: es.AppendEventsResponse | None = None
    error: grpc.aio.AioRpcError | None = None
    ended_at: float = 0.0  # monotonic; 0 while in flight


async def test_sigkill_mid_appends_then_append_again(backends: Backends, tmp_path: Path) -> None:
    """Appends stream into several streams of a gateway that is SIGKILLed under them: every append it
    acknowledged is on Kafka at the versions it answered, versions stay 1..n, and another gateway
    continues each stream at n + 1 (the dead writer's lease ends and its transaction is aborted)."""
    category, definitions = _own_category(tmp_path, "crash")
    topic = f"{category}.events"
    streams = [f"s{i}-{uuid.uuid4().hex[:6]}" for i in range(6)]
    victim = await _start(backends, tmp_path / "victim", definitions)
    survivor = await _start(backends, tmp_path / "survivor", definitions)
    calls: list[_Call] = []
    steady = asyncio.Event()  # every stream has appends acknowledged: the appends are flowing
    stop = asyncio.Event()

    async def appender(client: GatewayClient, stream: str) -> None:
        while not stop.is_set():
            ids = [str(uuid.uuid4()) for _ in range(random.randint(1, 3))]
            call = _Call(stream, ids)
            calls.append(call)
            request = es.AppendEventsRequest(
                category=category,
                stream_id=stream,
                events=[es.EventData(event_id=i, type="Tick", data=b'{"n": 1}') for i in ids],
            )
            try:
                call.response = await client.events.AppendEvents(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                call.error = exc
            call.ended_at = time.monotonic()
            if call.error is not None:
                return
            acks = Counter(c.stream for c in calls if c.response is not None)
            if len(acks) == len(streams) and min(acks.values()) >= 5:
                steady.set()

    try:
        async with GatewayClient(victim.target) as client:
            # Three appenders per stream, so each stream has several appends queued at any moment.
            appenders = [asyncio.create_task(appender(client, s)) for s in streams for _ in range(3)]
            await asyncio.wait_for(steady.wait(), 60)
            stop.set()  # no append starts after the kill: every failure below was in flight at it
            in_flight = [c for c in calls if not c.ended_at]
            killed_at = time.monotonic()
            victim.kill()  # SIGKILL
            await asyncio.wait_for(asyncio.gather(*appenders), 60)

        acknowledged = [c for c in calls if c.response is not None]
        failed = [c for c in calls if c.error is not None]
        assert len(acknowledged) + len(failed) == len(calls)
        assert all(c.ended_at >= killed_at for c in failed), [
            (c.error.code(), c.error.details()) for c in failed if c.error and c.ended_at < killed_at
        ]
        assert failed, f"the kill landed when no append was in flight ({len(in_flight)} pending)"
        assert {c.error.code() for c in failed if c.error} == {grpc.StatusCode.UNAVAILABLE}, [
            (c.error.code(), c.error.details()) for c in failed if c.error
        ]
        assert all(c in in_flight for c in failed)
        assert {c.stream for c in acknowledged} == set(streams)

        await asyncio.to_thread(_wait_until_settled, backends, topic, 60)
        on_kafka = await asyncio.to_thread(_streams_on_kafka, backends, topic)
        assert set(on_kafka) <= set(streams)
        heads: dict[str, int] = {}
        for stream in streams:
            landed = on_kafka.get(stream, [])
            versions = [v for v, _ in landed]
            assert versions == list(range(1, len(versions) + 1)), f"{stream}: a gap or a duplicate"
            version_of = {event_id: v for v, event_id in landed}
            assert len(version_of) == len(landed), f"{stream}: an event id twice"
            sent = {i for c in calls if c.stream == stream for i in c.event_ids}
            assert set(version_of) <= sent, f"{stream}: an event nobody sent"
            for call in (c for c in calls if c.stream == stream):
                if call.response is not None:
                    first = call.response.first_version
                    assert (call.response.last_version - first + 1) == len(call.event_ids)
                    assert [version_of.get(i) for i in call.event_ids] == list(
                        range(first, first + len(call.event_ids))
                    ), f"{stream}: an acknowledged append is not on Kafka as answered"
                else:  # unanswered: all of it landed (committed just before the kill) or none
                    got = [version_of.get(i) for i in call.event_ids]
                    if got[0] is None:
                        assert set(got) == {None}, f"{stream}: part of an append landed"
                    else:
                        assert got == list(range(got[0], got[0] + len(got))), f"{stream}: {got}"
            heads[stream] = len(versions)

        # The survivor takes each partition over (after the dead writer's 2 s lease) and goes on at n + 1.
        started = time.monotonic()
        async with GatewayClient(survivor.target) as client:
            again = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        client.events.AppendEvents(
                            _append(s, expected_version=heads[s], category=category), timeout=20
                        )
                        for s in streams
                    )
                ),
                20,
            )
        took = time.monotonic() - started
        assert [(r.first_version, r.duplicate) for r in again] == [(heads[s] + 1, False) for s in streams]
        assert took < 15, f"the survivor took {took:.1f}s to continue the streams"
        after = await asyncio.to_thread(_streams_on_kafka, backends, topic)
        for stream in streams:
            assert [v for v, _ in after[stream]] == list(range(1, heads[stream] + 2))
            assert after[stream][: heads[stream]] == on_kafka.get(stream, [])
    finally:
        victim.kill()
        survivor.kill()
        await asyncio.to_thread(_delete_topics, backends, category)


# --- Redis forgets everything --------------------------------------------------------------------------


async def _free_redis_db(redis_url: str) -> str:
    """The URL of an empty database of the test Redis (highest number first), so that flushing it touches
    no other test's keys."""
    parts = urlsplit(redis_url)
    for db in range(15, 0, -1):
        url = urlunsplit(parts._replace(path=f"/{db}"))
        client = redis.asyncio.Redis.from_url(url)
        try:
            if await client.dbsize() == 0:
                return url
        finally:
            await client.aclose()
    raise AssertionError("no empty Redis database to use")


@dataclass(frozen=True)
class _Pair:
    first: GatewayProcess
    second: GatewayProcess
    redis_url: str
    category: str


@pytest.fixture
async def two_gateways_own_redis(backends: Backends, tmp_path: Path) -> AsyncIterator[_Pair]:
    """Two gateways, each with a database of its own, sharing Kafka and a Redis database no other test uses
    (and a category of their own, so their partition leases in it are the only ones for its topic)."""
    category, definitions = _own_category(tmp_path, "flush")
    redis_url = await _free_redis_db(backends.redis_url)
    first = second = None
    try:
        first = await _start(backends, tmp_path / "a", definitions, redis_url=redis_url)
        second = await _start(backends, tmp_path / "b", definitions, redis_url=redis_url)
        yield _Pair(first, second, redis_url, category)
    finally:
        for gateway in (first, second):
            if gateway is not None:
                gateway.kill()
        client = redis.asyncio.Redis.from_url(redis_url)
        await client.flushdb()
        await client.aclose()
        await asyncio.to_thread(_delete_topics, backends, category)


async def _wrong_version(client: GatewayClient, request: es.AppendEventsRequest) -> dict[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.events.AppendEvents(request, timeout=30)
    details = error_details(raised.value)
    assert (details.code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "WRONG_EXPECTED_VERSION")
    return details.metadata


async def test_redis_flushed_then_append_with_the_right_version(
    two_gateways_own_redis: _Pair, backends: Backends
) -> None:
    """Redis loses every lease and idempotency key between appends through two gateways: versions stay
    contiguous, stale expectations still fail, and a keyed retry appends nothing (its event ids are
    derived from the key, so the log itself shows it is a retry)."""
    pair = two_gateways_own_redis
    category, stream = pair.category, f"flush-{uuid.uuid4().hex[:8]}"
    key = uuid.uuid4().hex
    keyed = es.AppendEventsRequest(  # no event ids, no expectation: only the key can make a retry harmless
        category=category,
        stream_id=stream,
        events=[es.EventData(type="Keyed", data=json.dumps({"n": i}).encode()) for i in range(2)],
        idempotency_key=key,
    )
    store = redis.asyncio.Redis.from_url(pair.redis_url)
    try:
        async with GatewayClient(pair.first.target) as first, GatewayClient(pair.second.target) as second:
            for expected in range(3):
                response = await first.events.AppendEvents(
                    _append(stream, expected_version=expected, category=category), timeout=30
                )
                assert (response.first_version, response.duplicate) == (expected + 1, False)
            original = await first.events.AppendEvents(keyed, timeout=30)
            assert (original.first_version, original.last_version, original.duplicate) == (4, 5, False)
            assert await store.exists(f"kpg:idem:append-events:{key}")

            await store.flushdb()  # leases and idempotency keys gone (this database is the pair's alone)
            assert not await store.exists(f"kpg:idem:append-events:{key}")

            response = await second.events.AppendEvents(
                _append(stream, expected_version=5, category=category), timeout=30
            )
            assert (response.first_version, response.duplicate) == (6, False)
            stale = await _wrong_version(second, _append(stream, expected_version=5, category=category))
            assert stale == {"expected": "5", "actual": "6"}

            retry = await second.events.AppendEvents(keyed, timeout=30)  # same key, same body
            assert (retry.first_version, retry.last_version, retry.first_offset, retry.last_offset) == (
                original.first_version,
                original.last_version,
                original.first_offset,
                original.last_offset,
            )
            assert retry.duplicate

            # The first gateway last saw head 5; it must learn the second gateway's write.
            stale = await _wrong_version(first, _append(stream, expected_version=5, category=category))
            assert stale == {"expected": "5", "actual": "6"}
            response = await first.events.AppendEvents(
                _append(stream, expected_version=6, category=category), timeout=30
            )
            assert (response.first_version, response.duplicate) == (7, False)
            again = await first.events.AppendEvents(keyed, timeout=30)
            assert (again.first_version, again.last_version, again.duplicate) == (4, 5, True)
    finally:
        await store.aclose()

    landed = await asyncio.to_thread(_landed, backends, f"{category}.events", stream)
    assert [v for v, _ in landed] == [1, 2, 3, 4, 5, 6, 7], "a gap, a duplicate or a second copy"
    ids = Counter(event_id for _, event_id in landed)
    assert ids.most_common(1)[0][1] == 1, f"an event twice on Kafka: {ids}"
