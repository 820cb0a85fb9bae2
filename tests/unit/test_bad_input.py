"""Bad input gets a clear error of the contract's table, never INTERNAL: the request conversions shared by
gRPC and REST, the definitions file's names, and the REST body limit."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Body
from kpg.v1 import event_store_pb2 as es
from kpg.v1 import sagas_pb2 as sg
from starlette.types import Message

from gateway.definitions import DefinitionsError, parse_definitions
from gateway.domain.events import Expectation, ReadStreamQuery, SubscribeQuery
from gateway.errors import GatewayError, InvalidArgument
from gateway.services.health import BackendMonitor
from gateway.transport import convert
from gateway.transport.rest import create_rest_app

INT64_MAX = 2**63 - 1


def _fields(error: GatewayError) -> list[str]:
    return [v.field for v in error.violations]


# --- Integers that reach SQL, Kafka or a timer ------------------------------------------------------------


@pytest.mark.parametrize("from_version", [2**63, 2**64 - 1])
def test_read_stream_from_version_beyond_int64_is_invalid(from_version: int) -> None:
    with pytest.raises(InvalidArgument) as raised:
        convert.read_stream_from_pb(
            es.ReadStreamRequest(category="orders", stream_id="s", from_version=from_version)
        )
    assert _fields(raised.value) == ["from_version"]


def test_read_stream_conversion_keeps_every_field() -> None:
    query = convert.read_stream_from_pb(
        es.ReadStreamRequest(
            category="orders",
            stream_id="s",
            from_version=INT64_MAX,
            max_count=7,
            backwards=True,
            min_position="p",
            wait_timeout_ms=2**32 - 1,
        )
    )
    assert query == ReadStreamQuery("orders", "s", INT64_MAX, 7, True, "p", 2**32 - 1)


@pytest.mark.parametrize("from_version", [2**63, 2**64 - 1])
def test_subscribe_from_version_beyond_int64_is_invalid(from_version: int) -> None:
    with pytest.raises(InvalidArgument) as raised:
        convert.subscribe_from_pb(
            es.SubscribeRequest(category="orders", stream_id="s", from_version=from_version)
        )
    assert _fields(raised.value) == ["from_version"]
    query = convert.subscribe_from_pb(es.SubscribeRequest(category="orders", from_position="p"))
    assert query == SubscribeQuery("orders", "", 0, "p")


def test_expected_version_beyond_int64_is_invalid() -> None:
    request = es.AppendEventsRequest(category="orders", stream_id="s", expected_version=2**63)
    with pytest.raises(InvalidArgument) as raised:
        convert.append_from_pb(request)
    assert _fields(raised.value) == ["expected_version"]
    request.expected_version = INT64_MAX
    expected = convert.append_from_pb(request).expected
    assert (expected.kind, expected.version) == (Expectation.EXACT, INT64_MAX)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("from_version", 2**64 + 5),
        ("from_version", -1),
        ("max_count", 2**32),
        ("max_count", -1),
        ("wait_timeout_ms", 10**400),
        ("wait_timeout_ms", -5),
    ],
)
def test_rest_query_integers_are_range_checked(field: str, value: int) -> None:
    # A REST query parameter is any integer; protobuf's own ranges never saw it.
    with pytest.raises(InvalidArgument) as raised:
        changes: dict[str, Any] = {field: value}
        dataclasses.replace(ReadStreamQuery("orders", "s"), **changes)
    assert _fields(raised.value) == [field]


def test_rest_subscribe_from_version_is_range_checked() -> None:
    with pytest.raises(InvalidArgument) as raised:
        SubscribeQuery("orders", "s", from_version=2**63)
    assert _fields(raised.value) == ["from_version"]


# --- REST bodies --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"expectedVersion": 2**64}, "expectedVersion"),
        ({"expectedVersion": 1.5}, "expectedVersion"),
        ({"events": [{"type": "\ud800", "data": {}}]}, "events[0].type"),
        ({"events": [{"type": 5}]}, "events.type"),
        ({"nope": 1}, "nope"),
        ({"events": [{"type": "T", "nope": 1}]}, "events[0].nope"),
    ],
)
def test_a_body_protobuf_cannot_parse_names_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        convert.append_body_to_pb(body, category="orders", stream_id="s")
    assert _fields(raised.value) == [field]


def test_a_body_expected_version_beyond_int64_is_invalid() -> None:
    message = convert.append_body_to_pb({"expectedVersion": str(2**63)}, category="orders", stream_id="s")
    with pytest.raises(InvalidArgument) as raised:
        convert.append_from_pb(message)
    assert _fields(raised.value) == ["expected_version"]


def test_a_content_type_that_is_not_a_string_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument):
        convert.append_body_to_pb(
            {"events": [{"type": "T", "data": {"a": 1}, "contentType": 5}]}, category="orders", stream_id="s"
        )


@pytest.mark.parametrize("data", ["!!", "eA=x", "e A=", "eAAAA", "eA==eA=="])
def test_non_json_data_must_be_base64(data: str) -> None:
    body = {"events": [{"type": "T", "data": data, "contentType": "application/octet-stream"}]}
    with pytest.raises(InvalidArgument) as raised:
        convert.append_body_to_pb(body, category="orders", stream_id="s")
    assert _fields(raised.value) == ["events[0].data"]


@pytest.mark.parametrize("data", ["", "eA==", "eA", "-_8=", "+/8="])
def test_standard_and_url_safe_base64_are_accepted(data: str) -> None:
    body = {"events": [{"type": "T", "data": data, "contentType": "application/octet-stream"}]}
    convert.append_body_to_pb(body, category="orders", stream_id="s")


# --- The definitions file: `$` also matches before a trailing newline --------------------------------------


@pytest.mark.parametrize(
    "document",
    [
        {"categories": {"orders\n": None}},
        {"categories": {"orders": {"topic": "orders.events\n"}}},
        {
            "categories": {"orders": None},
            "read_models": {"m": {"category": "orders", "python": "pkg.mod:fn\n"}},
        },
        {
            "categories": {"orders": None},
            "read_models": {"m": {"category": "orders", "handlers": {"T": {"set": {"total\n": "$.total"}}}}},
        },
    ],
    ids=["category", "topic", "python", "field"],
)
def test_definitions_refuse_names_with_a_trailing_newline(document: dict[str, Any]) -> None:
    with pytest.raises(DefinitionsError):
        parse_definitions(document)


# --- The REST body limit ---------------------------------------------------------------------------------


def _echo_router() -> APIRouter:
    router = APIRouter()

    @router.post("/echo")
    async def echo(body: Annotated[Any, Body()]) -> dict[str, int]:
        return {"size": len(json.dumps(body))}

    return router


def _app(max_body_bytes: int | None = None) -> Any:
    monitor = BackendMonitor(probes={})
    if max_body_bytes is None:
        return create_rest_app(monitor=monitor, routers=[_echo_router()])
    return create_rest_app(monitor=monitor, routers=[_echo_router()], max_body_bytes=max_body_bytes)


def _body(size: int) -> bytes:
    """A JSON document of exactly `size` bytes."""
    return json.dumps({"a": "x" * (size - 9)}).encode()


def _assert_payload_too_large(response: httpx.Response, limit: int) -> None:
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert (error["code"], error["status"], error["reason"]) == (413, "INVALID_ARGUMENT", "PAYLOAD_TOO_LARGE")
    assert error["metadata"]["limit"] == str(limit)
    assert error["message"]


async def test_a_body_up_to_the_limit_is_served() -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_app(1000)), base_url="http://t") as http:
        response = await http.post("/echo", content=_body(1000), headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


async def test_a_content_length_over_the_limit_is_refused() -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_app(1000)), base_url="http://t") as http:
        response = await http.post("/echo", content=_body(1001), headers={"content-type": "application/json"})
    _assert_payload_too_large(response, 1000)


async def test_a_chunked_body_over_the_limit_is_refused() -> None:
    async def chunks(count: int) -> AsyncIterator[bytes]:
        body = _body(400 * count)
        for i in range(count):
            yield body[i * 400 : (i + 1) * 400]

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_app(1000)), base_url="http://t") as http:
        headers = {"content-type": "application/json"}
        small = await http.post("/echo", content=chunks(2), headers=headers)
        assert small.status_code == 200, small.text
        assert "content-length" not in small.request.headers
        large = await http.post("/echo", content=chunks(3), headers=headers)
    _assert_payload_too_large(large, 1000)


async def _call(app: Any, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict[str, Any]]:
    """One raw ASGI request whose body must never be read."""
    sent: list[Message] = []

    async def receive() -> Message:
        raise AssertionError("the body was read")

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/echo",
        "raw_path": b"/echo",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"t"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


async def test_a_declared_length_over_the_limit_is_refused_without_reading_the_body() -> None:
    status, body = await _call(_app(1000), [(b"content-length", b"1001")])
    assert (status, body["error"]["reason"]) == (413, "PAYLOAD_TOO_LARGE")


async def test_the_default_limit_is_16_mib() -> None:
    status, body = await _call(_app(), [(b"content-length", str(16 * 1024 * 1024 + 1).encode())])
    assert (status, body["error"]["metadata"]["limit"]) == (413, str(16 * 1024 * 1024))


# --- Saga input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_saga_input_with_a_number_json_cannot_hold_is_invalid(number: float) -> None:
    message = sg.StartSagaRequest(saga_type="place_order")
    message.input.update({"order": {"total": number}})
    with pytest.raises(InvalidArgument) as raised:
        convert.start_saga_from_pb(message)
    assert _fields(raised.value) == ["input"]
