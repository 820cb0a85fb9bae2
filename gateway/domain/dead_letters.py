"""Dead letters written by the gateway: `<topic>.DLT`, the failed record's key, value and headers, plus the
contract's `kpg-dlt-*` headers."""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

MAX_STACK_TRACE_BYTES = 8 * 1024
DLT_PREFIX = "kpg-dlt-"
SAGA_DLT = "kpg.sagas.DLT"  # where sagas that ended FAILED leave the compensation that did not complete


def dlt_topic(topic: str) -> str:
    return f"{topic}.DLT"


@dataclass(frozen=True, slots=True)
class Failure:
    """Why and where a record failed."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    consumer_group: str
    error_class: str
    error_message: str
    stack_trace: str
    attempts: int
    failed_at: datetime


def dlt_headers(original: Sequence[tuple[str, bytes]], failure: Failure) -> list[tuple[str, bytes]]:
    """The failed record's own headers (earlier kpg-dlt-* ones dropped: they describe an older failure)
    followed by this failure's."""
    stack = failure.stack_trace.encode()[:MAX_STACK_TRACE_BYTES]
    ours = {
        "original-topic": failure.topic,
        "original-partition": str(failure.partition),
        "original-offset": str(failure.offset),
        "original-timestamp": "" if failure.timestamp_ms is None else str(failure.timestamp_ms),
        "consumer-group": failure.consumer_group,
        "error-class": failure.error_class,
        "error-message": failure.error_message,
        "attempts": str(failure.attempts),
        "failed-at": failure.failed_at.isoformat().replace("+00:00", "Z"),
    }
    headers = [(name, value) for name, value in original if not name.startswith(DLT_PREFIX)]
    headers += [(DLT_PREFIX + name, value.encode()) for name, value in ours.items()]
    headers.append((DLT_PREFIX + "stacktrace", stack))
    return headers


# --- Reading dead letters (issue 11: DLT reprocessing) -----------------------------------------------------

SPRING_PREFIX = "kafka_dlt-"
REPLAYED_FROM = "kpg-replayed-from"
REPLAY_COUNT = "kpg-replay-count"
# Which consumer group a replay is for: the one that dead-lettered it. The gateway's own consumers of the
# topic that already processed the original skip it (an addition to the contract's two replay headers).
REPLAY_GROUP = "kpg-replay-consumer-group"
_DLT_SUFFIX = ".DLT"
_DECIMAL = re.compile(rb"-?[0-9]{1,19}")  # fullmatch: `$` would accept a trailing newline


class DltFormat(enum.StrEnum):
    """Where a dead letter's failure details were read from (contract: DeadLetter.format)."""

    KPG = "KPG"
    SPRING = "SPRING"
    JSON_ENVELOPE = "JSON_ENVELOPE"
    UNKNOWN = "UNKNOWN"


@dataclass(frozen=True, slots=True)
class DeadLetterDetails:
    """What a dead-letter record says about the failure, whatever wrote it. Unknown numbers are -1, unknown
    text is empty; `payload` is the failed record's value (for a JSON envelope, its `payload`)."""

    format: DltFormat
    payload: bytes | None
    original_topic: str = ""
    original_partition: int = -1
    original_offset: int = -1
    original_timestamp_ms: int | None = None
    consumer_group: str = ""
    error_class: str = ""
    error_message: str = ""
    stack_trace: str = ""
    attempts: int = 0
    failed_at_ms: int | None = None
    reprocess_count: int = 0  # how often the failed record had been replayed before it failed (again)


