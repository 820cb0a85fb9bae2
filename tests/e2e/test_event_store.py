"""append-event through a running gateway: gRPC via the generated client, REST via HTTP, and a plain
Kafka consumer to check what landed."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import grpc
import httpx
import pytest
from confluent_kafka import TopicPartition
from kpg import GatewayClient, error_details
from kpg.v1 import event_store_pb2 as es
from redis.asyncio import Redis

from gateway.domain.events import Position, partition_for
from tests.conftest import Backends
from tests.support import GatewayProcess, checking_consumer, eventually

pytestmark = pytest.mark.e2e


def _event(event_type: str = "OrderPlaced", **data: object) -> es.EventData:
    return es.EventData(type=event_type, data=json.dumps(data or {"n": 1}).encode())


def _landed(backends: Backends, topic: str, stream_id: str) -> list[tuple[int, str]]:
    """(version, ce_id) of every record of the stream on Kafka, read with a plain read_committed consumer."""
    consumer = checking_consumer(backends.bootstrap_servers)
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

        # Read your own write: the index is waited for up to the position the append returned.
        read = await client.events.ReadStream(
            es.ReadStreamRequest(category="orders", stream_id=stream, min_position=second.position)
        )
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


@dataclass(frozen=True)
class _Row:
    """One error of the contract's table, provoked over gRPC and over REST."""

    name: str
    grpc_call: Callable[[GatewayClient], Awaitable[object]]
    rest_call: Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]
    reason: str
    code: grpc.StatusCode
    http: int


def _far_position(partition: int = 0) -> str:
    return Position("orders.events", {partition: 10**12}).encode()


_TOO_BIG = b"x" * (1024 * 1024 + 1)
_ERROR_ROWS = [
    _Row(
        "undeclared category",
        lambda c: c.events.AppendEvents(
            es.AppendEventsRequest(category="nope", stream_id="s", events=[_event()])
        ),
        lambda h: h.post("/v1/streams/nope/s/events", json={"events": [{"type": "T", "data": {}}]}),
        "NOT_FOUND",
        grpc.StatusCode.NOT_FOUND,
        404,
    ),
    _Row(
        "unknown stream",
        lambda c: c.events.ReadStream(es.ReadStreamRequest(category="orders", stream_id="no-such-stream")),
        lambda h: h.get("/v1/streams/orders/no-such-stream/events"),
        "NOT_FOUND",
        grpc.StatusCode.NOT_FOUND,
        404,
    ),
    _Row(
        "bad stream name",
        lambda c: c.events.AppendEvents(
            es.AppendEventsRequest(category="orders", stream_id="bad id!", events=[_event()])
        ),
        lambda h: h.post("/v1/streams/orders/bad id!/events", json={"events": [{"type": "T", "data": {}}]}),
        "INVALID_ARGUMENT",
        grpc.StatusCode.INVALID_ARGUMENT,
        400,
    ),
    _Row(
        "no events",
        lambda c: c.events.AppendEvents(es.AppendEventsRequest(category="orders", stream_id="s", events=[])),
        lambda h: h.post("/v1/streams/orders/s/events", json={"events": []}),
        "INVALID_ARGUMENT",
        grpc.StatusCode.INVALID_ARGUMENT,
        400,
    ),
    _Row(
        "bad JSON data",
        lambda c: c.events.AppendEvents(
            es.AppendEventsRequest(
                category="orders", stream_id="s", events=[es.EventData(type="T", data=b"{not json")]
            )
        ),
        lambda h: h.post(
            "/v1/streams/orders/s/events", content=b"{", headers={"content-type": "application/json"}
        ),
        "INVALID_ARGUMENT",
        grpc.StatusCode.INVALID_ARGUMENT,
        400,
    ),
    _Row(
        "bad min_position",
        lambda c: c.events.ReadStream(
            es.ReadStreamRequest(category="orders", stream_id="s", min_position="not-a-position")
        ),
        lambda h: h.get("/v1/streams/orders/s/events", params={"minPosition": "not-a-position"}),
        "INVALID_ARGUMENT",
        grpc.StatusCode.INVALID_ARGUMENT,
        400,
    ),
    _Row(
        "an event over 1 MiB",
        lambda c: c.events.AppendEvents(
            es.AppendEventsRequest(
                category="orders",
                stream_id="s",
                events=[es.EventData(type="T", data=_TOO_BIG, content_type="application/octet-stream")],
            )
        ),
        lambda h: h.post(
            "/v1/streams/orders/s/events",
            json={
                "events": [
                    {
                        "type": "T",
                        "data": base64.b64encode(_TOO_BIG).decode(),
                        "contentType": "application/octet-stream",
                    }
                ]
            },
        ),
        "PAYLOAD_TOO_LARGE",
        grpc.StatusCode.INVALID_ARGUMENT,
        413,
    ),
    _Row(
        "over 1,000 events",
        lambda c: c.events.AppendEvents(
            es.AppendEventsRequest(category="orders", stream_id="s", events=[_event()] * 1001)
        ),
        lambda h: h.post(
            "/v1/streams/orders/s/events",
            json={
                "events": [{"type": "T", "data": "eA==", "contentType": "application/octet-stream"}] * 1001
            },
        ),
        "PAYLOAD_TOO_LARGE",
        grpc.StatusCode.INVALID_ARGUMENT,
        413,
    ),
    _Row(
        "index never reaches min_position",
        lambda c: c.events.ReadStream(
            es.ReadStreamRequest(
                category="orders", stream_id="s", min_position=_far_position(), wait_timeout_ms=200
            )
        ),
        lambda h: h.get(
            "/v1/streams/orders/s/events", params={"minPosition": _far_position(), "waitTimeoutMs": 200}
        ),
        "READ_MODEL_BEHIND",
        grpc.StatusCode.DEADLINE_EXCEEDED,
        504,
    ),
]


