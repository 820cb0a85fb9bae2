"""append-event through a running gateway: gRPC via the generated client, REST via HTTP, and a plain
Kafka consumer to check what landed."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import cast

import grpc
import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition
from kpg import GatewayClient, error_details
from kpg.v1 import event_store_pb2 as es

from tests.conftest import Backends
from tests.support import GatewayProcess

pytestmark = pytest.mark.e2e


def _event(event_type: str = "OrderPlaced", **data: object) -> es.EventData:
    return es.EventData(type=event_type, data=json.dumps(data or {"n": 1}).encode())


def _landed(backends: Backends, topic: str, stream_id: str) -> list[tuple[int, str]]:
    """(version, ce_id) of every record of the stream on Kafka, read with a plain read_committed consumer."""
    consumer = Consumer(
        {
            "bootstrap.servers": backends.bootstrap_servers,
            "group.id": f"check-{uuid.uuid4()}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        found = []
        for partition in metadata.partitions:
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            if high == 0:
                continue
            consumer.assign([TopicPartition(topic, partition, 0)])
            last = -1
            while last < high - 1:
                messages = consumer.consume(500, 1.0)
                if not messages:
                    break  # the rest are transaction markers
                for m in messages:
                    last = m.offset() or 0
                    if m.error() is None and m.key() == stream_id.encode():
                        headers = dict(cast("list[tuple[str, bytes]]", m.headers() or []))
                        found.append((int(headers["ce_streamversion"]), headers["ce_id"].decode()))
        return found
    finally:
        consumer.close()


async def test_append_read_and_expected_versions(gateway: GatewayProcess, backends: Backends) -> None:
    stream = f"order-{uuid.uuid4().hex[:8]}"
    async with GatewayClient(gateway.target) as client:
        first = await client.events.AppendEvents(
            es.AppendEventsRequest(
                category="orders",
                stream_id=stream,
                events=[_event(), _event("ItemAdded")],
                expected_state=es.EXPECTED_STATE_NO_STREAM,
            )
        )
        assert (first.first_version, first.last_version, first.topic) == (1, 2, "orders.events")
        assert first.last_offset > first.first_offset and first.position and not first.duplicate

        second = await client.events.AppendEvents(
            es.AppendEventsRequest(
                category="orders", stream_id=stream, events=[_event("OrderShipped")], expected_version=2
            )
        )
        assert (second.first_version, second.last_version) == (3, 3)

        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await client.events.AppendEvents(
                es.AppendEventsRequest(
                    category="orders", stream_id=stream, events=[_event()], expected_version=1
                )
            )
        details = error_details(wrong.value)
        assert (details.code, details.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "WRONG_EXPECTED_VERSION",
        )
        assert details.metadata == {"expected": "1", "actual": "3"}
        for state in (es.EXPECTED_STATE_NO_STREAM,):
            with pytest.raises(grpc.aio.AioRpcError) as exists:
                await client.events.AppendEvents(
                    es.AppendEventsRequest(
                        category="orders", stream_id=stream, events=[_event()], expected_state=state
                    )
                )
            assert error_details(exists.value).reason == "WRONG_EXPECTED_VERSION"
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await client.events.AppendEvents(
                es.AppendEventsRequest(
                    category="orders",
                    stream_id=stream + "-new",
                    events=[_event()],
                    expected_state=es.EXPECTED_STATE_STREAM_EXISTS,
                )
            )
        assert error_details(missing.value).metadata["actual"] == "0"

        read = await _read_until(client, stream, 3)
        assert [e.version for e in read.events] == [1, 2, 3] and read.stream_version == 3
        assert [e.type for e in read.events] == ["OrderPlaced", "ItemAdded", "OrderShipped"]
        backwards = await client.events.ReadStream(
            es.ReadStreamRequest(category="orders", stream_id=stream, backwards=True, max_count=2)
        )
        assert [e.version for e in backwards.events] == [3, 2]
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await client.events.ReadStream(
                es.ReadStreamRequest(category="orders", stream_id="nope-" + stream)
            )
        assert error_details(unknown.value).reason == "NOT_FOUND"

    assert [v for v, _ in _landed(backends, "orders.events", stream)] == [1, 2, 3]


async def _read_until(client: GatewayClient, stream: str, head: int) -> es.ReadStreamResponse:
    async with asyncio.timeout(30):
        while True:
            try:
                read = await client.events.ReadStream(
                    es.ReadStreamRequest(category="orders", stream_id=stream)
                )
                if read.stream_version >= head:
                    return read
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            await asyncio.sleep(0.05)


async def test_idempotency_key_retry_reuse_and_event_ids(gateway: GatewayProcess, backends: Backends) -> None:
    stream = f"order-{uuid.uuid4().hex[:8]}"
    key = uuid.uuid4().hex
    request = es.AppendEventsRequest(
        category="orders", stream_id=stream, events=[_event()], idempotency_key=key
    )
    async with GatewayClient(gateway.target) as client:
        first = await client.events.AppendEvents(request)
        retry = await client.events.AppendEvents(request)
        assert retry.duplicate and (retry.first_version, retry.last_offset) == (
            first.first_version,
            first.last_offset,
        )
        with pytest.raises(grpc.aio.AioRpcError) as reused:
            await client.events.AppendEvents(
                es.AppendEventsRequest(
                    category="orders", stream_id=stream, events=[_event(n=2)], idempotency_key=key
                )
            )
        assert error_details(reused.value).reason == "IDEMPOTENCY_KEY_REUSED"
        assert reused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        event_id = str(uuid.uuid4())
        with_id = es.AppendEventsRequest(
            category="orders",
            stream_id=stream,
            events=[es.EventData(event_id=event_id, type="T", data=b"{}")],
        )
        once = await client.events.AppendEvents(with_id)
        again = await client.events.AppendEvents(with_id)
        assert again.duplicate and again.first_version == once.first_version == 2
    assert [v for v, _ in _landed(backends, "orders.events", stream)] == [1, 2]


async def test_concurrent_appends_with_the_same_expected_version(gateway: GatewayProcess) -> None:
    stream = f"order-{uuid.uuid4().hex[:8]}"
    async with GatewayClient(gateway.target) as client:
        await client.events.AppendEvents(
            es.AppendEventsRequest(category="orders", stream_id=stream, events=[_event()])
        )
        outcomes = await asyncio.gather(
            *(
                client.events.AppendEvents(
                    es.AppendEventsRequest(
                        category="orders", stream_id=stream, events=[_event()], expected_version=1
                    )
                )
                for _ in range(10)
            ),
            return_exceptions=True,
        )
    wins = [o for o in outcomes if isinstance(o, es.AppendEventsResponse)]
    losses = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(wins) == 1 and wins[0].first_version == 2
    assert len(losses) == 9
    assert {error_details(e).metadata["actual"] for e in losses} == {"2"}


async def test_bad_input_over_grpc_and_rest(gateway: GatewayProcess) -> None:
    cases = [
        (es.AppendEventsRequest(category="nope", stream_id="s", events=[_event()]), "NOT_FOUND"),
        (
            es.AppendEventsRequest(category="orders", stream_id="bad id!", events=[_event()]),
            "INVALID_ARGUMENT",
        ),
        (es.AppendEventsRequest(category="orders", stream_id="s", events=[]), "INVALID_ARGUMENT"),
        (
            es.AppendEventsRequest(
                category="orders", stream_id="s", events=[es.EventData(type="T", data=b"{not json")]
            ),
            "INVALID_ARGUMENT",
        ),
        (
            es.AppendEventsRequest(
                category="orders",
                stream_id="s",
                events=[
                    es.EventData(
                        type="T", data=b"x" * (1024 * 1024 + 1), content_type="application/octet-stream"
                    )
                ],
            ),
            "PAYLOAD_TOO_LARGE",
        ),
    ]
    async with GatewayClient(gateway.target) as client:
        for request, reason in cases:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await client.events.AppendEvents(request)
            assert error_details(raised.value).reason == reason, request.stream_id
    async with httpx.AsyncClient(base_url=gateway.rest_url) as http:
        missing = await http.post("/v1/streams/nope/s/events", json={"events": [{"type": "T", "data": {}}]})
        bad_json = await http.post(
            "/v1/streams/orders/s/events", content=b"{", headers={"content-type": "application/json"}
        )
        too_large = await http.post(
            "/v1/streams/orders/s/events",
            json={
                "events": [{"type": "T", "data": "eA==", "contentType": "application/octet-stream"}] * 1001
            },
        )
    assert (missing.status_code, missing.json()["error"]["reason"]) == (404, "NOT_FOUND")
    assert (bad_json.status_code, bad_json.json()["error"]["reason"]) == (400, "INVALID_ARGUMENT")
    assert (too_large.status_code, too_large.json()["error"]["reason"]) == (413, "PAYLOAD_TOO_LARGE")


async def test_rest_append_read_and_conflict(gateway: GatewayProcess) -> None:
    stream = f"order-{uuid.uuid4().hex[:8]}"
    url = f"/v1/streams/orders/{stream}/events"
    async with httpx.AsyncClient(base_url=gateway.rest_url) as http:
        created = await http.post(
            url,
            json={"events": [{"type": "OrderPlaced", "data": {"total": 12.5}}], "expectedState": "NO_STREAM"},
            headers={"Idempotency-Key": stream},
        )
        assert created.status_code == 200, created.text
        body = created.json()
        assert (body["firstVersion"], body["duplicate"]) == ("1", False)
        retried = await http.post(
            url,
            json={"events": [{"type": "OrderPlaced", "data": {"total": 12.5}}], "expectedState": "NO_STREAM"},
            headers={"Idempotency-Key": stream},
        )
        assert retried.json()["duplicate"] is True
        conflict = await http.post(url, json={"events": [{"type": "X", "data": {}}], "expectedVersion": "5"})
        assert conflict.status_code == 409
        assert conflict.json()["error"]["metadata"] == {"expected": "5", "actual": "1"}
        read = await http.get(url, params={"minPosition": body["position"]})
        assert read.status_code == 200, read.text
        assert read.json()["events"][0]["data"] == {"total": 12.5}
        assert read.json()["streamVersion"] == "1"


async def test_subscribe_from_the_middle_sees_every_event_once_in_order(gateway: GatewayProcess) -> None:
    stream = f"order-{uuid.uuid4().hex[:8]}"
    async with GatewayClient(gateway.target) as client:
        for i in range(5):
            await client.events.AppendEvents(
                es.AppendEventsRequest(category="orders", stream_id=stream, events=[_event(n=i)])
            )
        received: list[int] = []
        positions: list[str] = []

        async def subscriber() -> None:
            async for envelope in client.events.Subscribe(
                es.SubscribeRequest(category="orders", stream_id=stream, from_version=3)
            ):
                received.append(envelope.version)
                positions.append(envelope.position)
                if envelope.version == 15:
                    return

        task = asyncio.create_task(subscriber())
        for i in range(5, 15):  # appends continue while it catches up and goes live
            await client.events.AppendEvents(
                es.AppendEventsRequest(category="orders", stream_id=stream, events=[_event(n=i)])
            )
        await asyncio.wait_for(task, 60)
        assert received == list(range(3, 16))

        # Resuming from a position continues exactly after it.
        resumed = []
        async for envelope in client.events.Subscribe(
            es.SubscribeRequest(category="orders", stream_id=stream, from_position=positions[4])
        ):
            resumed.append(envelope.version)
            if envelope.version == 15:
                break
        assert resumed == list(range(8, 16))
