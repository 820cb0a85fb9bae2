"""Events on Kafka: validation, the CloudEvents (binary mode) record layout, partitioning, positions."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import NoReturn

import orjson

from gateway.errors import FieldViolation, InvalidArgument, PayloadTooLarge

# Matched with fullmatch: `$` would also accept a trailing newline ("orders\n").
NAME = re.compile(r"[A-Za-z0-9._:@-]{1,200}")
JSON_CONTENT_TYPES = ("application/json", "text/json")
MAX_JSON_DEPTH = 1024  # orjson's bound on nesting
DEFAULT_CONTENT_TYPE = "application/json"
META_PREFIX = "kpg-meta-"


class Expectation(Enum):
    ANY = "any"
    NO_STREAM = "no_stream"
    STREAM_EXISTS = "stream_exists"
    EXACT = "exact"


@dataclass(frozen=True, slots=True)
class Expected:
    kind: Expectation = Expectation.ANY
    version: int = 0  # for EXACT; 0 means "no stream yet"

    def holds(self, head: int) -> bool:
        match self.kind:
            case Expectation.ANY:
                return True
            case Expectation.NO_STREAM:
                return head == 0
            case Expectation.STREAM_EXISTS:
                return head > 0
            case Expectation.EXACT:
                return head == self.version

    def describe(self) -> str:
        return str(self.version) if self.kind is Expectation.EXACT else self.kind.name


@dataclass(frozen=True, slots=True)
class NewEvent:
    event_id: str
    type: str
    data: bytes
    content_type: str = DEFAULT_CONTENT_TYPE
    metadata: Mapping[str, str] = field(default_factory=dict)
    client_id: bool = True  # False when the gateway generated event_id


@dataclass(frozen=True, slots=True)
class AppendRequest:
    category: str
    stream_id: str
    events: tuple[NewEvent, ...]
    expected: Expected = Expected()
    idempotency_key: str = ""
    correlation_id: str = ""
    causation_id: str = ""

    def fingerprint(self) -> str:
        """Identifies the request's content, so a reused idempotency key with another body is detected.
        Generated event ids are left out: a retry of the same body generates new ones."""
        digest = hashlib.sha256()
        parts: list[object] = [
            self.category,
            self.stream_id,
            self.expected.kind.value,
            self.expected.version,
            self.correlation_id,
            self.causation_id,
        ]
        for event in self.events:
            parts += [
                event.event_id if event.client_id else "",
                event.type,
                event.content_type,
                sorted(event.metadata.items()),
                hashlib.sha256(event.data).hexdigest(),
            ]
        digest.update(json.dumps(parts, separators=(",", ":")).encode())
        return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class AppendResult:
    first_version: int
    last_version: int
    topic: str
    partition: int
    first_offset: int
    last_offset: int
    position: str
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Limits:
    max_events: int = 1000
    max_event_bytes: int = 1024 * 1024  # one event's data
    max_append_bytes: int = 4 * 1024 * 1024  # every record of the append: key, data and headers
    max_metadata_entries: int = 64  # per event
    max_metadata_value_bytes: int = 8 * 1024  # one metadata value, UTF-8


# Kafka's integer widths: versions and offsets are int64, partitions int32.
MAX_INT64 = 2**63 - 1
MAX_PARTITION = 2**31 - 1
# To size a record's headers before its version and time are known: ce_time has a fixed width, and
# ce_streamversion is at its widest at int64's maximum.
_ANY_TIME = datetime(2000, 1, 1, tzinfo=UTC)
_WIDEST_VERSION = MAX_INT64
# uint32 fields are bounded by protobuf itself, but a REST query parameter is any integer.
MAX_UINT32 = 2**32 - 1


def check_range(field: str, value: int, maximum: int) -> int:
    """An integer field that reaches SQL, Kafka or a timer: 0..maximum, or INVALID_ARGUMENT naming it.
    uint64 fields can carry up to 2^64-1, but versions and offsets are int64 everywhere behind us."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise InvalidArgument.field(field, f"must be an integer from 0 to {maximum}")
    return value


