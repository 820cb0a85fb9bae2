"""Reading dead letters in the three formats the contract names (domain/dead_letters.py), and the headers a
replayed record carries. Issue 11 builds listing and reprocessing on these."""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime

import pytest

from gateway.domain.dead_letters import (
    DltFormat,
    Failure,
    dead_letter_id,
    dlt_headers,
    parse_dead_letter_id,
    read_dead_letter,
    replay_headers,
)

FAILED_AT = datetime(2026, 12, 4, 12, 30, tzinfo=UTC)


def test_the_gateways_own_headers_round_trip() -> None:
    failure = Failure(
        topic="orders.events",
        partition=2,
        offset=41,
        timestamp_ms=1_700_000_000_000,
        consumer_group="kpg-rm-order_summary",
        error_class="builtins.ValueError",
        error_message="bad total",
        stack_trace="Traceback ...",
        attempts=3,
        failed_at=FAILED_AT,
    )
    headers = dlt_headers([("ce_type", b"OrderPlaced"), ("kpg-replay-count", b"1")], failure)
    details = read_dead_letter(headers, b'{"total": "x"}', timestamp_ms=5)
    assert details.format is DltFormat.KPG
    assert (details.original_topic, details.original_partition, details.original_offset) == (
        "orders.events",
        2,
        41,
    )
    assert details.original_timestamp_ms == 1_700_000_000_000
    assert (details.consumer_group, details.error_class, details.error_message) == (
        "kpg-rm-order_summary",
        "builtins.ValueError",
        "bad total",
    )
    assert details.stack_trace == "Traceback ..." and details.attempts == 3
    assert details.failed_at_ms == int(FAILED_AT.timestamp() * 1000)
    assert details.payload == b'{"total": "x"}' and details.reprocess_count == 1


def test_a_saga_dead_letter_has_no_original_position() -> None:
    failure = Failure(
        "inventory.commands", -1, -1, None, "kpg-sagas", "SagaCompensationFailed", "why", "", 5, FAILED_AT
    )
    details = read_dead_letter(dlt_headers([], failure), b"{}")
    assert (details.original_partition, details.original_offset, details.original_timestamp_ms) == (
        -1,
        -1,
        None,
    )
    assert details.error_class == "SagaCompensationFailed" and details.attempts == 5


def test_spring_kafka_headers_with_big_endian_integers() -> None:
    headers = [
        ("kafka_dlt-original-topic", b"payments"),
        ("kafka_dlt-original-partition", struct.pack(">i", 3)),
        ("kafka_dlt-original-offset", struct.pack(">q", 12_345_678_901)),
        ("kafka_dlt-original-timestamp", struct.pack(">q", 1_700_000_000_123)),
        ("kafka_dlt-original-timestamp-type", b"CreateTime"),
        ("kafka_dlt-original-consumer-group", b"payment-service"),
        ("kafka_dlt-exception-fqcn", b"org.springframework.kafka.listener.ListenerExecutionFailedException"),
        ("kafka_dlt-exception-cause-fqcn", b"java.lang.IllegalStateException"),
        ("kafka_dlt-exception-message", b"Listener failed; card expired"),
        ("kafka_dlt-exception-stacktrace", b"java.lang.IllegalStateException: card expired\n\tat ..."),
    ]
    details = read_dead_letter(headers, b"raw", timestamp_ms=1_700_000_001_000)
    assert details.format is DltFormat.SPRING
    assert (details.original_topic, details.original_partition, details.original_offset) == (
        "payments",
        3,
        12_345_678_901,
    )
    assert details.original_timestamp_ms == 1_700_000_000_123
    assert details.consumer_group == "payment-service"
    assert details.error_class == "org.springframework.kafka.listener.ListenerExecutionFailedException"
    assert details.error_message == "Listener failed; card expired"
    assert details.stack_trace.startswith("java.lang.IllegalStateException")
    assert details.failed_at_ms == 1_700_000_001_000 and details.payload == b"raw"


def test_spring_style_headers_written_as_decimal_text_are_read_too() -> None:
    headers = [
        ("kafka_dlt-original-topic", b"payments"),
        ("kafka_dlt-original-partition", b"7"),
        ("kafka_dlt-original-offset", b"1234"),  # 4 bytes, but decimal text, not a binary int
    ]
    details = read_dead_letter(headers, None)
    assert (details.original_partition, details.original_offset) == (7, 1234)


@pytest.mark.parametrize(
    ("payload", "raw"),
    [({"order": 1}, b'{"order":1}'), ("plain text", b"plain text"), (None, None)],
)
def test_a_json_envelope(payload: object, raw: bytes | None) -> None:
    envelope = {
        "originalTopic": "orders",
        "originalPartition": 1,
        "originalOffset": "99",
        "originalTimestamp": 1_700_000_000_000,
        "consumerGroup": "billing",
        "errorClass": "TypeError",
        "errorMessage": "x is undefined",
        "stackTrace": "at f (billing.js:1)",
        "payload": payload,
    }
    details = read_dead_letter([], json.dumps(envelope).encode(), timestamp_ms=77)
    assert details.format is DltFormat.JSON_ENVELOPE
    assert (details.original_topic, details.original_partition, details.original_offset) == ("orders", 1, 99)
    assert details.original_timestamp_ms == 1_700_000_000_000
    assert (details.consumer_group, details.error_class, details.error_message) == (
        "billing",
        "TypeError",
        "x is undefined",
    )
    assert details.payload == raw and details.failed_at_ms == 77


@pytest.mark.parametrize(
    "value", [None, b"", b"not json", b"[1, 2]", b'{"topic": "orders"}', b'{"originalTopic": 5}', b"{broken"]
)
def test_anything_else_is_unknown_and_keeps_its_value(value: bytes | None) -> None:
    details = read_dead_letter([("x-custom", b"1")], value, timestamp_ms=9)
    assert details.format is DltFormat.UNKNOWN
    assert details.payload == value and details.original_partition == -1 and details.failed_at_ms == 9


def test_a_replayed_record_drops_every_dlt_header_and_counts_its_replays() -> None:
    headers = [
        ("ce_type", b"OrderPlaced"),
        ("kpg-dlt-error-class", b"E"),
        ("kafka_dlt-original-topic", b"t"),
        ("kpg-replayed-from", b"old.DLT:0:1"),
        ("kpg-replay-count", b"1"),
    ]
    replayed = replay_headers(headers, replayed_from="orders.events.DLT:2:41", replay_count=2)
    assert replayed == [
        ("ce_type", b"OrderPlaced"),
        ("kpg-replayed-from", b"orders.events.DLT:2:41"),
        ("kpg-replay-count", b"2"),
    ]


def test_dead_letter_ids() -> None:
    assert dead_letter_id("orders.events.DLT", 2, 41) == "orders.events.DLT:2:41"
    assert parse_dead_letter_id("orders.events.DLT:2:41") == ("orders.events.DLT", 2, 41)
    assert parse_dead_letter_id("a:b.DLT:0:0") == ("a:b.DLT", 0, 0)
    for bad in ["", "orders.events:2:41", "orders.events.DLT:2", "orders.events.DLT:-1:4", "x.DLT:1:4\n"]:
        assert parse_dead_letter_id(bad) is None, bad