def read_dead_letter(
    headers: Sequence[tuple[str, bytes]], value: bytes | None, *, timestamp_ms: int | None = None
) -> DeadLetterDetails:
    """The failure details of a DLT record in any of the three formats the contract names; a record in
    none of them is UNKNOWN (still listed, with its raw headers). `timestamp_ms` is the DLT record's own
    timestamp: when the dead letter was written, where the format does not say."""
    last = {name: raw for name, raw in headers}  # the last value of a repeated header wins, as in Spring
    replays = _number(last.get(REPLAY_COUNT), 0)
    if DLT_PREFIX + "original-topic" in last:
        return _kpg(last, value, timestamp_ms, replays)
    if SPRING_PREFIX + "original-topic" in last:
        return _spring(last, value, timestamp_ms, replays)
    envelope = _envelope(value)
    if envelope is not None:
        return _from_envelope(envelope, timestamp_ms, replays)
    return DeadLetterDetails(DltFormat.UNKNOWN, value, failed_at_ms=timestamp_ms, reprocess_count=replays)


def _kpg(
    last: dict[str, bytes], value: bytes | None, timestamp_ms: int | None, replays: int
) -> DeadLetterDetails:
    def text(name: str) -> str:
        return last.get(DLT_PREFIX + name, b"").decode(errors="replace")

    return DeadLetterDetails(
        format=DltFormat.KPG,
        payload=value,
        original_topic=text("original-topic"),
        original_partition=_number(last.get(DLT_PREFIX + "original-partition"), -1),
        original_offset=_number(last.get(DLT_PREFIX + "original-offset"), -1),
        original_timestamp_ms=_optional_number(last.get(DLT_PREFIX + "original-timestamp")),
        consumer_group=text("consumer-group"),
        error_class=text("error-class"),
        error_message=text("error-message"),
        stack_trace=text("stacktrace"),
        attempts=max(0, _number(last.get(DLT_PREFIX + "attempts"), 0)),
        failed_at_ms=_iso_ms(text("failed-at")) or timestamp_ms,
        reprocess_count=replays,
    )


def _spring(
    last: dict[str, bytes], value: bytes | None, timestamp_ms: int | None, replays: int
) -> DeadLetterDetails:
    """Spring Kafka's DeadLetterPublishingRecoverer: partition a 4-byte, offset and timestamp 8-byte
    big-endian integers (other writers put decimal text there: both are read)."""

    def text(name: str) -> str:
        return last.get(SPRING_PREFIX + name, b"").decode(errors="replace")

    return DeadLetterDetails(
        format=DltFormat.SPRING,
        payload=value,
        original_topic=text("original-topic"),
        original_partition=_number(last.get(SPRING_PREFIX + "original-partition"), -1),
        original_offset=_number(last.get(SPRING_PREFIX + "original-offset"), -1),
        original_timestamp_ms=_optional_number(last.get(SPRING_PREFIX + "original-timestamp")),
        consumer_group=text("original-consumer-group"),
        error_class=text("exception-fqcn") or text("exception-cause-fqcn"),
        error_message=text("exception-message"),
        stack_trace=text("exception-stacktrace"),
        failed_at_ms=timestamp_ms,
        reprocess_count=replays,
    )


def _envelope(value: bytes | None) -> dict[str, Any] | None:
    if not value or not value.lstrip().startswith(b"{"):
        return None
    try:
        body = json.loads(value)
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("originalTopic"), str):
        return None
    return body


def _from_envelope(body: dict[str, Any], timestamp_ms: int | None, replays: int) -> DeadLetterDetails:
    payload = body.get("payload")
    if payload is None:
        raw = None
    elif isinstance(payload, str):
        raw = payload.encode()
    else:
        raw = json.dumps(payload, separators=(",", ":")).encode()

    def text(key: str) -> str:
        found = body.get(key)
        return "" if found is None else str(found)

    def integer(key: str, default: int) -> int:
        found = body.get(key)
        if isinstance(found, bool):
            return default
        if isinstance(found, int):
            return found
        if isinstance(found, str) and _DECIMAL.fullmatch(found.encode()):
            return int(found)
        return default

    original_timestamp = integer("originalTimestamp", -1)
    return DeadLetterDetails(
        format=DltFormat.JSON_ENVELOPE,
        payload=raw,
        original_topic=text("originalTopic"),
        original_partition=integer("originalPartition", -1),
        original_offset=integer("originalOffset", -1),
        original_timestamp_ms=original_timestamp if original_timestamp >= 0 else None,
        consumer_group=text("consumerGroup"),
        error_class=text("errorClass"),
        error_message=text("errorMessage"),
        stack_trace=text("stackTrace"),
        attempts=max(0, integer("attempts", 0)),
        failed_at_ms=_iso_ms(text("failedAt")) or timestamp_ms,
        reprocess_count=replays,
    )


