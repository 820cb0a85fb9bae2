"""Bad input through a running gateway, over gRPC and REST: always an error of the contract's table
(INVALID_ARGUMENT/400 naming the field, or PAYLOAD_TOO_LARGE/413), never INTERNAL/500."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import httpx
import pytest
from kpg import GatewayClient, error_details
from kpg.v1 import event_store_pb2 as es
from kpg.v1 import read_models_pb2 as rm

from tests.support import GatewayProcess

pytestmark = pytest.mark.e2e

TOPIC = "orders.events"
MiB = 1024 * 1024
REST_BODY_LIMIT = 16 * MiB  # create_rest_app's default


def _position(offsets: str, topic: str = TOPIC) -> str:
    """A position as a client could forge it: the gateway's encoding around any JSON offsets."""
    raw = '{"t":' + json.dumps(topic) + ',"o":' + offsets + "}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


_BAD_POSITIONS = {
    "Infinity": _position('{"0":Infinity}'),
    "NaN": _position('{"0":NaN}'),
    "float": _position('{"0":1.5}'),
    "negative": _position('{"0":-1}'),
    "beyond int64": _position('{"0":' + str(2**64) + "}"),
}


def _json_event(*, content_type: str = "", metadata: dict[str, str] | None = None) -> es.EventData:
    return es.EventData(type="T", data=b'{"n": 1}', content_type=content_type, metadata=metadata)


def _bytes_event(data: bytes, *, metadata: dict[str, str] | None = None) -> es.EventData:
    return es.EventData(type="T", data=data, content_type="application/octet-stream", metadata=metadata)


def _rest_bytes_event(data: bytes, **fields: object) -> dict[str, object]:
    return {
        "type": "T",
        "data": base64.b64encode(data).decode(),
        "contentType": "application/octet-stream",
    } | fields


async def _drain(stream: AsyncIterable[object]) -> None:
    async for _ in stream:
        pass


@dataclass(frozen=True)
class _Case:
    """One bad input, sent over gRPC (when gRPC can carry it) and over REST."""

    name: str
    grpc_call: Callable[[GatewayClient], Awaitable[object]] | None
    rest_call: Callable[[httpx.AsyncClient], Awaitable[httpx.Response]] | None
    reason: str
    field: str | None  # the BadRequest field violation, for INVALID_ARGUMENT

    @property
    def http(self) -> int:
        return 413 if self.reason == "PAYLOAD_TOO_LARGE" else 400


def _position_cases(name: str, bad: str) -> list[_Case]:
    """A forged position, wherever a position is taken."""
    return [
        _Case(
            f"ReadStream min_position {name}",
            lambda c: c.events.ReadStream(
                es.ReadStreamRequest(category="orders", stream_id="s", min_position=bad, wait_timeout_ms=100)
            ),
            lambda h: h.get("/v1/streams/orders/s/events", params={"minPosition": bad, "waitTimeoutMs": 100}),
            "INVALID_ARGUMENT",
            "min_position",
        ),
        _Case(
            f"Subscribe from_position {name}",
            lambda c: _drain(c.events.Subscribe(es.SubscribeRequest(category="orders", from_position=bad))),
            lambda h: h.get("/v1/streams/orders/subscribe", params={"fromPosition": bad}),
            "INVALID_ARGUMENT",
            "from_position",
        ),
        _Case(
            f"read model Get min_position {name}",
            lambda c: c.read_models.Get(
                rm.GetDocumentRequest(
                    read_model="order_summary", key="k", min_position=bad, wait_timeout_ms=100
                )
            ),
            lambda h: h.get(
                "/v1/read-models/order_summary/documents/k", params={"minPosition": bad, "waitTimeoutMs": 100}
            ),
            "INVALID_ARGUMENT",
            "min_position",
        ),
    ]