@pytest.mark.parametrize("row", _ERROR_ROWS, ids=lambda row: row.name)
async def test_error_rows_over_grpc_and_rest(gateway: GatewayProcess, row: _Row) -> None:
    async with GatewayClient(gateway.target) as client:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await row.grpc_call(client)
    details = error_details(raised.value)
    assert (details.code, details.reason) == (row.code, row.reason), details.message
    async with httpx.AsyncClient(base_url=gateway.rest_url) as http:
        response = await row.rest_call(http)
    assert response.status_code == row.http, response.text
    error = response.json()["error"]
    assert (error["reason"], error["status"], error["code"]) == (row.reason, row.code.name, row.http)


async def test_idempotency_key_reused_over_rest(gateway: GatewayProcess) -> None:
    url = f"/v1/streams/orders/order-{uuid.uuid4().hex[:8]}/events"
    key = {"Idempotency-Key": uuid.uuid4().hex}
    async with httpx.AsyncClient(base_url=gateway.rest_url) as http:
        first = await http.post(url, json={"events": [{"type": "A", "data": {"n": 1}}]}, headers=key)
        reused = await http.post(url, json={"events": [{"type": "A", "data": {"n": 2}}]}, headers=key)
    assert first.status_code == 200, first.text
    assert reused.status_code == 422
    assert reused.json()["error"]["reason"] == "IDEMPOTENCY_KEY_REUSED"


