"""The running gateway as a user sees it, through the generated Python client and plain HTTP."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from kpg import GatewayClient
from kpg.v1 import (
    dead_letters_pb2,
    event_store_pb2,
    read_models_pb2,
    request_reply_pb2,
    sagas_pb2,
)

from gateway.adapters.kafka import KafkaAdmin
from tests.conftest import Backends
from tests.support import NOT_SERVING, SERVING, GatewayProcess, wait_for_health

pytestmark = pytest.mark.e2e

# The contract's REST routes (../shared/API.md, "REST bridge"), written out here so that a route the
# gateway stops serving fails this test.
CONTRACT_ROUTES = {
    ("post", "/v1/streams/{category}/{stream_id}/events"),
    ("get", "/v1/streams/{category}/{stream_id}/events"),
    ("get", "/v1/streams/{category}/subscribe"),
    ("get", "/v1/read-models/{read_model}/documents/{key}"),
    ("post", "/v1/read-models/{read_model}/query"),
    ("get", "/v1/read-models/{read_model}"),
    ("post", "/v1/read-models/{read_model}/rebuild"),
    ("get", "/v1/read-models"),
    ("post", "/v1/sagas"),
    ("get", "/v1/sagas/{saga_id}"),
    ("get", "/v1/sagas"),
    ("post", "/v1/requests/{topic}"),
    ("get", "/v1/replies/{correlation_id}"),
    ("get", "/v1/dead-letters"),
    ("get", "/v1/dead-letters/{dlt_topic}"),
    ("get", "/v1/dead-letters/{dlt_topic}/{partition}/{offset}"),
    ("post", "/v1/dead-letters/{dlt_topic}/reprocess"),
    ("post", "/v1/dead-letters/{dlt_topic}/discard"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
}


async def test_reflection_lists_every_service(gateway: GatewayProcess) -> None:
    async with grpc.aio.insecure_channel(gateway.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = [r async for r in stub.ServerReflectionInfo(iter([request]))]
    services = {s.name for s in responses[0].list_services_response.service}
    assert {
        "kpg.v1.EventStore",
        "kpg.v1.ReadModels",
        "kpg.v1.Sagas",
        "kpg.v1.RequestReply",
        "kpg.v1.DeadLetters",
        "grpc.health.v1.Health",
    } <= services


async def test_unknown_rpc_is_unimplemented(gateway: GatewayProcess) -> None:
    async with grpc.aio.insecure_channel(gateway.target) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/kpg.v1.EventStore/NoSuchRpc"
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(b"")
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_every_rpc_of_the_contract_is_served(gateway: GatewayProcess) -> None:
    """No RPC answers UNIMPLEMENTED any more: each one, called with an empty request, gets an answer or
    a contract error of its own."""
    files = (event_store_pb2, read_models_pb2, sagas_pb2, request_reply_pb2, dead_letters_pb2)
    methods = [
        (f"/{service.full_name}/{method.name}", method.server_streaming)
        for file in files
        for service in file.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]
    assert len(methods) >= 20
    async with grpc.aio.insecure_channel(gateway.target) as channel:
        codes = {path: await _code_of_empty_call(channel, path, streaming) for path, streaming in methods}
    assert not [path for path, code in codes.items() if code == grpc.StatusCode.UNIMPLEMENTED]


async def _code_of_empty_call(channel: grpc.aio.Channel, path: str, streaming: bool) -> grpc.StatusCode:
    """The status of `path` called with an empty request (a stream is closed after its first message)."""
    if not streaming:
        unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
        try:
            await unary(b"", timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK
    opened: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(path)
    stream = opened(b"", timeout=5)
    try:
        await asyncio.wait_for(stream.read(), 1.0)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    except TimeoutError:
        pass
    stream.cancel()
    return grpc.StatusCode.OK


async def test_openapi_lists_the_rest_routes(gateway: GatewayProcess) -> None:
    async with httpx.AsyncClient(base_url=gateway.rest_url) as http:
        spec = (await http.get("/openapi.json")).json()
        docs = await http.get("/docs")
    served = {(method, path) for path, item in spec["paths"].items() for method in item}
    assert served >= CONTRACT_ROUTES
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


async def test_rest_errors_have_the_contract_body(gateway: GatewayProcess) -> None:
    async with httpx.AsyncClient(base_url=gateway.rest_url) as http:
        invalid = await http.post(
            "/v1/dead-letters/orders.events/discard", json={"ids": ["x"], "reason": "r"}
        )
        unknown = await http.get("/v1/no-such-route")
    assert invalid.status_code == 400
    assert invalid.json()["error"]["reason"] == "INVALID_ARGUMENT"
    assert [v["field"] for v in invalid.json()["error"]["fieldViolations"]] == ["dlt_topic"]
    assert unknown.status_code == 404
    assert unknown.json() == {
        "error": {
            "code": 404,
            "status": "NOT_FOUND",
            "reason": "NOT_FOUND",
            "message": "no route GET /v1/no-such-route",
            "metadata": {},
        }
    }


async def test_operations_routes_and_metrics(gateway: GatewayProcess) -> None:
    async with GatewayClient(gateway.target) as client:
        with pytest.raises(grpc.aio.AioRpcError):
            await client.sagas.GetSaga(sagas_pb2.GetSagaRequest(saga_id="no-such-saga"))
    async with httpx.AsyncClient(base_url=gateway.rest_url) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
        metrics = (await http.get("/metrics")).text
    assert ready.status_code == 200 and ready.json()["backends"] == {
        "kafka": True,
        "redis": True,
        "database": True,
    }
    assert 'kpg_requests_total{code="NOT_FOUND",rpc="Sagas.GetSaga",transport="grpc"}' in metrics
    assert 'kpg_request_errors_total{reason="NOT_FOUND",rpc="Sagas.GetSaga",transport="grpc"}' in metrics
    assert 'kpg_request_duration_seconds_bucket{le="0.005",rpc="Sagas.GetSaga",transport="grpc"}' in metrics
    assert 'kpg_requests_total{code="200",rpc="readyz",transport="rest"}' in metrics


async def test_definitions_topics_are_created_with_their_partitions(
    gateway: GatewayProcess, backends: Backends
) -> None:
    topics = await KafkaAdmin(backends.kafka()).list_topics()
    assert topics["orders.events"] == 6
    for name in ("inventory.commands", "payment.commands", "orders.commands", "inventory.requests"):
        assert name in topics


def test_bad_definitions_file_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "definitions.yaml"
    bad.write_text(
        "categories:\n  orders: {}\nread_models:\n  order_summary:\n    category: shipments\n"
        "    python: shop.projections:summary\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--definitions",
            str(bad),
            "--grpc-port",
            "0",
            "--rest-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "read_models.order_summary.category" in result.stderr
    assert "unknown category 'shipments'" in result.stderr


@pytest.mark.parametrize("workers", [1, 2])  # one process, and a supervisor passing SIGTERM on
async def test_sigterm_drains_then_stops(backends: Backends, tmp_path: Path, workers: int) -> None:
    process = GatewayProcess(
        tmp_path,
        env={
            "KPG_KAFKA__BOOTSTRAP_SERVERS": backends.bootstrap_servers,
            "KPG_REDIS__URL": backends.redis_url,
            "KPG_SHUTDOWN_GRACE_S": "2",
        },
        workers=workers,
    ).start()
    try:
        await wait_for_health(process.target, SERVING, process=process)
        statuses = []
        async with grpc.aio.insecure_channel(process.target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            statuses.append((await watch.read()).status)
            assert process.process is not None
            process.process.send_signal(signal.SIGTERM)
            # Health turns NOT_SERVING first, so load balancers drain this instance while it stops.
            statuses.append((await watch.read()).status)
        assert statuses == [SERVING, NOT_SERVING]
        assert process.process.wait(30) == 0
        assert '"message": "stopped"' in process.log()
        assert '"event_loop": "uvloop"' in process.log()  # the default
    finally:
        process.kill()


@pytest.mark.parametrize("taken", ["grpc", "rest"])
def test_taken_port_is_a_clear_error(gateway: GatewayProcess, taken: str) -> None:
    grpc_port = gateway.grpc_port if taken == "grpc" else 0
    rest_port = gateway.rest_port if taken == "rest" else 0
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--grpc-port",
            str(grpc_port),
            "--rest-port",
            str(rest_port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    port = grpc_port or rest_port
    assert (
        f"kpg serve: cannot bind {'gRPC' if taken == 'grpc' else 'REST'} to 127.0.0.1:{port}" in result.stderr
    )