_CASES = [case for name, bad in _BAD_POSITIONS.items() for case in _position_cases(name, bad)]
_CASES += [
    _Case(
        "read model Query min_position beyond int64",
        lambda c: c.read_models.Query(
            rm.QueryRequest(read_model="order_summary", min_position=_BAD_POSITIONS["beyond int64"])
        ),
        lambda h: h.post(
            "/v1/read-models/order_summary/query", json={"minPosition": _BAD_POSITIONS["beyond int64"]}
        ),
        "INVALID_ARGUMENT",
        "min_position",
    ),
    _Case(
        "ReadStream from_version 2^63",
        lambda c: c.events.ReadStream(
            es.ReadStreamRequest(category="orders", stream_id="s", from_version=2**63)
        ),
        lambda h: h.get("/v1/streams/orders/s/events", params={"fromVersion": str(2**63)}),
        "INVALID_ARGUMENT",
        "from_version",
    ),
    _Case(
        "ReadStream from_version beyond uint64 (REST only)",
        None,
        lambda h: h.get("/v1/streams/orders/s/events", params={"fromVersion": str(2**64 + 5)}),
        "INVALID_ARGUMENT",
        "from_version",
    ),
    _Case(
        "ReadStream wait_timeout_ms of 400 digits (REST only)",
        None,
        lambda h: h.get(
            "/v1/streams/orders/s/events",
            params={"minPosition": _position('{"0":0}'), "waitTimeoutMs": str(10**400)},
        ),
        "INVALID_ARGUMENT",
        "wait_timeout_ms",
    ),
    _Case(
        "Subscribe from_version 2^63",
        lambda c: _drain(
            c.events.Subscribe(es.SubscribeRequest(category="orders", stream_id="s", from_version=2**63))
        ),
        lambda h: h.get("/v1/streams/orders/subscribe", params={"streamId": "s", "fromVersion": str(2**63)}),
        "INVALID_ARGUMENT",
        "from_version",
    ),
    _Case(
        "AppendEvents expected_version 2^63",
        lambda c: c.events.AppendEvents(
            es.AppendEventsRequest(
                category="orders", stream_id="s", events=[_json_event()], expected_version=2**63
            )
        ),
        lambda h: h.post(
            "/v1/streams/orders/s/events",
            json={"events": [{"type": "T", "data": {}}], "expectedVersion": str(2**63)},
        ),
        "INVALID_ARGUMENT",
        "expected_version",
    ),
    _Case(
        "stream id with a trailing newline",
        lambda c: c.events.AppendEvents(
            es.AppendEventsRequest(category="orders", stream_id="s\n", events=[_json_event()])
        ),
        lambda h: h.post("/v1/streams/orders/s%0A/events", json={"events": [{"type": "T", "data": {}}]}),
        "INVALID_ARGUMENT",
        "stream_id",
    ),
    _Case(
        "category with a trailing newline",
        lambda c: c.events.AppendEvents(
            es.AppendEventsRequest(category="orders\n", stream_id="s", events=[_json_event()])
        ),
        lambda h: h.post("/v1/streams/orders%0A/s/events", json={"events": [{"type": "T", "data": {}}]}),
        "INVALID_ARGUMENT",
        "category",
    ),
    _Case(
        "ReadStream of a stream id with a trailing newline",
        lambda c: c.events.ReadStream(es.ReadStreamRequest(category="orders", stream_id="s\n")),
        lambda h: h.get("/v1/streams/orders/s%0A/events"),
        "INVALID_ARGUMENT",
        "stream_id",
    ),
    _Case(
        "4 MiB of data plus headers",
        lambda c: c.events.AppendEvents(
            es.AppendEventsRequest(
                category="orders", stream_id="s", events=[_bytes_event(b"x" * MiB) for _ in range(4)]
            )
        ),
        lambda h: h.post(
            "/v1/streams/orders/s/events", json={"events": [_rest_bytes_event(b"x" * MiB) for _ in range(4)]}
        ),
        "PAYLOAD_TOO_LARGE",
        None,
    ),
    _Case(
        "65 metadata entries",
        lambda c: c.events.AppendEvents(
            es.AppendEventsRequest(
                category="orders",
                stream_id="s",
                events=[_json_event(metadata={f"k{i}": "v" for i in range(65)})],
            )
        ),
        lambda h: h.post(
            "/v1/streams/orders/s/events",
            json={"events": [{"type": "T", "data": {}, "metadata": {f"k{i}": "v" for i in range(65)}}]},
        ),
        "PAYLOAD_TOO_LARGE",
        None,
    ),
    _Case(
        "a metadata value over 8 KiB",
        lambda c: c.events.AppendEvents(
            es.AppendEventsRequest(
                category="orders", stream_id="s", events=[_json_event(metadata={"k": "v" * 8193})]
            )
        ),
        lambda h: h.post(
            "/v1/streams/orders/s/events",
            json={"events": [{"type": "T", "data": {}, "metadata": {"k": "v" * 8193}}]},
        ),
        "PAYLOAD_TOO_LARGE",
        None,
    ),
    _Case(
        "a content type with a control character",
        lambda c: c.events.AppendEvents(
            es.AppendEventsRequest(
                category="orders", stream_id="s", events=[_json_event(content_type="text/plain\n")]
            )
        ),
        lambda h: h.post(
            "/v1/streams/orders/s/events",
            json={"events": [_rest_bytes_event(b"x", contentType="text/plain\n")]},
        ),
        "INVALID_ARGUMENT",
        "events[0].content_type",
    ),
    _Case(
        "JSON data NaN",
        lambda c: c.events.AppendEvents(
            es.AppendEventsRequest(
                category="orders", stream_id="s", events=[es.EventData(type="T", data=b"NaN")]
            )
        ),
        lambda h: h.post(
            "/v1/streams/orders/s/events",
            content=b'{"events": [{"type": "T", "data": {"total": NaN}}]}',
            headers={"content-type": "application/json"},
        ),
        "INVALID_ARGUMENT",
        "events[0].data",
    ),
    _Case(
        "data that is not base64 (REST only)",
        None,
        lambda h: h.post(
            "/v1/streams/orders/s/events",
            json={
                "events": [{"type": "T", "data": "not base64!", "contentType": "application/octet-stream"}]
            },
        ),
        "INVALID_ARGUMENT",
        "events[0].data",
    ),
]


