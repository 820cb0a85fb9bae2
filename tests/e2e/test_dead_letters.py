"""DLT reprocessing through a running gateway (issue 11's "done when"), on the real broker and Redis:
- a projection's poison event is dead-lettered with its metadata and the projection goes on; once the
  handler is fixed (a gateway started with the fixed one), Reprocess brings the event into that read model
  exactly once, a second Reprocess skips it, and no other consumer of the topic sees it twice;
- Spring Kafka's and the JSON envelope's dead letters (written here with a plain producer) are listed with
  their original topic, partition, offset and error, and reprocess to their original topic and partition;
- 10,000 dead letters reprocessed with the gateway SIGKILLed half-way and the same call run again end as
  exactly 10,000 records on the target topic;
- the REST routes, the contract's errors and the metrics.
(A saga that ended FAILED is listed from kpg.sagas.DLT in tests/e2e/test_sagas.py.)
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import uuid
from collections.abc import AsyncIterator, Awaitable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import grpc
import httpx
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from google.protobuf import json_format
from kpg import GatewayClient, error_details
from kpg.v1 import dead_letters_pb2 as dl
from kpg.v1 import event_store_pb2 as es
from kpg.v1 import read_models_pb2 as rm

from gateway.adapters.kafka import KafkaAdmin, TopicSpec
from gateway.domain.dead_letters import Failure, dlt_headers
from tests.conftest import Backends
from tests.support import SERVING, GatewayProcess, eventually, wait_for_health

pytestmark = pytest.mark.e2e

FAILED_AT = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def _definitions(category: str, tally: str) -> str:
    return f"""
categories:
  {category}: {{partitions: 3}}
read_models:
  tally:
    category: {category}
    python: tests.e2e.projections:{tally}
  counter:
    category: {category}
    handlers:
      Created: {{increment: {{n: 1}}}}
      Explode: {{increment: {{n: 1}}}}
      Updated: {{increment: {{n: 1}}}}
      StreamClosed: {{delete: true}}
