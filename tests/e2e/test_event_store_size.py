"""append-event at the size limits: an event of exactly 1 MiB, one just over librdkafka's default
message.max.bytes, one byte over the limit, appends at the 4 MiB limit, and small appends that share a
Kafka transaction with large ones. What landed is read back with a plain read_committed consumer."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import cast

import grpc
import httpx
import pytest
from confluent_kafka import IsolationLevel, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]
from kpg import GatewayClient, error_details
from kpg.v1 import event_store_pb2 as es

from gateway.domain.events import partition_for
from tests.conftest import Backends
from tests.support import GatewayProcess, checking_consumer

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024
LIBRDKAFKA_DEFAULT_MESSAGE_MAX_BYTES = 1_000_000
APPEND_LIMIT = 4 * MIB
TOPIC = "orders.events"
PARTITIONS = 6  # orders in examples/definitions.yaml
OCTETS = "application/octet-stream"


@asynccontextmanager
async def _client(gateway: GatewayProcess) -> AsyncIterator[GatewayClient]:
    """The generated client on a channel that sends and receives more than gRPC's 4 MiB default."""
    channel = grpc.aio.insecure_channel(
        gateway.target,
        options=[("grpc.max_send_message_length", 16 * MIB), ("grpc.max_receive_message_length", 16 * MIB)],
    )
    async with GatewayClient(gateway.target, channel=channel) as client:
        yield client


def _stream(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _event(data: bytes, *, content_type: str = OCTETS, **metadata: str) -> es.EventData:
    return es.EventData(
        event_id=str(uuid.uuid4()), type="Blob", data=data, content_type=content_type, metadata=metadata
    )


def _append(stream: str, *events: es.EventData) -> es.AppendEventsRequest:
    return es.AppendEventsRequest(category="orders", stream_id=stream, events=events)


@dataclass(frozen=True)
class _Record:
    offset: int
    key: bytes
    value: bytes
    headers: dict[str, bytes]

    @property
    def size(self) -> int:
        """Key, value and headers: what the gateway counts of a record."""
        return (
            len(self.key) + len(self.value) + sum(len(n.encode()) + len(v) for n, v in self.headers.items())
        )


def _end_offset(backends: Backends, partition: int) -> int:
    """Where a read_committed reader of the partition ends now (its last stable offset)."""
    admin = AdminClient({"bootstrap.servers": backends.bootstrap_servers})
    tp = TopicPartition(TOPIC, partition)
    futures = admin.list_offsets(
        {tp: OffsetSpec.latest()},  # type: ignore[no-untyped-call]
        isolation_level=IsolationLevel.READ_COMMITTED,
    )
    return int(futures[tp].result().offset)


def _read(backends: Backends, partition: int, start: int, last: int) -> dict[int, _Record]:
    """Every record a read_committed consumer sees in the partition from `start` through `last` (the
    offset of a record known to be committed), by offset."""
    consumer = checking_consumer(backends.bootstrap_servers)
    try:
        consumer.assign([TopicPartition(TOPIC, partition, start)])
        found: dict[int, _Record] = {}
        deadline = time.monotonic() + 60
        while last not in found:
            assert time.monotonic() < deadline, f"offset {last} of {TOPIC}[{partition}] never came"
            for m in consumer.consume(100, 1.0):
                assert m.error() is None, m.error()
                offset = cast("int", m.offset())
                if offset <= last:
                    headers = dict(cast("list[tuple[str, bytes]]", m.headers() or []))
                    found[offset] = _Record(offset, m.key() or b"", m.value() or b"", headers)
        return found
    finally:
        consumer.close()


async def _records_of(
    backends: Backends, response: es.AppendEventsResponse, start: int | None = None
) -> list[_Record]:
    """The records of the response's stream from `start` (default: its first offset) through its last."""
    begin = response.first_offset if start is None else start
    found = await asyncio.to_thread(_read, backends, response.partition, begin, response.last_offset)
    return [found[o] for o in sorted(found) if found[o].key == found[response.last_offset].key]


def _assert_landed(
    records: list[_Record], stream: str, first_version: int, events: Iterable[es.EventData]
) -> None:
    """The records are the events, whole, at consecutive versions from `first_version`."""
    events = list(events)
    assert len(records) == len(events)
    for i, (record, event) in enumerate(zip(records, events, strict=True)):
        assert record.key == stream.encode()
        assert len(record.value) == len(event.data) and record.value == event.data, f"event {i} changed"
        assert record.headers["ce_id"] == event.event_id.encode()
        assert record.headers["ce_streamversion"] == str(first_version + i).encode()
        assert record.headers["content-type"] == event.content_type.encode()
        assert {k: v.decode() for k, v in record.headers.items() if k.startswith("kpg-meta-")} == {
            f"kpg-meta-{k}": v for k, v in event.metadata.items()
        }


async def _too_large(client: GatewayClient, request: es.AppendEventsRequest) -> dict[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.events.AppendEvents(request, timeout=60)
    details = error_details(raised.value)
    assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "PAYLOAD_TOO_LARGE"), details
    return details.metadata


def _json_string(size: int) -> bytes:
    """A JSON string value of exactly `size` bytes (quotes included)."""
    body = secrets.token_hex(size)[: size - 2]
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    "content_type, data",
    [(OCTETS, os.urandom(MIB)), ("application/json", _json_string(MIB))],
    ids=["octets", "json"],
)
async def test_an_event_of_exactly_1_mib_lands_whole(
    gateway: GatewayProcess, backends: Backends, content_type: str, data: bytes
) -> None:
    assert len(data) == MIB
    stream = _stream("mib")
    event = _event(
        data, content_type=content_type, tenant="acme", trace="t-" + uuid.uuid4().hex, size=str(MIB)
    )
    async with _client(gateway) as client:
        response = await client.events.AppendEvents(_append(stream, event), timeout=60)
    assert (response.first_version, response.last_version, response.duplicate) == (1, 1, False)
    assert (response.topic, response.partition) == (TOPIC, partition_for(stream, PARTITIONS))
    records = await _records_of(backends, response)
    _assert_landed(records, stream, 1, [event])
    assert len(records[0].value) == 1_048_576


