"""A pattern is one registration: gateway/patterns.py creates its topics, starts and stops it, and puts its
gRPC servicer and REST router in place of the placeholders. Pure composition, so fakes stand in for the
services; the gRPC and REST servers are real (in process, port 0)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import httpx
import pytest
from fastapi import APIRouter
from kpg import GatewayClient, error_details
from kpg.v1 import dead_letters_pb2, sagas_pb2, sagas_pb2_grpc

from gateway import patterns as patterns_module
from gateway.adapters.kafka import TopicSpec
from gateway.patterns import Pattern, grpc_bindings, rest_routers, start_patterns, stop_patterns
from gateway.services.health import BackendMonitor
from gateway.settings import GrpcSettings
from gateway.transport.grpc import create_grpc_server
from gateway.transport.rest import create_rest_app


class FakeAdmin:
    def __init__(self) -> None:
        self.calls: list[list[TopicSpec]] = []

    async def ensure_topics(self, specs: Iterable[TopicSpec]) -> list[str]:
        self.calls.append(list(specs))
        return [s.name for s in self.calls[-1]]


def recording(name: str, calls: list[str], *, topics: Iterable[str] = ()) -> Pattern:
    async def start() -> None:
        calls.append(f"start {name}")

    async def stop(timeout_s: float) -> None:
        calls.append(f"stop {name} {timeout_s}")

    return Pattern(
        name=name,
        service=f"kpg.v1.{name}",
        servicer=object(),
        topics=lambda: [TopicSpec(t, 1) for t in topics],
        start=start,
        stop=stop,
    )


async def test_topics_are_created_in_one_call_then_patterns_start_in_order() -> None:
    calls: list[str] = []
    admin = FakeAdmin()
    patterns = [
        recording("a", calls, topics=["a.events", "shared"]),
        Pattern(name="quiet", service="kpg.v1.Quiet", servicer=object()),  # no topics, no start, no stop
        recording("b", calls, topics=["b.replies"]),
    ]

    await start_patterns(patterns, admin=admin, topics=[TopicSpec("defined", 3), TopicSpec("shared", 3)])

    assert admin.calls == [
        [
            TopicSpec("defined", 3),
            TopicSpec("shared", 3),  # the definitions' spec comes first, so the pattern's one wins
            TopicSpec("a.events", 1),
            TopicSpec("shared", 1),
            TopicSpec("b.replies", 1),
        ]
    ]
    assert calls == ["start a", "start b"]


async def test_a_failed_start_propagates_so_start_up_is_retried() -> None:
    calls: list[str] = []

    async def fail() -> None:
        raise ConnectionError("redis went away")

    patterns = [
        recording("a", calls),
        Pattern(name="flaky", service="kpg.v1.Flaky", servicer=object(), start=fail),
        recording("b", calls),
    ]
    with pytest.raises(ConnectionError):
        await start_patterns(patterns, admin=FakeAdmin())
    assert calls == ["start a"]


async def test_patterns_stop_in_reverse_order_with_the_time_left() -> None:
    calls: list[str] = []
    budgets = iter([7.0, 5.0, 3.0])
    patterns = [recording("a", calls), recording("b", calls), recording("c", calls)]

    await stop_patterns(patterns, left=lambda: next(budgets))

    assert calls == ["stop c 7.0", "stop b 5.0", "stop a 3.0"]


async def test_a_failing_or_hanging_stop_does_not_keep_the_next_pattern_from_stopping(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(patterns_module, "STOP_SLACK_S", 0.1)
    calls: list[str] = []

    async def fail(timeout_s: float) -> None:
        raise RuntimeError("consumer close failed")

    async def hang(timeout_s: float) -> None:
        await asyncio.Event().wait()

    patterns = [
        recording("first", calls),
        Pattern(name="hanging", service="kpg.v1.Hanging", servicer=object(), stop=hang),
        Pattern(name="failing", service="kpg.v1.Failing", servicer=object(), stop=fail),
    ]
    with caplog.at_level(logging.ERROR):
        await stop_patterns(patterns, left=lambda: 0.1)

    assert calls == ["stop first 0.1"]
    messages = [r.getMessage() for r in caplog.records]
    assert "stopping failing failed; going on" in messages
    assert any(m.startswith("stopping hanging did not finish within") for m in messages)


async def test_stopping_is_not_swallowed_when_cancelled() -> None:
    stopping = asyncio.Event()

    async def hang(timeout_s: float) -> None:
        stopping.set()
        await asyncio.Event().wait()

    patterns = [Pattern(name="hanging", service="kpg.v1.Hanging", servicer=object(), stop=hang)]
    task = asyncio.create_task(stop_patterns(patterns, left=lambda: 60.0))
    await stopping.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- gRPC: a servicer replaces its placeholder ------------------------------------------------------------


class FakeSagas(sagas_pb2_grpc.SagasServicer):
    async def StartSaga(self, request: sagas_pb2.StartSagaRequest, context: Any) -> sagas_pb2.Saga:
        return sagas_pb2.Saga(saga_id="s-new", saga_type=request.saga_type)

    async def GetSaga(self, request: sagas_pb2.GetSagaRequest, context: Any) -> sagas_pb2.Saga:
        return sagas_pb2.Saga(saga_id=request.saga_id, saga_type="place_order")

    async def ListSagas(
        self, request: sagas_pb2.ListSagasRequest, context: Any
    ) -> sagas_pb2.ListSagasResponse:
        return sagas_pb2.ListSagasResponse()

    async def WatchSaga(
        self, request: sagas_pb2.WatchSagaRequest, context: Any
    ) -> AsyncIterator[sagas_pb2.Saga]:
        yield sagas_pb2.Saga(saga_id=request.saga_id)


async def test_a_registered_servicer_replaces_its_placeholder_and_the_others_stay_unimplemented() -> None:
    sagas = Pattern(name="start-saga", service="kpg.v1.Sagas", servicer=FakeSagas())
    server, port = await create_grpc_server(
        GrpcSettings(host="127.0.0.1", port=0),
        bindings=grpc_bindings([sagas]),
        monitor=BackendMonitor(probes={}),
    )
    await server.start()
    try:
        async with GatewayClient(f"127.0.0.1:{port}") as client:
            saga = await client.sagas.GetSaga(sagas_pb2.GetSagaRequest(saga_id="s-1"))
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await client.dead_letters.ListDeadLetterTopics(dead_letters_pb2.ListDeadLetterTopicsRequest())
    finally:
        await server.stop(None)

    assert (saga.saga_id, saga.saga_type) == ("s-1", "place_order")
    details = error_details(raised.value)
    assert details.code == grpc.StatusCode.UNIMPLEMENTED
    assert (details.reason, details.metadata["pattern"]) == ("UNIMPLEMENTED", "DLT reprocessing")


async def test_a_streaming_placeholder_answers_unimplemented_naming_its_pattern() -> None:
    server, port = await create_grpc_server(
        GrpcSettings(host="127.0.0.1", port=0), bindings=grpc_bindings([]), monitor=BackendMonitor(probes={})
    )
    await server.start()
    try:
        async with GatewayClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async for _ in client.sagas.WatchSaga(sagas_pb2.WatchSagaRequest(saga_id="s-1")):
                    raise AssertionError("a placeholder streamed something")
    finally:
        await server.stop(None)
    details = error_details(raised.value)
    assert (details.code, details.metadata["pattern"]) == (grpc.StatusCode.UNIMPLEMENTED, "start-saga")


def test_bindings_cover_every_service_with_the_registered_servicers_in_place() -> None:
    servicer = FakeSagas()
    bound = {
        b.full_name: b.servicer for b in grpc_bindings([Pattern("start-saga", "kpg.v1.Sagas", servicer)])
    }
    assert set(bound) == {
        "kpg.v1.EventStore",
        "kpg.v1.ReadModels",
        "kpg.v1.Sagas",
        "kpg.v1.RequestReply",
        "kpg.v1.DeadLetters",
    }
    assert bound["kpg.v1.Sagas"] is servicer
    assert type(bound["kpg.v1.DeadLetters"]).__name__ == "PlaceholderDeadLetters"


def test_a_pattern_naming_an_unknown_or_taken_service_is_refused() -> None:
    with pytest.raises(ValueError, match=r"kpg\.v1\.Sagaz"):
        grpc_bindings([Pattern("start-saga", "kpg.v1.Sagaz", object())])
    with pytest.raises(ValueError, match=r"two patterns implement kpg\.v1\.Sagas"):
        grpc_bindings([Pattern("a", "kpg.v1.Sagas", object()), Pattern("b", "kpg.v1.Sagas", object())])


# --- REST: a router replaces the planned routes it serves -------------------------------------------------


def sagas_router() -> APIRouter:
    router = APIRouter()

    # Named differently from the planned `/v1/sagas/{saga_id}`: the same route all the same.
    @router.get("/v1/sagas/{id}", name="Sagas.GetSaga")
    async def get_saga(id: str) -> dict[str, str]:
        return {"sagaId": id}

    return router


async def test_a_router_replaces_its_501_placeholder_and_the_other_planned_routes_still_answer_501() -> None:
    app = create_rest_app(
        monitor=BackendMonitor(probes={}),
        routers=rest_routers([Pattern("start-saga", "kpg.v1.Sagas", object(), router=sagas_router())]),
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        served = await http.get("/v1/sagas/s-1")
        planned = await http.post("/v1/sagas", json={"sagaType": "place_order"})
        spec = (await http.get("/openapi.json")).json()

    assert served.status_code == 200 and served.json() == {"sagaId": "s-1"}
    assert planned.status_code == 501
    assert planned.json() == {
        "error": {
            "code": 501,
            "status": "UNIMPLEMENTED",
            "reason": "UNIMPLEMENTED",
            "message": "Sagas.StartSaga is not implemented yet: it arrives with the start-saga pattern",
            "metadata": {"rpc": "Sagas.StartSaga", "pattern": "start-saga"},
        }
    }
    # The placeholder is gone, not merely shadowed.
    assert "/v1/sagas/{saga_id}" not in spec["paths"]
    assert "get" in spec["paths"]["/v1/sagas/{id}"]
    assert "post" in spec["paths"]["/v1/sagas"]


def test_patterns_without_a_router_add_no_routes() -> None:
    routers = rest_routers(
        [
            Pattern("a", "kpg.v1.Sagas", object()),
            Pattern("b", "kpg.v1.DeadLetters", object(), router=APIRouter()),
        ]
    )
    assert len(routers) == 1