"""


class Gateways:
    """Gateway processes of one test sharing one state folder (so one SQLite database) and one DLT
    state topic of their own."""

    def __init__(self, backends: Backends, workdir: Path, repo_root: Path, unique: str) -> None:
        self.backends = backends
        self.workdir = workdir
        self.repo_root = repo_root
        self.state_topic = f"{unique}.dlt.state"
        self.processes: list[GatewayProcess] = []

    async def start(
        self, definitions: Path | None = None, env: Mapping[str, str] | None = None
    ) -> GatewayProcess:
        args = ["--definitions", str(definitions)] if definitions else []
        process = GatewayProcess(
            self.workdir,
            env={
                "KPG_KAFKA__BOOTSTRAP_SERVERS": self.backends.bootstrap_servers,
                "KPG_REDIS__URL": self.backends.redis_url,
                "KPG_READ_MODELS__HANDLER_BACKOFF_MS": "10",
                "KPG_DEAD_LETTERS__STATE_TOPIC": self.state_topic,
                "PYTHONPATH": str(self.repo_root),
                **(env or {}),
            },
            args=args,
        ).start()
        self.processes.append(process)
        await wait_for_health(process.target, SERVING, process=process)
        return process


@pytest.fixture
async def gateways(
    backends: Backends, tmp_path: Path, repo_root: Path, unique: str
) -> AsyncIterator[Gateways]:
    started = Gateways(backends, tmp_path, repo_root, unique)
    yield started
    for process in started.processes:
        process.kill()


async def _append(
    client: GatewayClient, category: str, stream: str, event_type: str
) -> es.AppendEventsResponse:
    return await client.events.AppendEvents(
        es.AppendEventsRequest(
            category=category,
            stream_id=stream,
            events=[es.EventData(type=event_type, data=json.dumps({"what": event_type}).encode())],
        )
    )


async def _document(client: GatewayClient, model: str, key: str, position: str = "") -> dict[str, Any]:
    document = await client.read_models.Get(
        rm.GetDocumentRequest(read_model=model, key=key, min_position=position)
    )
    return json_format.MessageToDict(document.data)


async def test_a_poison_event_is_dead_lettered_and_once_fixed_reprocessed_into_its_read_model_once(
    gateways: Gateways, tmp_path: Path
) -> None:
    category = f"dl{uuid.uuid4().hex[:8]}"
    dlt = f"{category}.events.DLT"
    broken, fixed = tmp_path / "broken.yaml", tmp_path / "fixed.yaml"
    broken.write_text(_definitions(category, "tally"))
    fixed.write_text(_definitions(category, "tally_fixed"))

    gateway = await gateways.start(broken)
    async with GatewayClient(gateway.target) as client:
        written = [await _append(client, category, "s-1", t) for t in ["Created", "Explode", "Updated"]]
        # s-2's documents are deleted after its poison event: versions no longer tell what was applied.
        for event_type in ["Created", "Explode", "StreamClosed"]:
            closed = await _append(client, category, "s-2", event_type)
        # The projection went on past the poison event, which is on the DLT before its offset moved on.
        assert await _document(client, "tally", "s-1", written[-1].position) == {
            "events": 2.0,
            "types": {"Created": 1.0, "Updated": 1.0},
        }
        assert (await _document(client, "counter", "s-1", written[-1].position))["n"] == 3.0
        await _document(client, "tally", "s-1", closed.position)  # both models are past s-2's events
        await _document(client, "counter", "s-1", closed.position)
        page = await client.dead_letters.ListDeadLetters(dl.ListDeadLettersRequest(dlt_topic=dlt))
    [letter, closed_letter] = sorted(page.dead_letters, key=lambda d: d.key)
    assert closed_letter.key == b"s-2"
    assert (letter.original_topic, letter.original_partition, letter.original_offset) == (
        f"{category}.events",
        written[1].partition,
        written[1].first_offset,
    )
    assert letter.error_class == "builtins.RuntimeError" and "cannot tally" in letter.error_message
    assert "Traceback" in letter.stack_trace and letter.consumer_group.startswith("kpg-rm-")
    assert (letter.attempts, letter.state, letter.format) == (
        3,
        dl.DEAD_LETTER_STATE_NEW,
        dl.DEAD_LETTER_FORMAT_KPG,
    )
    assert letter.key == b"s-1" and json.loads(letter.payload) == {"what": "Explode"}
    assert letter.headers["ce_type"] == b"Explode"
    async with httpx.AsyncClient(base_url=gateway.rest_url) as http:
        metrics = (await http.get("/metrics")).text
    assert (
        f'kpg_dead_letters_written_total{{consumer_group="{letter.consumer_group}",dlt_topic="{dlt}"}} 2.0'
        in metrics
    )

    gateway.terminate()  # the fix is deployed
    gateway = await gateways.start(fixed)
    async with GatewayClient(gateway.target) as client:
        first = await client.dead_letters.Reprocess(dl.ReprocessRequest(dlt_topic=dlt))
        assert (first.selected, first.reprocessed, first.skipped, first.failed) == (2, 2, 0, 0)

        async def replayed() -> bool:
            return bool((await _document(client, "tally", "s-1"))["events"] == 3.0)

        await eventually(replayed)
        second = await client.dead_letters.Reprocess(dl.ReprocessRequest(dlt_topic=dlt))
        assert (second.selected, second.reprocessed, second.skipped) == (2, 0, 2)
        again = await client.dead_letters.GetDeadLetter(
            dl.GetDeadLetterRequest(dlt_topic=dlt, partition=letter.partition, offset=letter.offset)
        )
        assert (again.state, again.reprocess_count) == (dl.DEAD_LETTER_STATE_REPROCESSED, 1)

        # An event appended after the replay, on the same partition, is applied after it: by then a
        # second application of the replay (or one by the counter, which had applied the original) shows.
        last = await _append(client, category, "s-1", "Updated")
        assert await _document(client, "tally", "s-1", last.position) == {
            "events": 4.0,
            "types": {"Created": 1.0, "Explode": 1.0, "Updated": 2.0},
        }
        assert (await _document(client, "counter", "s-1", last.position))["n"] == 4.0
        # The counter, which had applied s-2's Explode before deleting, does not apply it again; tally
        # folds it onto the deleted document, as a replay out of order does.
        reopened = await _append(client, category, "s-2", "Updated")
        assert await _document(client, "counter", "s-2", reopened.position) == {"n": 1.0}
        assert await _document(client, "tally", "s-2", reopened.position) == {
            "events": 2.0,
            "types": {"Explode": 1.0, "Updated": 1.0},
        }
        stream = await client.events.ReadStream(es.ReadStreamRequest(category=category, stream_id="s-1"))
        # The replays are no new events: neither reads nor subscribers see them.
        seen: dict[str, list[int]] = {"s-1": [], "s-2": []}
        async with asyncio.timeout(30):
            async for event in client.events.Subscribe(es.SubscribeRequest(category=category)):
                seen[event.stream_id].append(event.version)
                if sum(map(len, seen.values())) == 8:
                    break
    assert [e.version for e in stream.events] == [1, 2, 3, 4]
    assert seen == {"s-1": [1, 2, 3, 4], "s-2": [1, 2, 3, 4]}


# --- Spring Kafka and the JSON envelope ------------------------------------------------------------------


def _spring_headers(original_topic: str, group: str) -> list[tuple[str, str | bytes | None]]:
    return [
        ("x-app", b"checkout"),
        ("kafka_dlt-original-topic", original_topic.encode()),
        ("kafka_dlt-original-partition", struct.pack(">i", 2)),
        ("kafka_dlt-original-offset", struct.pack(">q", 41)),
        ("kafka_dlt-original-timestamp", struct.pack(">q", 1_764_000_000_000)),
        ("kafka_dlt-original-timestamp-type", b"CreateTime"),
        ("kafka_dlt-original-consumer-group", group.encode()),
        ("kafka_dlt-exception-fqcn", b"org.springframework.kafka.listener.ListenerExecutionFailedException"),
        ("kafka_dlt-exception-cause-fqcn", b"java.lang.IllegalStateException"),
        ("kafka_dlt-exception-message", b"card declined"),
        ("kafka_dlt-exception-stacktrace", b"java.lang.IllegalStateException: card declined\n\tat ..."),
    ]


@pytest.fixture
async def foreign(backends: Backends, unique: str) -> tuple[str, str]:
    """A Spring Kafka DLT and a JSON-envelope DLT, one record each, and the topics they came from."""
    payments, billing = f"{unique}.payments", f"{unique}.billing"
    await KafkaAdmin(backends.kafka()).ensure_topics(
        [
            TopicSpec(payments, 3),
            TopicSpec(f"{payments}.DLT", 1),
            TopicSpec(billing, 2),
            TopicSpec(f"{billing}.DLT", 1),
        ]
    )
    envelope = {
        "originalTopic": billing,
        "originalPartition": 1,
        "originalOffset": 7,
        "originalTimestamp": 1_764_000_000_123,
        "consumerGroup": "billing-svc",
        "errorClass": "TypeError",
        "errorMessage": "invoice.total is undefined",
        "stackTrace": "TypeError: invoice.total is undefined\n    at bill (bill.js:3)",
        "payload": {"invoice": 9},
    }
    producer = Producer({"bootstrap.servers": backends.bootstrap_servers})
    producer.produce(
        f"{payments}.DLT", b'{"payment": 1}', key=b"p-1", headers=_spring_headers(payments, "payments-svc")
    )
    producer.produce(f"{billing}.DLT", json.dumps(envelope).encode(), key=b"inv-9")
    assert producer.flush(10) == 0
    return payments, billing


def _read_to_end(backends: Backends, topic: str) -> list[tuple[int, bytes, bytes, dict[str, bytes]]]:
    """Every committed record of `topic` (partition, key, value, headers), read up to its end."""
    consumer = Consumer(
        {
            "bootstrap.servers": backends.bootstrap_servers,
            "group.id": f"check-{uuid.uuid4()}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions
        }
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        found = []
        for _ in range(600):
            for message in consumer.consume(1000, 0.1):
                if message.error() is None:
                    raw = cast("list[tuple[str, bytes | None]]", message.headers() or [])
                    headers = {name: value or b"" for name, value in raw}
                    found.append(
                        (message.partition() or 0, message.key() or b"", message.value() or b"", headers)
                    )
            positions = consumer.position([TopicPartition(topic, p) for p in partitions])
            if all(tp.offset >= ends[tp.partition] for tp in positions if ends[tp.partition] > 0):
                return found
        raise AssertionError(f"{topic} not read to its end")
    finally:
        consumer.close()


async def test_spring_and_json_envelope_dead_letters_are_listed_and_go_back_where_they_came_from(
    gateway: GatewayProcess, backends: Backends, foreign: tuple[str, str]
) -> None:
    payments, billing = foreign
    async with GatewayClient(gateway.target) as client:
        page = await client.dead_letters.ListDeadLetters(
            dl.ListDeadLettersRequest(dlt_topic=f"{payments}.DLT")
        )
        [spring] = page.dead_letters
        assert spring.format == dl.DEAD_LETTER_FORMAT_SPRING
        assert (spring.original_topic, spring.original_partition, spring.original_offset) == (payments, 2, 41)
        assert spring.original_timestamp.ToMilliseconds() == 1_764_000_000_000
        assert spring.error_class == "org.springframework.kafka.listener.ListenerExecutionFailedException"
        assert (spring.error_message, spring.consumer_group) == ("card declined", "payments-svc")
        assert spring.stack_trace.startswith("java.lang.IllegalStateException: card declined")
        result = await client.dead_letters.Reprocess(dl.ReprocessRequest(dlt_topic=f"{payments}.DLT"))
        assert (result.selected, result.reprocessed) == (1, 1)

    async with httpx.AsyncClient(base_url=gateway.rest_url, timeout=30) as http:
        listed = (await http.get(f"/v1/dead-letters/{billing}.DLT")).json()
        [envelope] = listed["deadLetters"]
        assert envelope["format"] == "DEAD_LETTER_FORMAT_JSON_ENVELOPE"
        assert (envelope["originalTopic"], envelope["originalPartition"], envelope["originalOffset"]) == (
            billing,
            1,
            "7",
        )
        assert (envelope["errorClass"], envelope["errorMessage"]) == (
            "TypeError",
            "invoice.total is undefined",
        )
        assert envelope["consumerGroup"] == "billing-svc" and envelope["state"] == "DEAD_LETTER_STATE_NEW"
        assert base64.b64decode(envelope["payload"]) == b'{"invoice":9}'
        assert envelope["id"] == f"{billing}.DLT:0:0" and listed["nextPageToken"] == ""
        one = (await http.get(f"/v1/dead-letters/{billing}.DLT/0/0")).json()
        assert one["id"] == envelope["id"]
        reprocessed = await http.post(f"/v1/dead-letters/{billing}.DLT/reprocess", json={})
        assert reprocessed.json() == {"selected": 1, "reprocessed": 1, "skipped": 0, "failed": 0}
        again = await http.post(f"/v1/dead-letters/{billing}.DLT/reprocess", json={"ids": [envelope["id"]]})
        assert again.json() == {"selected": 1, "reprocessed": 0, "skipped": 1, "failed": 0}
        state = (await http.get(f"/v1/dead-letters/{billing}.DLT", params={"state": "REPROCESSED"})).json()
        assert [d["reprocessCount"] for d in state["deadLetters"]] == [1]
        metrics = (await http.get("/metrics")).text
    assert (
        f'kpg_dead_letters_reprocessed_total{{dlt_topic="{billing}.DLT",outcome="reprocessed"}} 1.0'
        in metrics
    )
    assert f'kpg_dead_letters_reprocessed_total{{dlt_topic="{billing}.DLT",outcome="skipped"}} 1.0' in metrics

    [(partition, key, value, headers)] = _read_to_end(backends, payments)
    assert (partition, key, value) == (2, b"p-1", b'{"payment": 1}')
    assert headers["x-app"] == b"checkout" and not [h for h in headers if h.startswith("kafka_dlt-")]
    assert headers["kpg-replayed-from"] == f"{payments}.DLT:0:0".encode()
    assert (headers["kpg-replay-count"], headers["kpg-replay-consumer-group"]) == (b"1", b"payments-svc")
    [(partition, key, value, headers)] = _read_to_end(backends, billing)
    assert (partition, key, value) == (1, b"inv-9", b'{"invoice":9}')
    assert headers["kpg-replayed-from"] == f"{billing}.DLT:0:0".encode()


async def test_discard_and_the_contract_errors_over_grpc_and_rest(
    gateway: GatewayProcess, foreign: tuple[str, str]
) -> None:
    payments, _ = foreign
    dlt = f"{payments}.DLT"
    async with GatewayClient(gateway.target) as client:
        discarded = await client.dead_letters.Discard(
            dl.DiscardRequest(dlt_topic=dlt, ids=[f"{dlt}:0:0"], reason="refunded by hand")
        )
        assert discarded.discarded == 1
        skipped = await client.dead_letters.Reprocess(dl.ReprocessRequest(dlt_topic=dlt))
        assert (skipped.reprocessed, skipped.skipped) == (0, 1)
        errors = {}
        calls: dict[str, Awaitable[object]] = {
            "not allowed": client.dead_letters.Reprocess(
                dl.ReprocessRequest(dlt_topic=dlt, target_topic="kpg.sagas.DLT")
            ),
            "no such record": client.dead_letters.GetDeadLetter(
                dl.GetDeadLetterRequest(dlt_topic=dlt, offset=99)
            ),
            "not a DLT": client.dead_letters.ListDeadLetters(dl.ListDeadLettersRequest(dlt_topic=payments)),
            "no reason": client.dead_letters.Discard(dl.DiscardRequest(dlt_topic=dlt, ids=[f"{dlt}:0:0"])),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            errors[name] = error_details(raised.value)
    assert (errors["not allowed"].code, errors["not allowed"].reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "TOPIC_NOT_ALLOWED",
    )
    assert (errors["no such record"].code, errors["no such record"].reason) == (
        grpc.StatusCode.NOT_FOUND,
        "NOT_FOUND",
    )
    assert (
        errors["not a DLT"].reason == "INVALID_ARGUMENT"
        and "dlt_topic" in errors["not a DLT"].field_violations
    )
    assert (
        errors["no reason"].reason == "INVALID_ARGUMENT" and "reason" in errors["no reason"].field_violations
    )

    async with httpx.AsyncClient(base_url=gateway.rest_url, timeout=30) as http:
        listed = (await http.get(f"/v1/dead-letters/{dlt}", params={"state": "DISCARDED"})).json()
        forbidden = await http.post(
            f"/v1/dead-letters/{dlt}/reprocess", json={"targetTopic": "__consumer_offsets"}
        )
        missing = await http.post(
            f"/v1/dead-letters/{dlt}/discard", json={"ids": [f"{dlt}:0:5"], "reason": "x"}
        )
        bad_state = await http.get(f"/v1/dead-letters/{dlt}", params={"state": "LOST"})
        topics = (await http.get("/v1/dead-letters")).json()
    assert [d["state"] for d in listed["deadLetters"]] == ["DEAD_LETTER_STATE_DISCARDED"]
    assert (forbidden.status_code, forbidden.json()["error"]["reason"]) == (403, "TOPIC_NOT_ALLOWED")
    assert (missing.status_code, missing.json()["error"]["reason"]) == (404, "NOT_FOUND")
    assert (bad_state.status_code, bad_state.json()["error"]["reason"]) == (400, "INVALID_ARGUMENT")
    assert {"topic": dlt, "partitions": 1, "recordCount": "1"} in topics["topics"]


# --- 10,000 with a kill half-way ---------------------------------------------------------------------------


async def test_ten_thousand_dead_letters_end_as_exactly_ten_thousand_records_despite_a_kill_half_way(
    gateways: Gateways, backends: Backends, unique: str
) -> None:
    count = 10_000
    source, dlt = f"{unique}.bulk", f"{unique}.bulk.DLT"
    admin = KafkaAdmin(backends.kafka())
    await admin.ensure_topics([TopicSpec(source, 3), TopicSpec(dlt, 3)])
    producer = Producer({"bootstrap.servers": backends.bootstrap_servers, "linger.ms": 20})
    for i in range(count):
        failure = Failure(source, i % 3, i // 3, None, "bulk-svc", "ValueError", "bad", "", 1, FAILED_AT)
        producer.produce(dlt, b"record %d" % i, key=b"k-%d" % i, headers=list(dlt_headers([], failure)))
        if i % 1000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0

    # Small transactions, so the kill lands between two of them.
    env = {"KPG_DEAD_LETTERS__BATCH_SIZE": "50"}
    gateway = await gateways.start(env=env)
    async with GatewayClient(gateway.target) as client:
        call = asyncio.ensure_future(client.dead_letters.Reprocess(dl.ReprocessRequest(dlt_topic=dlt)))
        async with asyncio.timeout(60):
            while sum(high for _, high in (await admin.watermarks(source)).values()) < count // 3:
                assert not call.done(), "Reprocess ended before the kill"
                await asyncio.sleep(0.01)
        gateway.kill()
        with pytest.raises(grpc.aio.AioRpcError):
            await call

    gateway = await gateways.start(env=env)
    async with GatewayClient(gateway.target) as client:
        rerun = await client.dead_letters.Reprocess(dl.ReprocessRequest(dlt_topic=dlt))
    assert (rerun.selected, rerun.failed) == (count, 0)
    assert 0 < rerun.skipped < count and rerun.reprocessed + rerun.skipped == count  # the kill was half-way

    records = _read_to_end(backends, source)
    replayed_from = {headers["kpg-replayed-from"] for _, _, _, headers in records}
    assert (len(records), len(replayed_from)) == (count, count)
    assert {(p, key) for p, key, _, _ in records} == {(i % 3, b"k-%d" % i) for i in range(count)}