async def test_an_event_over_librdkafkas_default_message_max_bytes_lands(
    gateway: GatewayProcess, backends: Backends
) -> None:
    stream = _stream("mb")
    event = _event(os.urandom(LIBRDKAFKA_DEFAULT_MESSAGE_MAX_BYTES + 1))
    async with _client(gateway) as client:
        response = await client.events.AppendEvents(_append(stream, event), timeout=60)
    assert (response.first_version, response.duplicate) == (1, False)
    _assert_landed(await _records_of(backends, response), stream, 1, [event])


async def test_an_event_one_byte_over_1_mib_is_payload_too_large(
    gateway: GatewayProcess, backends: Backends
) -> None:
    stream = _stream("over")
    partition = partition_for(stream, PARTITIONS)
    start = await asyncio.to_thread(_end_offset, backends, partition)
    over = os.urandom(MIB + 1)
    async with _client(gateway) as client:
        metadata = await _too_large(client, _append(stream, _event(over)))
        assert metadata == {"limit": str(MIB), "field": "events[0].data"}
    url = f"/v1/streams/orders/{stream}/events"
    async with httpx.AsyncClient(base_url=gateway.rest_url, timeout=60) as http:
        body = {"type": "Blob", "contentType": OCTETS}
        rejected = await http.post(url, json={"events": [{**body, "data": base64.b64encode(over).decode()}]})
        assert rejected.status_code == 413, rejected.text
        error = rejected.json()["error"]
        assert (error["code"], error["status"], error["reason"]) == (
            413,
            "INVALID_ARGUMENT",
            "PAYLOAD_TOO_LARGE",
        )
        # The same over REST at the limit is accepted: the first event of the stream.
        exact = os.urandom(MIB)
        accepted = await http.post(url, json={"events": [{**body, "data": base64.b64encode(exact).decode()}]})
        assert accepted.status_code == 200, accepted.text
    answer = accepted.json()
    assert (answer["firstVersion"], answer["duplicate"]) == ("1", False)
    response = es.AppendEventsResponse(
        partition=answer["partition"],
        first_offset=int(answer["firstOffset"]),
        last_offset=int(answer["lastOffset"]),
    )
    records = await _records_of(backends, response, start)  # nothing of the stream before it
    assert [(r.headers["ce_streamversion"], r.value) for r in records] == [(b"1", exact)]


def _counted_size(stream: str, event: es.EventData) -> int:
    """What validate_append counts of the record an event becomes (gateway/domain/events.py): key, data and
    every header of the wire format (contract, "On the wire"), with ce_time at its fixed width and
    ce_streamversion at its widest (int64's maximum), since neither is known before the write."""
    headers = {
        "ce_specversion": "1.0",
        "ce_id": event.event_id,
        "ce_source": "/kpg/orders",
        "ce_type": event.type,
        "ce_subject": stream,
        "ce_time": "2000-01-01T00:00:00.000000Z",
        "content-type": event.content_type,
        "ce_streamversion": str(2**63 - 1),
        **{f"kpg-meta-{k}": v for k, v in event.metadata.items()},
    }
    return (
        len(stream.encode())
        + len(event.data)
        + sum(len(k.encode()) + len(v.encode()) for k, v in headers.items())
    )


