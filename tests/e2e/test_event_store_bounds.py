"""Bounds a running gateway keeps, and readiness that follows the database: over a bound a caller gets the
contract's error at once (never a hang, never unbounded memory)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from kpg import GatewayClient, error_details
from kpg.v1 import event_store_pb2 as es

from gateway.devstack.postgres import PostgresNode, find_postgres_bin
from tests.conftest import Backends, started_postgres
from tests.e2e.conftest import example_gateway
from tests.support import (
    NOT_SERVING,
    SERVING,
    GatewayProcess,
    eventually,
    ready_everywhere_is,
    wait_for_health,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def bounded_gateway(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[GatewayProcess]:
    env = {
        "KPG_KAFKA__BOOTSTRAP_SERVERS": backends.bootstrap_servers,
        "KPG_REDIS__URL": backends.redis_url,
        "KPG_EVENTS__MAX_SUBSCRIBERS": "2",
        "KPG_EVENTS__MAX_QUEUED_EVENTS": "50",
        "KPG_EVENTS__READ_MAX_WAIT_MS": "2000",
    }
    async with example_gateway(tmp_path_factory.mktemp("bounded"), env) as process:
        yield process


def _events(count: int) -> list[es.EventData]:
    return [es.EventData(type="OrderPlaced", data=b"{}") for _ in range(count)]


async def test_subscriptions_beyond_the_bound_are_rate_limited(bounded_gateway: GatewayProcess) -> None:
    async with GatewayClient(bounded_gateway.target) as kpg:
        open_calls = [kpg.events.Subscribe(es.SubscribeRequest(category="orders")) for _ in range(2)]
        try:
            await asyncio.sleep(1)  # both are being served
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in kpg.events.Subscribe(es.SubscribeRequest(category="orders")):
                    break
            details = error_details(refused.value)
            assert (details.code, details.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
            assert int(details.metadata["retry_after_ms"]) > 0
        finally:
            for call in open_calls:
                call.cancel()
        # The slots come back once those subscribers are gone.
        async with httpx.AsyncClient(base_url=bounded_gateway.rest_url) as http:

            async def no_subscribers() -> bool:
                return "kpg_event_subscribers 0.0" in (await http.get("/metrics")).text

            await eventually(no_subscribers, timeout_s=10)
        again = kpg.events.Subscribe(es.SubscribeRequest(category="orders"))
        await asyncio.sleep(1)
        assert not again.done(), "refused, though the earlier subscribers are gone"  # a refusal ends at once
        again.cancel()


async def test_appends_beyond_the_writer_queue_are_rate_limited(bounded_gateway: GatewayProcess) -> None:
    """50 events may wait for one partition's writer; a burst beyond that is refused at once, the rest
    is written."""
    stream = f"queue-{uuid.uuid4().hex[:8]}"
    async with GatewayClient(bounded_gateway.target) as kpg:
        calls = [
            kpg.events.AppendEvents(
                es.AppendEventsRequest(category="orders", stream_id=stream, events=_events(20))
            )
            for _ in range(10)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        written = [r for r in results if isinstance(r, es.AppendEventsResponse)]
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert written and refused, results
        assert {error_details(r).reason for r in refused} == {"RATE_LIMITED"}
        read = await kpg.events.ReadStream(
            es.ReadStreamRequest(category="orders", stream_id=stream, max_count=1000)
        )
        assert read.stream_version == 20 * len(written)


async def test_read_stream_waits_are_bounded(bounded_gateway: GatewayProcess) -> None:
    async with httpx.AsyncClient(base_url=bounded_gateway.rest_url) as http:
        stream = f"wait-{uuid.uuid4().hex[:8]}"
        await http.post(
            f"/v1/streams/orders/{stream}/events", json={"events": [{"type": "OrderPlaced", "data": {}}]}
        )
        too_long = await http.get(f"/v1/streams/orders/{stream}/events", params={"waitTimeoutMs": "2001"})
        assert too_long.status_code == 400
        assert json.loads(too_long.text)["error"]["reason"] == "INVALID_ARGUMENT"
        fine = await http.get(f"/v1/streams/orders/{stream}/events", params={"waitTimeoutMs": "2000"})
        assert fine.status_code == 200


@pytest.fixture
def own_postgres() -> Iterator[PostgresNode]:
    with started_postgres() as node:
        yield node


async def test_readiness_follows_the_database(
    backends: Backends, tmp_path: Path, own_postgres: PostgresNode
) -> None:
    env = {
        "KPG_KAFKA__BOOTSTRAP_SERVERS": backends.bootstrap_servers,
        "KPG_REDIS__URL": backends.redis_url,
        "KPG_DATABASE__URL": own_postgres.url,
    }
    async with example_gateway(tmp_path, env) as process:
        # The database is new and the `orders` topic is not (the session's earlier tests wrote to it): first
        # the index catches up, so that what follows measures the outage, not that backlog.
        await _append_and_read_back(process, wait_ms=5000, within_s=120)
        own_postgres.stop()
        await wait_for_health(process.target, NOT_SERVING, process=process, timeout_s=30)
        await eventually(lambda: ready_everywhere_is(process.rest_url, 503), timeout_s=15)
        async with httpx.AsyncClient(base_url=process.rest_url) as http:
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["backends"]["database"] is False
        own_postgres.start(find_postgres_bin())
        await wait_for_health(process.target, SERVING, process=process, timeout_s=60)
        # And the stream index carries on where it stopped (its consumer never died).
        await _append_and_read_back(process, wait_ms=5000, within_s=0)


async def _append_and_read_back(process: GatewayProcess, *, wait_ms: int, within_s: float) -> None:
    """Append an event to a new stream and read it back, the read waiting up to `wait_ms` for the stream
    index; retried on DEADLINE_EXCEEDED (the index still behind) for up to `within_s`."""
    async with GatewayClient(process.target) as kpg:
        stream = f"back-{uuid.uuid4().hex[:8]}"
        await kpg.events.AppendEvents(
            es.AppendEventsRequest(category="orders", stream_id=stream, events=_events(1))
        )
        read = es.ReadStreamRequest(category="orders", stream_id=stream, wait_timeout_ms=wait_ms)
        async with asyncio.timeout(within_s + wait_ms / 1000 * 2):
            while True:
                try:
                    answer = await kpg.events.ReadStream(read)
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED or within_s == 0:
                        raise
        assert answer.stream_version == 1
