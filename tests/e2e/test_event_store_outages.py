"""append-event when things go wrong outside the gateway: a subscriber that stops reading, Kafka or Redis
down. These tests stop servers, so they run on a dev stack of their own."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import httpx
import pytest
from kpg import GatewayClient, error_details
from kpg.v1 import event_store_pb2 as es
from kpg.v1 import request_reply_pb2 as rr

from gateway.devstack import DevStack
from gateway.devstack.processes import Managed
from tests.e2e.conftest import example_gateway
from tests.support import NOT_SERVING, SERVING, GatewayProcess, wait_for_health

pytestmark = pytest.mark.e2e

WRITE_TIMEOUT_MS = 1000
BIG = b"x" * 100_000  # an event of ~100 kB: a few dozen fill every buffer between gateway and client


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    stack = DevStack(tmp_path_factory.mktemp("outage-stack"))
    try:
        stack.up(kafka_port=0, controller_port=0, redis_port=0)
        yield stack
    finally:
        stack.down()


@pytest.fixture(scope="module")
async def gateway(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GatewayProcess]:
    info = stack.info()
    assert info is not None
    env = {
        **info.env(),
        "KPG_EVENTS__SUBSCRIBER_WRITE_TIMEOUT_MS": str(WRITE_TIMEOUT_MS),
        "KPG_EVENTS__APPEND_TIMEOUT_MS": "4000",
        "KPG_KAFKA__DELIVERY_TIMEOUT_MS": "3000",
        "KPG_KAFKA__REQUEST_TIMEOUT_MS": "2000",
    }
    async with example_gateway(tmp_path_factory.mktemp("outage-gateway"), env) as process:
        yield process


async def _append_big(client: GatewayClient, stream: str, batches: int) -> None:
    for _ in range(batches):
        await client.events.AppendEvents(
            es.AppendEventsRequest(
                category="orders",
                stream_id=stream,
                events=[es.EventData(type="Blob", data=BIG, content_type="application/octet-stream")] * 30,
            )
        )


async def test_a_grpc_subscriber_that_stops_reading_is_disconnected(gateway: GatewayProcess) -> None:
    stream = f"slow-{uuid.uuid4().hex[:8]}"
    # Without BDP probing the client keeps HTTP/2's default 64 kB window, as a slow consumer's would stay.
    channel = grpc.aio.insecure_channel(gateway.target, options=[("grpc.http2.bdp_probe", 0)])
    async with GatewayClient(gateway.target, channel=channel) as client:
        await _append_big(client, stream, 1)
        call = client.events.Subscribe(es.SubscribeRequest(category="orders", stream_id=stream))
        first = await call.read()
        assert isinstance(first, es.EventEnvelope) and first.version == 1
        await _append_big(client, stream, 10)  # 300 events, 30 MB: far more than the buffers hold
        await asyncio.sleep(
            4 * WRITE_TIMEOUT_MS / 1000
        )  # the client stalls for longer than the write timeout
        received = 1
        with pytest.raises(grpc.aio.AioRpcError) as dropped:
            async with asyncio.timeout(60):
                while True:
                    message = await call.read()
                    assert message is not grpc.aio.EOF, "the stream ended without an error"
                    received += 1
    details = error_details(dropped.value)
    assert (details.code, details.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SUBSCRIBER_TOO_SLOW")
    assert details.metadata["position"]  # where to resume
    assert received < 300  # the gateway stopped rather than buffer the whole stream for it


def _stalled_sse(rest_port: int, stream: str) -> socket.socket:
    """An SSE request on a socket with a tiny receive buffer, whose reader then stops reading."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", rest_port))
    sock.sendall(
        f"GET /v1/streams/orders/subscribe?streamId={stream} HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    return sock


def _drain(sock: socket.socket, timeout_s: float) -> bytes:
    """Everything until the server closes the connection; fails if it keeps it open past `timeout_s`."""
    sock.settimeout(timeout_s)
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


async def test_an_sse_subscriber_that_stops_reading_is_disconnected(gateway: GatewayProcess) -> None:
    stream = f"slow-{uuid.uuid4().hex[:8]}"
    async with GatewayClient(gateway.target) as client:
        await _append_big(client, stream, 1)
        sock = _stalled_sse(gateway.rest_port, stream)
        try:
            await _append_big(client, stream, 10)
            await asyncio.sleep(4 * WRITE_TIMEOUT_MS / 1000)
            received = await asyncio.to_thread(_drain, sock, 30)  # TimeoutError if never closed
        finally:
            sock.close()
    assert received.startswith(b"HTTP/1.1 200")
    assert 0 < received.count(b"\nevent: event\n") < 330
    # A client reconnects with the last complete event's id and continues right after that event.
    last_id, last_version = _last_complete_event(received)
    async with (
        httpx.AsyncClient(base_url=gateway.rest_url, timeout=30) as http,
        http.stream(
            "GET",
            "/v1/streams/orders/subscribe",
            params={"streamId": stream},
            headers={"Last-Event-ID": last_id},
        ) as resumed,
    ):
        async for line in resumed.aiter_lines():
            if line.startswith("data: "):
                assert int(json.loads(line[6:])["version"]) == last_version + 1
                break


def _last_complete_event(received: bytes) -> tuple[str, int]:
    """(id, version) of the last SSE event frame that arrived whole."""
    last: tuple[str, int] | None = None
    for frame in received.split(b"\n\n")[:-1]:  # the last piece may be cut off
        fields = dict(line.partition(b": ")[::2] for line in frame.split(b"\n") if b": " in line)
        if fields.get(b"event") == b"event":
            last = (fields[b"id"].decode(), int(json.loads(fields[b"data"])["version"]))
    assert last is not None
    return last


async def _append_reason(client: GatewayClient, http: httpx.AsyncClient, stream: str) -> tuple[str, int, str]:
    """Append with an idempotency key over gRPC and over REST: (gRPC reason, HTTP status, REST reason)."""
    key = uuid.uuid4().hex
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.events.AppendEvents(
            es.AppendEventsRequest(
                category="orders",
                stream_id=stream,
                events=[es.EventData(type="T", data=b"{}")],
                idempotency_key=key,
            ),
            timeout=30,
        )
    details = error_details(raised.value)
    assert details.code == grpc.StatusCode.UNAVAILABLE, details.message
    response = await http.post(
        f"/v1/streams/orders/{stream}/events",
        json={"events": [{"type": "T", "data": {}}]},
        headers={"Idempotency-Key": key + "-rest"},
    )
    return details.reason, response.status_code, response.json()["error"]["reason"]


@pytest.mark.parametrize("server", ["redis", "kafka"])
async def test_backend_down_is_backend_unavailable_and_nothing_is_written(
    gateway: GatewayProcess, stack: DevStack, server: str
) -> None:
    stream = f"outage-{uuid.uuid4().hex[:8]}"
    async with (
        GatewayClient(gateway.target) as client,
        httpx.AsyncClient(base_url=gateway.rest_url, timeout=60) as http,
    ):
        first = await client.events.AppendEvents(
            es.AppendEventsRequest(
                category="orders", stream_id=stream, events=[es.EventData(type="T", data=b"{}")]
            )
        )
        assert first.first_version == 1
        assert Managed(server, stack.state_dir).stop()
        try:
            await wait_for_health(gateway.target, NOT_SERVING)
            assert await _append_reason(client, http, stream) == (
                "BACKEND_UNAVAILABLE",
                503,
                "BACKEND_UNAVAILABLE",
            )
        finally:
            stack.up()  # same ports, same data
        await wait_for_health(gateway.target, SERVING, timeout_s=90)
        # Nothing the failed appends tried was written: the stream is still at version 1.
        async with asyncio.timeout(60):
            while True:
                try:
                    after = await client.events.AppendEvents(
                        es.AppendEventsRequest(
                            category="orders",
                            stream_id=stream,
                            events=[es.EventData(type="T", data=b"{}")],
                            expected_version=1,
                        )
                    )
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    await asyncio.sleep(0.5)  # the writer reconnects to the restarted server
    assert after.first_version == 2


async def test_request_reply_with_redis_down_is_backend_unavailable(
    gateway: GatewayProcess, stack: DevStack
) -> None:
    """The correlation state lives in Redis: without it a request is refused, not sent unanswerable."""
    assert Managed("redis", stack.state_dir).stop()
    try:
        async with GatewayClient(gateway.target) as client:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await client.requests.Request(
                    rr.RequestMessage(topic="inventory.requests", payload=b"{}", timeout_ms=2000), timeout=30
                )
        details = error_details(raised.value)
        assert (details.code, details.reason) == (grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE")
        async with httpx.AsyncClient(base_url=gateway.rest_url, timeout=30) as http:
            response = await http.post(
                "/v1/requests/inventory.requests", json={"payload": {}, "timeoutMs": 2000}
            )
        assert (response.status_code, response.json()["error"]["reason"]) == (503, "BACKEND_UNAVAILABLE")
    finally:
        stack.up()
    await wait_for_health(gateway.target, SERVING, timeout_s=90)
