"""The pure event-store rules: names, positions and the append limits (contract: EventStore, Errors)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest

from gateway.domain.events import (
    MAX_POSITION_CHARS,
    AppendRequest,
    Limits,
    NewEvent,
    Position,
    check_name,
    event_headers,
    new_event_id,
    record_size,
    validate_append,
)
from gateway.errors import GatewayError, InvalidArgument, PayloadTooLarge

MiB = 1024 * 1024


def _position_text(body: object) -> str:
    """What a client could send as a position: any JSON, encoded the way the gateway encodes its own."""
    raw = body if isinstance(body, str) else json.dumps(body, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _violations(error: GatewayError) -> dict[str, str]:
    return {v.field: v.description for v in error.violations}


# --- Positions ------------------------------------------------------------------------------------------


def test_a_position_round_trips() -> None:
    position = Position("orders.events", {0: 0, 3: 17, 5: 2**63 - 1})
    assert Position.decode(position.encode()) == position
    assert Position.decode(Position("t", {}).encode()) == Position("t", {})


def test_the_largest_position_the_gateway_issues_still_decodes() -> None:
    # A category may have 10,000 partitions (definitions), each at int64's largest offset.
    widest = Position("t" * 249, {p: 2**63 - 1 for p in range(10_000)})
    text = widest.encode()
    assert len(text) <= MAX_POSITION_CHARS
    assert Position.decode(text) == widest


_OFFSETS = '{"t":"orders.events","o":{"0":%s}}'
_NOT_POSITIONS = {
    "Infinity": _position_text(_OFFSETS % "Infinity"),
    "-Infinity": _position_text(_OFFSETS % "-Infinity"),
    "NaN": _position_text(_OFFSETS % "NaN"),
    "float 1.0": _position_text(_OFFSETS % "1.0"),
    "float 1.5": _position_text(_OFFSETS % "1.5"),
    "float 1e300": _position_text(_OFFSETS % "1e300"),
    "bool": _position_text(_OFFSETS % "true"),
    "string offset": _position_text(_OFFSETS % '"5"'),
    "null offset": _position_text(_OFFSETS % "null"),
    "negative offset": _position_text(_OFFSETS % "-1"),
    "offset 2^63": _position_text(_OFFSETS % 2**63),
    "offset over uint64": _position_text(_OFFSETS % (2**64 + 1)),
    "5000-digit offset": _position_text(_OFFSETS % ("9" * 5000)),
    "partition -1": _position_text({"t": "orders.events", "o": {"-1": 0}}),
    "partition 01": _position_text({"t": "orders.events", "o": {"01": 0}}),
    "partition with a blank": _position_text({"t": "orders.events", "o": {" 1": 0}}),
    "partition 1_0": _position_text({"t": "orders.events", "o": {"1_0": 0}}),
    "partition +1": _position_text({"t": "orders.events", "o": {"+1": 0}}),
    "partition 2^31": _position_text({"t": "orders.events", "o": {"2147483648": 0}}),
    "partition x": _position_text({"t": "orders.events", "o": {"x": 0}}),
    "empty topic": _position_text({"t": "", "o": {"0": 1}}),
    "numeric topic": _position_text({"t": 5, "o": {"0": 1}}),
    "250-character topic": _position_text({"t": "t" * 250, "o": {"0": 1}}),
    "offsets a list": _position_text({"t": "orders.events", "o": [1, 2]}),
    "no offsets": _position_text({"t": "orders.events"}),
    "an extra key": _position_text({"t": "orders.events", "o": {}, "x": 1}),
    "a list": _position_text([1, 2]),
    "nested 100,000 deep": _position_text("[" * 100_000 + "]" * 100_000),
    "10,001 partitions": _position_text({"t": "orders.events", "o": {str(p): 1 for p in range(10_001)}}),
    "not base64": "not a position!",
    "not ASCII": "é",
    "one base64 character": "A",
    "empty": "",
}


@pytest.mark.parametrize("text", list(_NOT_POSITIONS.values()), ids=list(_NOT_POSITIONS))
def test_a_position_that_is_not_ours_is_invalid_argument(text: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        Position.decode(text, field_name="min_position")
    assert list(_violations(raised.value)) == ["min_position"]


def test_an_oversized_position_is_refused_before_it_is_decoded() -> None:
    with pytest.raises(InvalidArgument) as raised:
        Position.decode("A" * (MAX_POSITION_CHARS + 1), field_name="from_position")
    assert "longer than" in raised.value.message
    assert list(_violations(raised.value)) == ["from_position"]


# --- Names ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["orders\n", "orders\r\n", "\norders", "or ders", "", "x" * 201, "ordérs"])
def test_a_bad_name_is_invalid_argument(name: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        check_name("stream_id", name)
    assert list(_violations(raised.value)) == ["stream_id"]


@pytest.mark.parametrize("name", ["orders", "x" * 200, "a.b_c:d@e-1"])
def test_a_good_name_passes(name: str) -> None:
    check_name("stream_id", name)
    check_name("category", name, category=True)


def test_a_category_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        check_name("category", "orders\n", category=True)


# --- Append limits ---------------------------------------------------------------------------------------


def _event(
    data: bytes = b"{}", *, content_type: str = "application/json", metadata: dict[str, str] | None = None
) -> NewEvent:
    return NewEvent(new_event_id(), "T", data, content_type, metadata or {})


def _append(*events: NewEvent, correlation_id: str = "", causation_id: str = "") -> AppendRequest:
    return AppendRequest(
        "orders", "order-1", tuple(events), correlation_id=correlation_id, causation_id=causation_id
    )


def test_the_per_event_limit_applies_to_the_data() -> None:
    limits = Limits()
    validate_append(_append(_event(b"x" * MiB, content_type="application/octet-stream")), limits)
    with pytest.raises(PayloadTooLarge) as raised:
        validate_append(_append(_event(b"x" * (MiB + 1), content_type="application/octet-stream")), limits)
    assert raised.value.metadata["field"] == "events[0].data"


def test_headers_count_towards_the_append_limit() -> None:
    # 4 events of 1 MiB are exactly 4 MiB of data; their keys and headers take the append over 4 MiB.
    events = [_event(b"x" * MiB, content_type="application/octet-stream") for _ in range(4)]
    with pytest.raises(PayloadTooLarge) as raised:
        validate_append(_append(*events), Limits())
    assert raised.value.metadata["limit"] == str(4 * MiB)


def test_metadata_counts_towards_the_append_limit() -> None:
    # Little data, but 10 events x 60 entries x 8 KiB of metadata is 4.7 MiB of headers.
    metadata = {f"k{i}": "v" * 8192 for i in range(60)}
    events = [_event(metadata=metadata) for _ in range(10)]
    with pytest.raises(PayloadTooLarge):
        validate_append(_append(*events), Limits())
    validate_append(_append(*events[:5]), Limits())


def test_correlation_ids_count_towards_the_append_limit() -> None:
    request = _append(*[_event() for _ in range(5)], correlation_id="c" * MiB)
    with pytest.raises(PayloadTooLarge):
        validate_append(request, Limits())


def test_record_size_bounds_the_record_as_written() -> None:
    event = _event(b'{"a": 1}', metadata={"who": "me", "ünï": "cödé"})
    request = _append(event, correlation_id="corr", causation_id="cause")
    for version in (1, 2**63 - 1):
        headers = event_headers(request, event, version, datetime.now(UTC))
        written = len(b"order-1") + len(event.data) + sum(len(n.encode()) + len(v) for n, v in headers)
        assert written <= record_size(request, event)
    assert record_size(request, event) - written < 16  # a bound, not a guess


def test_too_many_metadata_entries_is_payload_too_large() -> None:
    limits = Limits()
    validate_append(_append(_event(metadata={f"k{i}": "v" for i in range(64)})), limits)
    with pytest.raises(PayloadTooLarge) as raised:
        validate_append(_append(_event(metadata={f"k{i}": "v" for i in range(65)})), limits)
    assert raised.value.metadata == {"limit": "64", "field": "events[0].metadata"}


def test_a_metadata_value_over_8_kib_is_payload_too_large() -> None:
    limits = Limits()
    validate_append(_append(_event(metadata={"k": "v" * 8192})), limits)
    validate_append(_append(_event(metadata={"k": "\x00\n\t" * 100})), limits)  # any text
    with pytest.raises(PayloadTooLarge) as raised:
        validate_append(_append(_event(metadata={"k": "v" * 8193})), limits)
    assert raised.value.metadata["field"] == "events[0].metadata[k]"
    with pytest.raises(PayloadTooLarge):  # counted in UTF-8 bytes, not characters
        validate_append(_append(_event(metadata={"k": "é" * 4097})), limits)


@pytest.mark.parametrize("content_type", ["", "x" * 201, "text/plain\n", "text/plain\x00"])
def test_a_bad_content_type_is_invalid_argument(content_type: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        validate_append(_append(_event(b"x", content_type=content_type)), Limits())
    assert list(_violations(raised.value)) == ["events[0].content_type"]


def test_a_content_type_of_200_printable_characters_passes() -> None:
    validate_append(_append(_event(b"x", content_type="application/" + "x" * 188)), Limits())


@pytest.mark.parametrize(
    "data",
    [b"NaN", b'{"a": Infinity}', b"[-Infinity]", b"[" * 1025 + b"]" * 1025, b"[" * 100_000, b"\xff"],
)
def test_json_data_must_be_standard_json(data: bytes) -> None:
    with pytest.raises(InvalidArgument) as raised:
        validate_append(_append(_event(data)), Limits())
    assert list(_violations(raised.value)) == ["events[0].data"]


def test_a_stream_id_with_a_trailing_newline_is_refused_in_an_append() -> None:
    request = AppendRequest("orders", "order-1\n", (_event(),))
    with pytest.raises(InvalidArgument) as raised:
        validate_append(request, Limits())
    assert list(_violations(raised.value)) == ["stream_id"]


@pytest.mark.parametrize(
    "data",
    [
        b"123456789012345678901234567890",  # beyond 64 bits: orjson reads a float, json an int
        b"[1e400]",  # beyond a double: orjson refuses, json reads infinity
        b'"\\ud800"',  # a lone surrogate escape: orjson refuses, json accepts
        b"[" * 1024 + b"]" * 1024,  # orjson's bound on nesting (json's was the call stack's, ~990)
        b'{"a": 1, "a": 2}',
        '{"é": "ü"}'.encode(),
    ],
)
def test_json_data_is_accepted_exactly_when_json_accepts_it(data: bytes) -> None:
    # The check runs orjson first for speed; json decides what orjson refuses.
    validate_append(_append(_event(data)), Limits())