def _number(raw: bytes | None, default: int) -> int:
    """A header holding an integer as decimal text, or as a 4- or 8-byte big-endian binary (Spring)."""
    found = _optional_number(raw)
    return default if found is None else found


def _optional_number(raw: bytes | None) -> int | None:
    if not raw:
        return None
    if _DECIMAL.fullmatch(raw):
        return int(raw)
    if len(raw) in (4, 8):
        return int.from_bytes(raw, "big", signed=True)
    return None


def _iso_ms(text: str) -> int | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def dead_letter_id(dlt_topic_name: str, partition: int, offset: int) -> str:
    """The contract's id of a dead letter: `<dlt_topic>:<partition>:<offset>`."""
    return f"{dlt_topic_name}:{partition}:{offset}"


def parse_dead_letter_id(value: str) -> tuple[str, int, int] | None:
    """(DLT topic, partition, offset) of an id, or None if it is not one (the topic must end in `.DLT`)."""
    topic, _, rest = value.rpartition(":")
    topic, _, partition = topic.rpartition(":")
    if not topic.endswith(_DLT_SUFFIX) or not partition.isdecimal() or not rest.isdecimal():
        return None
    if len(partition) > 10 or len(rest) > 19:
        return None
    return topic, int(partition), int(rest)


def replay_headers(
    headers: Sequence[tuple[str, bytes]], *, replayed_from: str, replay_count: int, consumer_group: str = ""
) -> list[tuple[str, bytes]]:
    """The headers a replayed record carries: the failed record's own, without any DLT header (the
    gateway's or Spring's) or earlier replay marks, plus `kpg-replayed-from`, `kpg-replay-count` and, when
    the dead letter names it, the consumer group it is for (`kpg-replay-consumer-group`)."""
    dropped = (DLT_PREFIX, SPRING_PREFIX)
    kept = [
        (name, raw)
        for name, raw in headers
        if not name.startswith(dropped) and name not in (REPLAYED_FROM, REPLAY_COUNT, REPLAY_GROUP)
    ]
    marks = [(REPLAYED_FROM, replayed_from.encode()), (REPLAY_COUNT, str(replay_count).encode())]
    if consumer_group:
        marks.append((REPLAY_GROUP, consumer_group.encode()))
    return [*kept, *marks]


def replayed_for(headers: Sequence[tuple[str, bytes]]) -> str | None:
    """For a replayed record, the consumer group it was replayed for ("" when any group); None when the
    record is not a replay. A consumer that did process the original skips a replay meant for another."""
    replay: str | None = None
    for name, raw in headers:
        if name == REPLAYED_FROM and replay is None:
            replay = ""
        elif name == REPLAY_GROUP:
            replay = raw.decode(errors="replace")
    return replay


class DeadLetterState(enum.StrEnum):
    """Contract: DeadLetter.state."""

    NEW = "NEW"
    REPROCESSED = "REPROCESSED"
    DISCARDED = "DISCARDED"