@dataclass(frozen=True, slots=True)
class ReadStreamQuery:
    """A ReadStream request, from gRPC or REST alike; its integers are checked when it is made."""

    category: str
    stream_id: str
    from_version: int = 0
    max_count: int = 0
    backwards: bool = False
    min_position: str = ""
    wait_timeout_ms: int = 0

    def __post_init__(self) -> None:
        check_range("from_version", self.from_version, MAX_INT64)
        check_range("max_count", self.max_count, MAX_UINT32)
        check_range("wait_timeout_ms", self.wait_timeout_ms, MAX_UINT32)


@dataclass(frozen=True, slots=True)
class SubscribeQuery:
    """A Subscribe request, from gRPC or REST (SSE) alike."""

    category: str
    stream_id: str = ""
    from_version: int = 0
    from_position: str = ""

    def __post_init__(self) -> None:
        check_range("from_version", self.from_version, MAX_INT64)


def check_name(field_name: str, value: str, *, category: bool = False) -> None:
    if not NAME.fullmatch(value):
        raise InvalidArgument.field(field_name, "must be 1-200 characters of [A-Za-z0-9._:@-]")
    if category and value.startswith(("kpg.", "_")):
        raise InvalidArgument.field(field_name, "must not start with 'kpg.' or '_'")


def _printable(value: str) -> bool:
    return 1 <= len(value) <= 200 and value.isprintable()


def validate_append(request: AppendRequest, limits: Limits) -> None:
    """Every rule of the contract for AppendEvents that needs no state."""
    check_name("category", request.category, category=True)
    check_name("stream_id", request.stream_id)
    if not request.events:
        raise InvalidArgument.field("events", "at least one event is required")
    if len(request.events) > limits.max_events:
        raise PayloadTooLarge(
            f"an append holds at most {limits.max_events} events, this one has {len(request.events)}",
            metadata={"limit": str(limits.max_events), "events": str(len(request.events))},
        )
    total = 0
    seen: set[str] = set()
    for i, event in enumerate(request.events):
        where = f"events[{i}]"
        if not _printable(event.type):
            raise InvalidArgument.field(f"{where}.type", "must be 1-200 printable characters")
        try:
            uuid.UUID(event.event_id)
        except ValueError:
            raise InvalidArgument.field(f"{where}.event_id", "must be a UUID") from None
        if event.event_id in seen:
            raise InvalidArgument.field(f"{where}.event_id", "repeats an event id of this append")
        seen.add(event.event_id)
        if not _printable(event.content_type):
            raise InvalidArgument.field(f"{where}.content_type", "must be 1-200 printable characters")
        _check_metadata(where, event.metadata, limits)
        if len(event.data) > limits.max_event_bytes:
            _too_large(f"{where}.data", len(event.data), limits.max_event_bytes)
        if is_json(event.content_type):
            _check_json(where, event)
        total += record_size(request, event)
        if total > limits.max_append_bytes:  # checked as it grows: a huge header costs one encoding
            raise PayloadTooLarge(
                f"the append's records carry at least {total} bytes (keys, data and headers); "
                f"the limit is {limits.max_append_bytes}",
                metadata={"limit": str(limits.max_append_bytes), "field": "events"},
                violations=(FieldViolation("events", f"at most {limits.max_append_bytes} bytes"),),
            )


def record_size(request: AppendRequest, event: NewEvent) -> int:
    """An upper bound of the bytes of the record an event becomes: key, data and every header."""
    headers = event_headers(request, event, _WIDEST_VERSION, _ANY_TIME)
    return (
        len(request.stream_id.encode())
        + len(event.data)
        + sum(len(name.encode()) + len(value) for name, value in headers)
    )