def _events_filling(stream: str, total: int, count: int) -> list[es.EventData]:
    """`count` events whose records the gateway counts at exactly `total` bytes together."""
    events = [_event(b"", note="fills the append") for _ in range(count)]
    room = total - sum(_counted_size(stream, e) for e in events)
    for i, event in enumerate(events):
        event.data = os.urandom(room // count + (1 if i < room % count else 0))
    assert sum(_counted_size(stream, e) for e in events) == total
    return events


async def test_appends_at_the_4_mib_limit_count_keys_data_and_headers(
    gateway: GatewayProcess, backends: Backends
) -> None:
    """The 4 MiB limit of an append counts every record's key, data and headers: four events of 1 MiB of
    data are over it; events that come to exactly 4 MiB with their keys and headers are not, one byte
    more is."""
    stream = _stream("four")
    partition = partition_for(stream, PARTITIONS)
    start = await asyncio.to_thread(_end_offset, backends, partition)
    over_limit = {"limit": str(APPEND_LIMIT), "field": "events"}
    async with _client(gateway) as client:
        four_mib = [_event(os.urandom(MIB)) for _ in range(4)]
        assert await _too_large(client, _append(stream, *four_mib)) == over_limit

        fitting = _events_filling(stream, APPEND_LIMIT, 4)
        assert all(len(e.data) <= MIB for e in fitting) and sum(len(e.data) for e in fitting) < APPEND_LIMIT
        one_more = [es.EventData() for _ in fitting]
        for copy, event in zip(one_more, fitting, strict=True):
            copy.CopyFrom(event)
        one_more[-1].data += b"\0"
        assert await _too_large(client, _append(stream, *one_more)) == over_limit

        response = await client.events.AppendEvents(_append(stream, *fitting), timeout=60)
    assert (response.first_version, response.last_version, response.duplicate) == (1, 4, False)
    records = await _records_of(backends, response, start)  # the rejected appends left nothing
    _assert_landed(records, stream, 1, fitting)
    # What was counted bounds what Kafka holds (the real version is narrower than int64's widest).
    assert all(r.size <= _counted_size(stream, e) for r, e in zip(records, fitting, strict=True))
    assert sum(r.size for r in records) <= APPEND_LIMIT


def _neighbours(stream: str, count: int) -> list[str]:
    """Streams on the same partition as `stream`."""
    found: list[str] = []
    while len(found) < count:
        candidate = _stream("small")
        if partition_for(candidate, PARTITIONS) == partition_for(stream, PARTITIONS):
            found.append(candidate)
    return found


async def test_small_appends_beside_large_ones_all_succeed(
    gateway: GatewayProcess, backends: Backends
) -> None:
    """Large records never fail the appends that share their Kafka transaction: small appends to the same
    partition, sent while large ones are written, all succeed and land, and some shared a transaction."""
    big = _stream("big")
    streams = [big, *_neighbours(big, 3)]
    sent: list[tuple[es.AppendEventsRequest, bool]] = []  # (request, large)
    for _ in range(3):
        for size in (MIB, LIBRDKAFKA_DEFAULT_MESSAGE_MAX_BYTES + 1, MIB):
            sent.append((_append(big, _event(os.urandom(size))), True))
            sent += [
                (
                    _append(
                        streams[i % len(streams)],
                        _event(json.dumps({"i": i}).encode(), content_type="application/json"),
                    ),
                    False,
                )
                for i in range(8)
            ]
    async with _client(gateway) as client:
        outcomes = await asyncio.gather(
            *(client.events.AppendEvents(request, timeout=60) for request, _ in sent), return_exceptions=True
        )
    failures = [(i, o) for i, o in enumerate(outcomes) if not isinstance(o, es.AppendEventsResponse)]
    assert not failures, [
        (i, error_details(o) if isinstance(o, grpc.aio.AioRpcError) else repr(o)) for i, o in failures
    ]
    responses = cast("list[es.AppendEventsResponse]", outcomes)
    partition = partition_for(big, PARTITIONS)
    assert {r.partition for r in responses} == {partition}

    first, last = min(r.first_offset for r in responses), max(r.last_offset for r in responses)
    found = await asyncio.to_thread(_read, backends, partition, first, last)
    for (request, _), response in zip(sent, responses, strict=True):
        records = [found[o] for o in range(response.first_offset, response.last_offset + 1)]
        _assert_landed(records, request.stream_id, response.first_version, request.events)
    for stream in streams:  # versions 1..n in each stream, whatever the order they were written in
        versions = sorted(
            r.first_version for (q, _), r in zip(sent, responses, strict=True) if q.stream_id == stream
        )
        assert versions == list(range(1, len(versions) + 1))

    # Records of one transaction have consecutive offsets; its commit marker takes the next one (a reader
    # never sees it). So a run of visible offsets with no hole lies inside one transaction.
    runs: list[set[int]] = []
    for offset in sorted(found):
        if runs and offset - 1 in runs[-1]:
            runs[-1].add(offset)
        else:
            runs.append({offset})
    large = {r.first_offset for (_, is_large), r in zip(sent, responses, strict=True) if is_large}
    small = {r.first_offset for (_, is_large), r in zip(sent, responses, strict=True) if not is_large}
    shared = [run for run in runs if run & large and run & small]
    assert shared, "no transaction held both a large and a small append: the test proved nothing"
