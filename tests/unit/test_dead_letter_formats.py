"""Reading dead letters in the three formats the contract names (domain/dead_letters.py), and the headers a
replayed record carries. Issue 11 builds listing and reprocessing on these."""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime

import pytest

from gateway.definitions import parse_definitions
from gateway.domain.dead_letters import (
    NOT_RESOLVED,
    DeadLetter,
    DeadLetterFilter,
    DeadLetterState,
    DltFormat,
    Failure,
    Resolution,
    dead_letter_id,
    dlt_headers,
    never_a_target,
    parse_dead_letter_id,
    read_dead_letter,
    replay_headers,
    replayed_for,
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


def test_a_replay_names_the_group_it_is_for_and_who_should_skip_it() -> None:
    original = [("ce_type", b"OrderPlaced")]
    assert replayed_for(original) is None  # not a replay: everyone processes it
    plain = replay_headers(original, replayed_from="t.DLT:0:1", replay_count=1)
    assert replayed_for(plain) == ""  # a replay for any group
    aimed = replay_headers(original, replayed_from="t.DLT:0:1", replay_count=1, consumer_group="kpg-rm-x")
    assert aimed[-1] == ("kpg-replay-consumer-group", b"kpg-rm-x") and replayed_for(aimed) == "kpg-rm-x"
    # Replayed again for another group: the old mark is replaced, not kept beside the new one.
    again = replay_headers(aimed, replayed_from="t.DLT:0:9", replay_count=2, consumer_group="other")
    assert [v for k, v in again if k == "kpg-replay-consumer-group"] == [b"other"]


def _letter(headers: list[tuple[str, bytes]], resolution: Resolution = NOT_RESOLVED) -> DeadLetter:
    return DeadLetter(
        "orders.events.DLT",
        2,
        41,
        b"k",
        tuple(headers),
        read_dead_letter(headers, b"v", timestamp_ms=1000),
        resolution,
    )


def test_a_letters_replay_counts_earlier_replays_and_carries_its_group() -> None:
    failure = Failure("orders.events", 0, 5, None, "kpg-rm-x", "E", "m", "", 3, FAILED_AT)
    came_back = dlt_headers(
        [("kpg-replayed-from", b"orders.events.DLT:0:1"), ("kpg-replay-count", b"1")], failure
    )
    letter = _letter(came_back, Resolution(DeadLetterState.REPROCESSED, replays=1))
    assert (letter.state, letter.reprocess_count) == (DeadLetterState.REPROCESSED, 2)
    payload, headers = letter.replay("orders.events")
    assert payload == b"v"
    assert headers == [
        ("kpg-replayed-from", b"orders.events.DLT:2:41"),
        ("kpg-replay-count", b"3"),
        ("kpg-replay-consumer-group", b"kpg-rm-x"),
    ]


def test_resolutions_round_trip_and_foreign_values_are_ignored() -> None:
    replayed = NOT_RESOLVED.replayed("orders.events", 10).replayed("orders.events", 20)
    assert (replayed.state, replayed.replays, replayed.at_ms) == (DeadLetterState.REPROCESSED, 2, 20)
    discarded = replayed.discarded("refunded", 30)
    assert (discarded.state, discarded.replays, discarded.reason) == (
        DeadLetterState.DISCARDED,
        2,
        "refunded",
    )
    assert Resolution.decode(discarded.encode()) == discarded
    for foreign in [None, b"", b"nope", b"[]", b'{"state": "LOST"}', b'{"replays": 1}']:
        assert Resolution.decode(foreign) is None, foreign


def test_the_state_filter() -> None:
    new, done = _letter([]), _letter([], Resolution(DeadLetterState.DISCARDED, reason="x"))
    assert DeadLetterFilter().matches(new) and DeadLetterFilter().matches(done)
    assert DeadLetterFilter(state=DeadLetterState.NEW).matches(new)
    assert not DeadLetterFilter(state=DeadLetterState.NEW).matches(done)
    assert DeadLetterFilter(state=DeadLetterState.DISCARDED).matches(done)


@pytest.mark.parametrize(
    ("dlt", "target", "allowed"),
    [
        ("orders.events.DLT", "orders.events", True),  # where its records came from
        ("orders.events.DLT", "payments", False),
        ("orders.events.DLT", "pricing.eu", True),  # dead_letters.targets: ["pricing.*"]
        ("kpg.sagas.DLT", "inventory.commands", True),  # a saga step topic
        ("orders.events.DLT", "inventory.commands", False),
        ("legacy.DLT", "kpg.dlt.state", False),  # internal, even when a pattern matches
        ("legacy.DLT", "__consumer_offsets", False),
        ("legacy.DLT", "other.DLT", False),
        ("legacy.DLT", "", False),
    ],
)
def test_where_replays_may_go(dlt: str, target: str, allowed: bool) -> None:
    definitions = parse_definitions(
        {
            "sagas": {"s": {"steps": [{"name": "a", "topic": "inventory.commands", "command": "Reserve"}]}},
            "dead_letters": {"targets": ["pricing.*", "kpg.*", "_*", "*.DLT"]},
        }
    )
    assert definitions.replay_allowed(dlt, target) is allowed


def test_internal_and_dead_letter_topics_are_never_targets() -> None:
    assert all(never_a_target(t) for t in ["kpg.dlt.state", "kpg.sagas.DLT", "__consumer_offsets", "x.DLT"])
    assert not any(never_a_target(t) for t in ["orders.events", "kpgx", "DLT", "x.DLTs"])