async def test_idempotency_key_in_flight_over_grpc_and_rest(
    gateway: GatewayProcess, backends: Backends
) -> None:
    """While the first request under a key still runs, a retry is told so; afterwards it gets the answer."""
    stream = f"order-{uuid.uuid4().hex[:8]}"
    key = uuid.uuid4().hex
    lease = f"kpg:lease:es:orders.events:{partition_for(stream, 6)}"
    redis = Redis.from_url(backends.redis_url)
    request = es.AppendEventsRequest(
        category="orders", stream_id=stream, events=[_event()], idempotency_key=key
    )
    try:
        # Hold the stream's partition as another gateway would, so the first append waits for its writer.
        # (this gateway's own writer lets the partition go when idle)
        await eventually(lambda: redis.set(lease, "another-gateway", nx=True, px=20_000))
        async with GatewayClient(gateway.target) as client:
            first = asyncio.ensure_future(client.events.AppendEvents(request))
            await eventually(lambda: redis.exists(f"kpg:idem:append-events:{key}"))
            with pytest.raises(grpc.aio.AioRpcError) as in_flight:
                await client.events.AppendEvents(request)
            async with httpx.AsyncClient(base_url=gateway.rest_url) as http:
                rest = await http.post(
                    f"/v1/streams/orders/{stream}/events",
                    json={"events": [{"type": "OrderPlaced", "data": {"n": 1}}]},
                    headers={"Idempotency-Key": key},
                )
            assert not first.done()
            await redis.delete(lease)
            answer = await asyncio.wait_for(first, 30)
            retry = await client.events.AppendEvents(request)
    finally:
        await redis.delete(lease)
        await redis.aclose()
    details = error_details(in_flight.value)
    assert (details.code, details.reason) == (grpc.StatusCode.ABORTED, "IDEMPOTENCY_KEY_IN_FLIGHT")
    assert rest.status_code == 409 and rest.json()["error"]["reason"] == "IDEMPOTENCY_KEY_IN_FLIGHT"
    assert (answer.first_version, answer.duplicate) == (1, False)
    assert retry.duplicate and retry.first_offset == answer.first_offset
    assert [v for v, _ in _landed(backends, "orders.events", stream)] == [1]


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


async def _sse_events(
    http: httpx.AsyncClient,
    params: dict[str, str],
    *,
    until_version: int,
    headers: dict[str, str] | None = None,
) -> list[tuple[str, dict[str, object]]]:
    """(SSE id, event body) of each `event` frame of a subscription, up to a version."""
    frames: list[tuple[str, dict[str, object]]] = []
    async with http.stream("GET", "/v1/streams/orders/subscribe", params=params, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        async for line in response.aiter_lines():
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            assert fields.get("event") == "event", fields
            body = json.loads(fields["data"])
            frames.append((fields["id"], body))
            fields = {}
            if int(body["version"]) == until_version:
                return frames
    raise AssertionError(f"the stream ended after {len(frames)} events")


async def test_rest_subscribe_with_server_sent_events(gateway: GatewayProcess) -> None:
    stream = f"order-{uuid.uuid4().hex[:8]}"
    url = f"/v1/streams/orders/{stream}/events"
    async with httpx.AsyncClient(base_url=gateway.rest_url, timeout=60) as http:
        for i in range(3):
            await http.post(url, json={"events": [{"type": "OrderPlaced", "data": {"n": i}}]})
        subscriber = asyncio.create_task(
            _sse_events(http, {"streamId": stream, "fromVersion": "2"}, until_version=8)
        )
        for i in range(3, 8):  # live while it catches up
            assert (
                await http.post(url, json={"events": [{"type": "ItemAdded", "data": {"n": i}}]})
            ).is_success
        frames = await asyncio.wait_for(subscriber, 60)
        assert [int(str(body["version"])) for _, body in frames] == list(range(2, 9))
        assert [body["data"] for _, body in frames] == [{"n": i} for i in range(1, 8)]
        assert all(frame_id == body["position"] for frame_id, body in frames)

        # A reconnecting EventSource sends the last id it saw: the stream continues exactly after it.
        resumed = await _sse_events(
            http, {"streamId": stream}, until_version=8, headers={"Last-Event-ID": frames[3][0]}
        )
        assert [int(str(body["version"])) for _, body in resumed] == [6, 7, 8]

        bad = await http.get("/v1/streams/orders/subscribe", params={"fromPosition": "garbage"})
        assert (bad.status_code, bad.json()["error"]["reason"]) == (400, "INVALID_ARGUMENT")
