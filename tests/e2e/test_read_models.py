"""query-read-model through running gateways: projections on SQLite and PostgreSQL, read-your-writes,
crashes, poison events and rebuilds. The expected documents are folded here, independently."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition
from google.protobuf import json_format, struct_pb2
from kpg import GatewayClient, error_details
from kpg.v1 import event_store_pb2 as es
from kpg.v1 import read_models_pb2 as rm

from gateway.domain.events import Position
from tests.conftest import Backends, fresh_postgres_database
from tests.support import SERVING, GatewayProcess, eventually, wait_for_health

pytestmark = pytest.mark.e2e

STREAMS = 500
EVENTS_PER_STREAM = 20  # 10,000 events in all


def _definitions(category: str) -> str:
    return f"""
categories:
  {category}: {{partitions: 6}}
read_models:
  summary:
    category: {category}
    handlers:
      OrderPlaced:   {{set: {{customer: $.customer, total: $.total, status: PLACED}}}}
      ItemAdded:     {{append: {{items: $.item}}, increment: {{item_count: 1, quantity: $.qty}}}}
      OrderShipped:  {{set: {{status: SHIPPED, shipped_at: $event.recorded_at}}}}
      OrderArchived: {{delete: true}}
  tally:
    category: {category}
    python: tests.e2e.projections:tally
"""


@dataclass
class Deployment:
    """Gateways of one test: the definitions, where state lives, and how to start another instance."""

    category: str
    definitions: Path
    database_url: str
    backends: Backends
    workdir: Path
    repo_root: Path
    processes: list[GatewayProcess]

    @property
    def topic(self) -> str:
        return f"{self.category}.events"

    async def start(self, **env: str) -> GatewayProcess:
        process = GatewayProcess(
            self.workdir / f"gw{len(self.processes)}",
            env={
                "KPG_KAFKA__BOOTSTRAP_SERVERS": self.backends.bootstrap_servers,
                "KPG_REDIS__URL": self.backends.redis_url,
                "KPG_DATABASE__URL": self.database_url,
                "KPG_READ_MODELS__HANDLER_BACKOFF_MS": "10",
                "KPG_READ_MODELS__REGISTRY_POLL_MS": "200",
                "PYTHONPATH": str(self.repo_root),
                **env,
            },
            args=["--definitions", str(self.definitions)],
        ).start()
        self.processes.append(process)
        await wait_for_health(process.target, SERVING, process=process)
        return process

    def kill_all(self) -> None:
        for process in self.processes:
            process.kill()


def _new_deployment(backends: Backends, workdir: Path, repo_root: Path, database_url: str) -> Deployment:
    category = f"rm{uuid.uuid4().hex[:8]}"
    definitions = workdir / "definitions.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    definitions.write_text(_definitions(category))
    url = database_url or f"sqlite:///{workdir / 'gateway.db'}"
    return Deployment(category, definitions, url, backends, workdir, repo_root, [])


@pytest.fixture(params=["sqlite", "postgresql"])
async def any_database(
    request: pytest.FixtureRequest, backends: Backends, tmp_path: Path, repo_root: Path
) -> AsyncIterator[Deployment]:
    url = (
        fresh_postgres_database(request.getfixturevalue("postgres_url"))
        if request.param == "postgresql"
        else ""
    )
    deployment = _new_deployment(backends, tmp_path, repo_root, url)
    yield deployment
    deployment.kill_all()


@pytest.fixture
async def deployment(backends: Backends, tmp_path: Path, repo_root: Path) -> AsyncIterator[Deployment]:
    deployment = _new_deployment(backends, tmp_path, repo_root, "")
    yield deployment
    deployment.kill_all()


# --- the workload, and its fold computed here ---------------------------------------------------------


def _stream_events(i: int) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = [
        ("OrderPlaced", {"customer": f"c-{i % 37}", "total": i * 1.5})
    ]
    events += [("ItemAdded", {"item": f"sku-{(i + j) % 11}", "qty": (i * j) % 5 + 1}) for j in range(18)]
    events.append(("OrderShipped", {}))
    return events


def _expected_summary(events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any] | None:
    """The contract's declarative handlers, folded by hand."""
    doc: dict[str, Any] | None = None
    for event_type, data in events:
        if event_type == "OrderArchived":
            doc = None
            continue
        if event_type == "ItemAdded" and not isinstance(data.get("qty"), int | float):
            continue  # the poison event goes to the DLT: the document stays as it was
        doc = dict(doc or {})
        if event_type == "OrderPlaced":
            doc.update(customer=data.get("customer"), total=data.get("total"), status="PLACED")
        elif event_type == "ItemAdded":
            doc["items"] = [*doc.get("items", []), data.get("item")]
            doc["item_count"] = doc.get("item_count", 0) + 1
            doc["quantity"] = doc.get("quantity", 0) + data["qty"]
        elif event_type == "OrderShipped":
            doc.update(status="SHIPPED", shipped_at="<recorded_at>")
    return doc