@pytest.mark.parametrize("case", _CASES, ids=lambda case: case.name)
async def test_bad_input_gets_the_contracts_error(gateway: GatewayProcess, case: _Case) -> None:
    if case.grpc_call is not None:
        async with GatewayClient(gateway.target) as client:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await case.grpc_call(client)
        details = error_details(raised.value)
        assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, case.reason), details
        if case.field is not None:
            assert case.field in details.field_violations, details
    if case.rest_call is not None:
        async with httpx.AsyncClient(base_url=gateway.rest_url, timeout=60) as http:
            response = await case.rest_call(http)
        assert response.status_code == case.http, response.text
        error = response.json()["error"]
        assert (error["code"], error["status"], error["reason"]) == (
            case.http,
            "INVALID_ARGUMENT",
            case.reason,
        )
        if case.field is not None:
            assert case.field in {v["field"] for v in error.get("fieldViolations", [])}, error


async def test_the_largest_values_that_fit_are_served(gateway: GatewayProcess) -> None:
    """The bounds are not off by one: int64's maximum is a valid version, 1 MiB a valid event."""
    stream = f"order-{uuid.uuid4().hex[:8]}"
    async with GatewayClient(gateway.target) as client:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.events.ReadStream(
                es.ReadStreamRequest(category="orders", stream_id=stream, from_version=2**63 - 1)
            )
        assert error_details(raised.value).reason == "NOT_FOUND"
        appended = await client.events.AppendEvents(
            es.AppendEventsRequest(
                category="orders",
                stream_id=stream,
                events=[_bytes_event(b"x" * MiB, metadata={f"k{i}": "v" * 8192 for i in range(64)})],
            )
        )
        assert appended.last_version == 1
        read = await client.events.ReadStream(
            es.ReadStreamRequest(category="orders", stream_id=stream, min_position=appended.position)
        )
        assert len(read.events[0].data) == MiB and len(read.events[0].metadata) == 64


def _error_of(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


async def test_a_declared_body_over_the_limit_is_refused_at_once(gateway: GatewayProcess) -> None:
    # Only the headers are sent: the gateway answers without waiting for a body it will not read.
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.rest_port)
    try:
        writer.write(
            b"POST /v1/streams/orders/s/events HTTP/1.1\r\nHost: gateway\r\n"
            + b"Content-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {REST_BODY_LIMIT + 1}\r\n\r\n".encode()
        )
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status, error = _error_of(raw)
    assert (status, error["code"], error["status"], error["reason"]) == (
        413,
        413,
        "INVALID_ARGUMENT",
        "PAYLOAD_TOO_LARGE",
    ), raw


async def test_a_streamed_body_over_the_limit_is_refused(gateway: GatewayProcess) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"events": [{"type": "T", "data": "'
        for _ in range(REST_BODY_LIMIT // MiB):
            yield b"A" * MiB
        yield b'"}]}'

    async with httpx.AsyncClient(base_url=gateway.rest_url, timeout=60) as http:
        response = await http.post(
            "/v1/streams/orders/s/events", content=chunks(), headers={"content-type": "application/json"}
        )
    assert "content-length" not in response.request.headers  # chunked
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert (error["status"], error["reason"], error["metadata"]["limit"]) == (
        "INVALID_ARGUMENT",
        "PAYLOAD_TOO_LARGE",
        str(REST_BODY_LIMIT),
    )