@dataclass(frozen=True, slots=True)
class Resolution:
    """What operators did with one dead letter (the value of its key in the state topic). `replays` counts
    the times this very record was sent back; `state` is the last thing done to it."""

    state: DeadLetterState = DeadLetterState.NEW
    replays: int = 0
    reason: str = ""  # the discard reason, for the audit trail
    target: str = ""  # where the last replay went
    at_ms: int = 0

    def encode(self) -> bytes:
        return json.dumps(
            {
                "state": self.state.value,
                "replays": self.replays,
                "reason": self.reason,
                "target": self.target,
                "at": self.at_ms,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> Resolution | None:
        """The resolution a state record holds; None for a tombstone or a value this gateway did not write."""
        if not raw:
            return None
        try:
            body = json.loads(raw)
            return cls(
                state=DeadLetterState(body["state"]),
                replays=int(body.get("replays", 0)),
                reason=str(body.get("reason", "")),
                target=str(body.get("target", "")),
                at_ms=int(body.get("at", 0)),
            )
        except (ValueError, TypeError, KeyError):
            return None

    def replayed(self, target: str, now_ms: int) -> Resolution:
        return Resolution(DeadLetterState.REPROCESSED, self.replays + 1, "", target, now_ms)

    def discarded(self, reason: str, now_ms: int) -> Resolution:
        return Resolution(DeadLetterState.DISCARDED, self.replays, reason, self.target, now_ms)


NOT_RESOLVED = Resolution()


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of a dead-letter topic with what its format says about the failure, and what operators
    did with it."""

    dlt_topic: str
    partition: int
    offset: int
    key: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    details: DeadLetterDetails
    resolution: Resolution = NOT_RESOLVED

    @property
    def id(self) -> str:
        return dead_letter_id(self.dlt_topic, self.partition, self.offset)

    @property
    def state(self) -> DeadLetterState:
        return self.resolution.state

    @property
    def size(self) -> int:
        """Roughly its bytes in an answer: key, payload, headers and the text read from them."""
        details = self.details
        return (
            len(self.key or b"")
            + len(details.payload or b"")
            + sum(len(name) + len(raw) for name, raw in self.headers)
            + len(details.stack_trace)
            + len(details.error_message)
            + 200
        )

    @property
    def reprocess_count(self) -> int:
        """Replays of the failed record before it came here (its header) plus replays of this record."""
        return self.details.reprocess_count + self.resolution.replays

    def replay(self, target: str) -> tuple[bytes | None, list[tuple[str, bytes]]]:
        """The value and headers of this record sent back for processing (to `target`)."""
        headers = replay_headers(
            self.headers,
            replayed_from=self.id,
            replay_count=self.reprocess_count + 1,
            consumer_group=self.details.consumer_group,
        )
        return self.details.payload, headers


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """The contract's ListDeadLetters filters (`state` is read from the letter's resolution)."""

    original_topic: str = ""
    error_class: str = ""
    key: bytes | None = None
    since_ms: int | None = None  # failed at or after
    until_ms: int | None = None  # failed before
    state: DeadLetterState | None = None

    def matches(self, letter: DeadLetter) -> bool:
        details = letter.details
        failed_at = details.failed_at_ms
        return (
            (self.state is None or letter.state is self.state)
            and (not self.original_topic or details.original_topic == self.original_topic)
            and (not self.error_class or details.error_class == self.error_class)
            and (self.key is None or letter.key == self.key)
            and (self.since_ms is None or (failed_at is not None and failed_at >= self.since_ms))
            and (self.until_ms is None or (failed_at is not None and failed_at < self.until_ms))
        )


def is_dlt_topic(topic: str) -> bool:
    return topic.endswith(_DLT_SUFFIX) and len(topic) > len(_DLT_SUFFIX)


def never_a_target(topic: str) -> bool:
    """Topics no replay may go to: the gateway's internal ones (`kpg.*`), Kafka's (`_*`), dead-letter
    topics themselves."""
    return topic.startswith(("kpg.", "_")) or is_dlt_topic(topic)


def dlt_source(dlt: str) -> str:
    """The topic a dead-letter topic is named after (`orders.events` for `orders.events.DLT`)."""
    return dlt.removesuffix(_DLT_SUFFIX)
