"""append-event with several gateways, crashes and a Redis that forgets: versions stay contiguous."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio
from kpg import GatewayClient, error_details
from kpg.v1 import event_store_pb2 as es

from tests.conftest import Backends
from tests.e2e.test_event_store import _landed
from tests.support import SERVING, GatewayProcess, wait_for_health

pytestmark = pytest.mark.e2e


async def _start(backends: Backends, workdir: Path, repo_root: Path) -> GatewayProcess:
    process = GatewayProcess(
        workdir,
        env={
            "KPG_KAFKA__BOOTSTRAP_SERVERS": backends.bootstrap_servers,
            "KPG_REDIS__URL": backends.redis_url,
            "KPG_EVENTS__LEASE_TTL_MS": "2000",
        },
        args=["--definitions", str(repo_root / "examples" / "definitions.yaml")],
    ).start()
    await wait_for_health(process.target, SERVING, process=process)
    return process


@pytest.fixture
async def two_gateways(
    backends: Backends, tmp_path: Path, repo_root: Path
) -> AsyncIterator[tuple[GatewayProcess, GatewayProcess]]:
    # Each with a database of its own (its own stream index), sharing Kafka and Redis.
    first = await _start(backends, tmp_path / "a", repo_root)
    second = await _start(backends, tmp_path / "b", repo_root)
    try:
        yield first, second
    finally:
        first.kill()
        second.kill()


def _append(stream: str, expected_version: int | None = None) -> es.AppendEventsRequest:
    request = es.AppendEventsRequest(
        category="orders",
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


async def test_sigkill_mid_appends_then_append_again(
    backends: Backends, tmp_path: Path, repo_root: Path
) -> None:
    stream = f"crash-{uuid.uuid4().hex[:8]}"
    victim = await _start(backends, tmp_path / "victim", repo_root)
    survivor = await _start(backends, tmp_path / "survivor", repo_root)
    try:
        async with GatewayClient(victim.target) as client:
            await client.events.AppendEvents(_append(stream))
            inflight = [asyncio.ensure_future(client.events.AppendEvents(_append(stream))) for _ in range(50)]
            await asyncio.sleep(0.05)
            victim.kill()  # SIGKILL, in the middle of the appends
            await asyncio.gather(*inflight, return_exceptions=True)
        before = [v for v, _ in _landed(backends, "orders.events", stream)]
        async with GatewayClient(survivor.target) as client:
            response = await client.events.AppendEvents(_append(stream, expected_version=len(before)))
        assert response.first_version == len(before) + 1
        after = [v for v, _ in _landed(backends, "orders.events", stream)]
        assert after == list(range(1, len(before) + 2))
    finally:
        victim.kill()
        survivor.kill()


async def test_redis_flushed_then_append_with_the_right_version(
    gateway: GatewayProcess, backends: Backends
) -> None:
    stream = f"flush-{uuid.uuid4().hex[:8]}"
    async with GatewayClient(gateway.target) as client:
        for _ in range(3):
            await client.events.AppendEvents(_append(stream))
        flusher = redis.asyncio.Redis.from_url(backends.redis_url)
        await flusher.flushall()
        await flusher.aclose()
        response = await client.events.AppendEvents(_append(stream, expected_version=3))
        assert (response.first_version, response.duplicate) == (4, False)
    assert [v for v, _ in _landed(backends, "orders.events", stream)] == [1, 2, 3, 4]