def _expected_tally(events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    types: dict[str, int] = {}
    for event_type, _ in events:
        types[event_type] = types.get(event_type, 0) + 1
    return {"events": len(events), "types": types}


def _data(document: rm.Document) -> dict[str, Any]:
    data = json_format.MessageToDict(document.data)
    if "shipped_at" in data:
        assert data["shipped_at"].endswith("Z")
        data["shipped_at"] = "<recorded_at>"
    for key in ("item_count", "quantity"):  # Struct numbers are doubles
        if key in data:
            data[key] = int(data[key])
    return data


async def _append(
    client: GatewayClient, category: str, stream: str, events: list[tuple[str, dict[str, Any]]]
) -> es.AppendEventsResponse:
    return await client.events.AppendEvents(
        es.AppendEventsRequest(
            category=category,
            stream_id=stream,
            events=[es.EventData(type=t, data=json.dumps(d).encode()) for t, d in events],
        )
    )


async def _append_workload(client: GatewayClient, category: str, prefix: str) -> dict[str, str]:
    """Every stream's events in two appends each; returns each stream's last position."""
    positions: dict[str, str] = {}
    gate = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        stream = f"{prefix}-{i}"
        events = _stream_events(i)
        async with gate:
            await _append(client, category, stream, events[:10])
            positions[stream] = (await _append(client, category, stream, events[10:])).position

    await asyncio.gather(*(one(i) for i in range(STREAMS)))
    return positions


async def _check_fold(client: GatewayClient, prefix: str, positions: dict[str, str]) -> None:
    """Every document equals the fold; each Get waits for its own stream's last write."""
    gate = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        stream = f"{prefix}-{i}"
        async with gate:
            summary = await client.read_models.Get(
                rm.GetDocumentRequest(
                    read_model="summary", key=stream, min_position=positions[stream], wait_timeout_ms=60_000
                )
            )
            tally = await client.read_models.Get(
                rm.GetDocumentRequest(
                    read_model="tally", key=stream, min_position=positions[stream], wait_timeout_ms=60_000
                )
            )
        assert _data(summary) == _expected_summary(_stream_events(i)), stream
        assert summary.version == EVENTS_PER_STREAM
        assert json_format.MessageToDict(tally.data) == _expected_tally(_stream_events(i))

    await asyncio.gather(*(one(i) for i in range(STREAMS)))


async def _all_documents(client: GatewayClient, model: str, prefix: str) -> dict[str, rm.Document]:
    found: dict[str, rm.Document] = {}
    token = ""
    while True:
        page = await client.read_models.Query(
            rm.QueryRequest(
                read_model=model,
                filters=[
                    rm.Filter(
                        field="customer", op=rm.FILTER_OP_PREFIX, value=struct_pb2.Value(string_value="c-")
                    )
                ]
                if model == "summary"
                else [],
                limit=97,
                page_token=token,
            )
        )
        for document in page.documents:
            if document.key.startswith(prefix + "-"):
                assert document.key not in found, "a document came twice while paging"
                found[document.key] = document
        token = page.next_page_token
        if not token:
            return found


# --- tests --------------------------------------------------------------------------------------------


async def test_10000_events_over_500_streams_equal_the_fold(any_database: Deployment) -> None:
    gateway = await any_database.start()
    prefix = f"s{uuid.uuid4().hex[:6]}"
    async with GatewayClient(gateway.target) as client:
        positions = await _append_workload(client, any_database.category, prefix)
        await _check_fold(client, prefix, positions)
        documents = await _all_documents(client, "summary", prefix)
        assert len(documents) == STREAMS
        status = await client.read_models.GetStatus(rm.GetStatusRequest(read_model="summary"))
        assert status.state == rm.READ_MODEL_STATE_RUNNING and status.documents == STREAMS


async def test_read_your_writes_over_grpc_and_rest(deployment: Deployment) -> None:
    gateway = await deployment.start()
    stream = f"ryw-{uuid.uuid4().hex[:6]}"
    async with (
        GatewayClient(gateway.target) as client,
        httpx.AsyncClient(base_url=gateway.rest_url, timeout=30) as http,
    ):
        placed = await _append(
            client, deployment.category, stream, [("OrderPlaced", {"customer": "c-1", "total": 3})]
        )
        for n in range(1, 31):  # every append is visible to the very next read that names its position
            appended = await _append(
                client, deployment.category, stream, [("ItemAdded", {"item": f"i{n}", "qty": 1})]
            )
            if n % 2:
                document = await client.read_models.Get(
                    rm.GetDocumentRequest(read_model="summary", key=stream, min_position=appended.position)
                )
                count, version = int(json_format.MessageToDict(document.data)["item_count"]), document.version
            else:
                response = await http.get(
                    f"/v1/read-models/summary/documents/{stream}", params={"minPosition": appended.position}
                )
                assert response.status_code == 200, response.text
                body = response.json()
                count, version = int(body["data"]["item_count"]), int(body["version"])
            assert (count, version) == (n, n + 1)
        assert placed.position


async def test_a_gateway_killed_mid_projection_resumes_without_double_or_lost_events(
    deployment: Deployment,
) -> None:
    # One event per transaction makes the projection slow, so the kill lands in the middle of it.
    first = await deployment.start(KPG_READ_MODELS__BATCH_SIZE="1")
    prefix = f"k{uuid.uuid4().hex[:6]}"
    async with GatewayClient(first.target) as client:
        positions = await _append_workload(client, deployment.category, prefix)

        async def started() -> bool:
            status = await client.read_models.GetStatus(rm.GetStatusRequest(read_model="summary"))
            return status.documents > 0

        await eventually(started)
        status = await client.read_models.GetStatus(rm.GetStatusRequest(read_model="summary"))
    assert status.lag > 0, "the projection had already finished: the kill would prove nothing"
    first.kill()
    second = await deployment.start()
    async with GatewayClient(second.target) as client:
        await _check_fold(client, prefix, positions)


async def test_a_poison_event_goes_to_the_dlt_and_the_model_goes_on(
    deployment: Deployment, backends: Backends
) -> None:
    gateway = await deployment.start()
    stream = f"p-{uuid.uuid4().hex[:6]}"
    events: list[tuple[str, dict[str, Any]]] = [
        ("OrderPlaced", {"customer": "c-9", "total": 1}),
        ("ItemAdded", {"item": "ok", "qty": 2}),
        ("ItemAdded", {"item": "bad", "qty": "lots"}),  # increment by a string: fails every attempt
        ("ItemAdded", {"item": "after", "qty": 1}),
    ]
    async with GatewayClient(gateway.target) as client:
        written = [await _append(client, deployment.category, stream, [event]) for event in events]
        document = await client.read_models.Get(
            rm.GetDocumentRequest(read_model="summary", key=stream, min_position=written[-1].position)
        )
        assert (
            _data(document)
            == _expected_summary(events)
            == {
                "customer": "c-9",
                "total": 1,
                "status": "PLACED",
                "items": ["ok", "after"],
                "item_count": 2,
                "quantity": 3,
            }
        )
    async with httpx.AsyncClient(base_url=gateway.rest_url, timeout=30) as http:
        metrics = (await http.get("/metrics")).text
    assert (
        'kpg_projection_handler_failures_total{outcome="dead_lettered",read_model="summary"} 1.0' in metrics
    )
    assert 'kpg_projection_handler_failures_total{outcome="retried",read_model="summary"} 2.0' in metrics
    assert 'kpg_projection_lag_records{read_model="summary"}' in metrics
    dead = _read_dlt(backends, f"{deployment.topic}.DLT", count=1)
    assert len(dead) == 1
    key, value, headers = dead[0]
    assert (key, json.loads(value)) == (stream.encode(), {"item": "bad", "qty": "lots"})
    assert headers["kpg-dlt-original-topic"] == deployment.topic.encode()
    assert int(headers["kpg-dlt-original-offset"]) == written[2].first_offset
    assert int(headers["kpg-dlt-original-partition"]) == written[2].partition
    assert headers["kpg-dlt-consumer-group"].startswith(b"kpg-rm-")
    assert headers["kpg-dlt-attempts"] == b"3"
    assert b"not a sum of numbers" in headers["kpg-dlt-error-message"]
    assert headers["kpg-dlt-error-class"] and headers["kpg-dlt-stacktrace"] and headers["kpg-dlt-failed-at"]
    assert headers["ce_type"] == b"ItemAdded"  # the original headers travel along


def _read_dlt(backends: Backends, topic: str, *, count: int) -> list[tuple[bytes, bytes, dict[str, bytes]]]:
    consumer = Consumer(
        {
            "bootstrap.servers": backends.bootstrap_servers,
            "group.id": f"check-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, 0) for p in metadata.partitions])
        found = []
        for _ in range(30):
            for message in consumer.consume(100, 1.0):
                if message.error() is None:
                    headers = dict(cast("list[tuple[str, bytes]]", message.headers() or []))
                    found.append((message.key() or b"", message.value() or b"", headers))
            if len(found) >= count:
                break
        return found
    finally:
        consumer.close()


async def test_rebuild_while_appends_continue(deployment: Deployment) -> None:
    gateway = await deployment.start()
    prefix = f"r{uuid.uuid4().hex[:6]}"
    async with GatewayClient(gateway.target) as client:
        positions = await _append_workload(client, deployment.category, prefix)
        await _check_fold(client, prefix, positions)

        stop = asyncio.Event()
        live: list[tuple[str, str]] = []
        query_failures: list[BaseException] = []
        states: set[int] = set()
        rebuilt_documents: list[int] = []

        async def keep_appending() -> None:
            n = 0
            while not stop.is_set():
                stream = f"{prefix}-live-{n % 25}"
                written = await _append(
                    client, deployment.category, stream, [("OrderPlaced", {"customer": "c-live", "total": n})]
                )
                live.append((stream, written.position))
                n += 1

        async def keep_querying() -> None:
            while not stop.is_set():
                try:
                    page = await client.read_models.Query(rm.QueryRequest(read_model="summary", limit=50))
                    assert page.documents
                    status = await client.read_models.GetStatus(rm.GetStatusRequest(read_model="summary"))
                    states.add(status.state)
                    if status.state == rm.READ_MODEL_STATE_REBUILDING:
                        rebuilt_documents.append(status.rebuild.documents)
                except (grpc.aio.AioRpcError, AssertionError) as exc:
                    query_failures.append(exc)
                await asyncio.sleep(0.02)

        workers = [asyncio.create_task(keep_appending()), asyncio.create_task(keep_querying())]
        rebuilding = await client.read_models.Rebuild(rm.RebuildRequest(read_model="summary"))
        assert rebuilding.state == rm.READ_MODEL_STATE_REBUILDING

        async def swapped() -> bool:
            status = await client.read_models.GetStatus(rm.GetStatusRequest(read_model="summary"))
            return status.state == rm.READ_MODEL_STATE_RUNNING

        await eventually(swapped, timeout_s=120, interval_s=0.2)
        await asyncio.sleep(0.5)  # appends go on after the swap too
        stop.set()
        await asyncio.gather(*workers)
        assert not query_failures, query_failures[:3]
        assert rm.READ_MODEL_STATE_REBUILDING in states
        assert rebuilt_documents and rebuilt_documents == sorted(rebuilt_documents)  # progress only grows

        await _check_fold(client, prefix, positions)
        last = {stream: position for stream, position in live}
        for stream, position in last.items():
            document = await client.read_models.Get(
                rm.GetDocumentRequest(read_model="summary", key=stream, min_position=position)
            )
            totals = [n for n, (s, _) in enumerate(live) if s == stream]
            assert _data(document) == {"customer": "c-live", "total": totals[-1], "status": "PLACED"}
        status = await client.read_models.GetStatus(rm.GetStatusRequest(read_model="summary"))
        assert status.documents == STREAMS + len(last)


async def test_error_rows_over_grpc_and_rest(deployment: Deployment) -> None:
    gateway = await deployment.start()
    far = Position(deployment.topic, {0: 10**12}).encode()
    grpc_cases = [
        (rm.GetDocumentRequest(read_model="nope", key="k"), "NOT_FOUND", grpc.StatusCode.NOT_FOUND),
        (rm.GetDocumentRequest(read_model="summary", key="missing"), "NOT_FOUND", grpc.StatusCode.NOT_FOUND),
        (
            rm.GetDocumentRequest(read_model="summary", key="k", min_position=far, wait_timeout_ms=200),
            "READ_MODEL_BEHIND",
            grpc.StatusCode.DEADLINE_EXCEEDED,
        ),
        (
            rm.GetDocumentRequest(read_model="summary", key="k", min_position="junk"),
            "INVALID_ARGUMENT",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]
    async with GatewayClient(gateway.target) as client:
        for request, reason, code in grpc_cases:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await client.read_models.Get(request)
            assert (error_details(raised.value).reason, raised.value.code()) == (reason, code), request
        with pytest.raises(grpc.aio.AioRpcError) as bad_filter:
            await client.read_models.Query(
                rm.QueryRequest(read_model="summary", filters=[rm.Filter(field="a b", op=rm.FILTER_OP_EQ)])
            )
        assert error_details(bad_filter.value).reason == "INVALID_ARGUMENT"
    async with httpx.AsyncClient(base_url=gateway.rest_url, timeout=30) as http:
        rest_cases = [
            (await http.get("/v1/read-models/nope"), 404, "NOT_FOUND"),
            (await http.get("/v1/read-models/summary/documents/missing"), 404, "NOT_FOUND"),
            (
                await http.get(
                    "/v1/read-models/summary/documents/k", params={"minPosition": far, "waitTimeoutMs": 200}
                ),
                504,
                "READ_MODEL_BEHIND",
            ),
            (
                await http.post(
                    "/v1/read-models/summary/query", json={"filters": [{"field": "x", "op": "NOPE"}]}
                ),
                400,
                "INVALID_ARGUMENT",
            ),
            (await http.post("/v1/read-models/summary/query", json={"limit": 5000}), 400, "INVALID_ARGUMENT"),
        ]
        for response, status, reason in rest_cases:
            assert (response.status_code, response.json()["error"]["reason"]) == (status, reason), (
                response.text
            )


async def test_rest_query_list_and_status(deployment: Deployment) -> None:
    gateway = await deployment.start()
    prefix = f"q{uuid.uuid4().hex[:6]}"
    async with GatewayClient(gateway.target) as client:
        positions = [
            (
                await _append(
                    client,
                    deployment.category,
                    f"{prefix}-{i}",
                    [("OrderPlaced", {"customer": f"{prefix}-c", "total": total})],
                )
            ).position
            for i, total in enumerate([5, 50, 500])
        ]
        # An append's position names its own partition only (API.md): the streams' partitions are applied
        # independently (by different workers, even), so each earlier write is waited for on its own.
        for i, position in enumerate(positions[:-1]):
            await client.read_models.Get(
                rm.GetDocumentRequest(read_model="summary", key=f"{prefix}-{i}", min_position=position)
            )
        last = positions[-1]
    async with httpx.AsyncClient(base_url=gateway.rest_url, timeout=30) as http:
        response = await http.post(
            "/v1/read-models/summary/query",
            json={
                "filters": [
                    {"field": "customer", "op": "EQ", "value": f"{prefix}-c"},
                    {"field": "total", "op": "GTE", "value": 10},
                ],
                "orderBy": "total",
                "descending": True,
                "minPosition": last,
            },
        )
        assert response.status_code == 200, response.text
        assert [d["data"]["total"] for d in response.json()["documents"]] == [500, 50]
        models = (await http.get("/v1/read-models")).json()["readModels"]
        assert {m["readModel"] for m in models} == {"summary", "tally"}
        status = (await http.get("/v1/read-models/summary")).json()
        assert status["state"] == "READ_MODEL_STATE_RUNNING" and status["category"] == deployment.category


async def test_two_gateways_on_one_postgresql_apply_every_event_once(
    backends: Backends, tmp_path: Path, repo_root: Path, postgres_url: str
) -> None:
    """Both instances run the model's consumer group: each event is applied by exactly one of them (an
    increment applied twice, or lost, would show in the fold)."""
    deployment = _new_deployment(backends, tmp_path, repo_root, fresh_postgres_database(postgres_url))
    try:
        first = await deployment.start()
        second = await deployment.start()
        prefix = f"two{uuid.uuid4().hex[:6]}"
        async with GatewayClient(first.target) as one, GatewayClient(second.target) as other:
            positions = await _append_workload(one, deployment.category, prefix)
            await _check_fold(other, prefix, positions)
            applied = [await _applied_by(g, "summary") for g in (first, second)]
        assert all(n > 0 for n in applied), f"one instance did all the work: {applied}"
        assert sum(applied) == STREAMS * EVENTS_PER_STREAM  # once in total, not once per instance
    finally:
        deployment.kill_all()


async def _applied_by(gateway: GatewayProcess, model: str) -> float:
    """kpg_projection_events_applied_total of one instance, from its /metrics."""
    async with httpx.AsyncClient(base_url=gateway.rest_url, timeout=30) as http:
        text = (await http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(f'kpg_projection_events_applied_total{{read_model="{model}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