def _check_metadata(where: str, metadata: Mapping[str, str], limits: Limits) -> None:
    if len(metadata) > limits.max_metadata_entries:
        _too_large(f"{where}.metadata", len(metadata), limits.max_metadata_entries, unit="entries")
    for key, value in metadata.items():
        if not _printable(key):
            raise InvalidArgument.field(
                f"{where}.metadata", f"key {key!r} must be 1-200 printable characters"
            )
        size = len(value.encode())
        if size > limits.max_metadata_value_bytes:
            _too_large(f"{where}.metadata[{key}]", size, limits.max_metadata_value_bytes)


def _check_json(where: str, event: NewEvent) -> None:
    try:
        strict_json(event.data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise InvalidArgument(
            f"{where}.data is not valid JSON ({why}) but its content type is {event.content_type}",
            violations=(FieldViolation(f"{where}.data", "not valid JSON"),),
        ) from None


def strict_json(text: str | bytes) -> None:
    """Check `text` is JSON without the non-standard NaN, Infinity and -Infinity, nested at most
    MAX_JSON_DEPTH deep (ValueError, like any bad JSON). orjson checks first, 4-5x faster than json; what
    it refuses is decided by json, which also accepts numbers beyond a double (1e400) and lone
    surrogate escapes, as before."""
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            raise ValueError(f"nested more than {MAX_JSON_DEPTH} deep") from None
        json.loads(text, parse_constant=_no_constant)


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _too_large(field_name: str, size: int, limit: int, *, unit: str = "bytes") -> NoReturn:
    raise PayloadTooLarge(
        f"{field_name} has {size} {unit}; the limit is {limit}",
        metadata={"limit": str(limit), "field": field_name},
        violations=(FieldViolation(field_name, f"at most {limit} {unit}"),),
    )


def is_json(content_type: str) -> bool:
    base = content_type.split(";", 1)[0].strip().lower()
    return base in JSON_CONTENT_TYPES or base.endswith("+json")


def new_event_id() -> str:
    return str(uuid.uuid4())


# --- The record on the wire (contract: "On the wire") -------------------------------------------------


def event_headers(
    request: AppendRequest, event: NewEvent, version: int, recorded_at: datetime
) -> list[tuple[str, bytes]]:
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", event.event_id.encode()),
        ("ce_source", f"/kpg/{request.category}".encode()),
        ("ce_type", event.type.encode()),
        ("ce_subject", request.stream_id.encode()),
        ("ce_time", recorded_at.isoformat(timespec="microseconds").replace("+00:00", "Z").encode()),
        ("content-type", event.content_type.encode()),
        ("ce_streamversion", str(version).encode()),
    ]
    if request.correlation_id:
        headers.append(("ce_correlationid", request.correlation_id.encode()))
    if request.causation_id:
        headers.append(("ce_causationid", request.causation_id.encode()))
    headers += [(META_PREFIX + key, value.encode()) for key, value in event.metadata.items()]
    return headers


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as read back from Kafka (or the stream index)."""

    event_id: str
    category: str
    stream_id: str
    version: int
    type: str
    data: bytes
    content_type: str
    metadata: dict[str, str]
    recorded_at: datetime
    topic: str
    partition: int
    offset: int
    correlation_id: str = ""
    causation_id: str = ""


def parse_event(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]],
    timestamp_ms: int | None,
) -> StoredEvent | None:
    """The event a record carries, or None when the record is not a gateway event."""
    h: dict[str, str] = {}
    metadata: dict[str, str] = {}
    for name, raw in headers:
        text = raw.decode("utf-8", errors="replace")
        if name.startswith(META_PREFIX):
            metadata[name[len(META_PREFIX) :]] = text
        else:
            h[name] = text
    source = h.get("ce_source", "")
    if h.get("ce_specversion") != "1.0" or not source.startswith("/kpg/") or "ce_streamversion" not in h:
        return None
    try:
        version = int(h["ce_streamversion"])
        recorded_at = _parse_time(h.get("ce_time"), timestamp_ms)
    except ValueError:
        return None
    return StoredEvent(
        event_id=h.get("ce_id", ""),
        category=source[len("/kpg/") :],
        stream_id=h.get("ce_subject") or (key or b"").decode("utf-8", errors="replace"),
        version=version,
        type=h.get("ce_type", ""),
        data=value or b"",
        content_type=h.get("content-type", DEFAULT_CONTENT_TYPE),
        metadata=metadata,
        recorded_at=recorded_at,
        topic=topic,
        partition=partition,
        offset=offset,
        correlation_id=h.get("ce_correlationid", ""),
        causation_id=h.get("ce_causationid", ""),
    )


def _parse_time(text: str | None, timestamp_ms: int | None) -> datetime:
    if text:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    return datetime.fromtimestamp((timestamp_ms or 0) / 1000, UTC)


# --- Partitioning: the same partition Kafka's Java clients choose for the key --------------------------


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2), as a signed 32-bit int."""
    seed, m, r = 0x9747B28C, 0x5BD1E995, 24
    length = len(data)
    h = (seed ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    tail = length % 4
    base = length - tail
    if tail == 3:
        h ^= data[base + 2] << 16
    if tail >= 2:
        h ^= data[base + 1] << 8
    if tail >= 1:
        h ^= data[base]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h >= 1 << 31 else h


def partition_for(stream_id: str, partitions: int) -> int:
    return (murmur2(stream_id.encode()) & 0x7FFFFFFF) % partitions


# --- Positions: opaque to clients ----------------------------------------------------------------------

# Room for what the gateway issues at worst (10,000 partitions at int64 offsets: ~360,000 characters).
MAX_POSITION_CHARS = 512 * 1024
MAX_POSITION_PARTITIONS = 10_000
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
_PARTITION = re.compile(r"0|[1-9][0-9]{0,9}")  # canonical decimal: no sign, blanks, "_" or leading zeros


def _not_a_position(field_name: str) -> InvalidArgument:
    return InvalidArgument.field(field_name, "is not a position this gateway issued")


def _no_float(text: str) -> NoReturn:
    raise ValueError(f"{text} is not an integer")


@dataclass(frozen=True, slots=True)
class Position:
    """Offsets (next to read) per partition of one topic. An append's position names one partition."""

    topic: str
    offsets: Mapping[int, int]

    def encode(self) -> str:
        body = {"t": self.topic, "o": {str(p): o for p, o in sorted(self.offsets.items())}}
        return base64.urlsafe_b64encode(json.dumps(body, separators=(",", ":")).encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str, *, field_name: str = "position") -> Position:
        """Strict: a topic name and int32 partitions to int64 offsets, or INVALID_ARGUMENT."""
        if len(text) > MAX_POSITION_CHARS:
            raise InvalidArgument.field(field_name, f"is longer than {MAX_POSITION_CHARS} characters")
        if not _BASE64URL.fullmatch(text):
            raise _not_a_position(field_name)
        try:
            body = json.loads(
                base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)),
                parse_constant=_no_constant,
                parse_float=_no_float,
            )
        except (ValueError, RecursionError):  # binascii.Error and UnicodeDecodeError are ValueErrors
            raise _not_a_position(field_name) from None
        if not isinstance(body, dict) or body.keys() != {"t", "o"}:
            raise _not_a_position(field_name)
        topic, offsets = body["t"], body["o"]
        if not isinstance(topic, str) or not 1 <= len(topic) <= 249 or not isinstance(offsets, dict):
            raise _not_a_position(field_name)
        if len(offsets) > MAX_POSITION_PARTITIONS:
            raise InvalidArgument.field(field_name, f"names more than {MAX_POSITION_PARTITIONS} partitions")
        decoded: dict[int, int] = {}
        for partition, offset in offsets.items():
            if not _PARTITION.fullmatch(partition) or int(partition) > MAX_PARTITION:
                raise _not_a_position(field_name)
            if type(offset) is not int or not 0 <= offset <= MAX_INT64:  # not bool, not float
                raise _not_a_position(field_name)
            decoded[int(partition)] = offset
        return cls(topic, decoded)

    @classmethod
    def after(cls, topic: str, partition: int, offset: int) -> Position:
        return cls(topic, {partition: offset + 1})
