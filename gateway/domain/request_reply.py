"""request-reply on the wire: the request's headers (the gateway's own and Spring Kafka's), how a
record on the reply topic names the request it answers, and what a caller may send.

Invariants:
- A caller cannot forge the gateway's plumbing or an event: header names starting with `kpg-`, `kafka_` or
  `ce_`, and `content-type` (all compared case-insensitively), are refused, and so are requests to event,
  dead-letter, reply and internal topics (`ProtectedTopics`), whatever the allowlist says.
- The size limit counts everything the caller puts in the record: key, payload and every header's name
  and value (UTF-8 bytes).
- A deployment (the gateways sharing one Redis) has one reply topic and group, named after its id.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from gateway.errors import InvalidArgument, PayloadTooLarge, TopicNotAllowed

CORRELATION_ID = "kpg-correlation-id"
REPLY_TOPIC = "kpg-reply-topic"
DEADLINE = "kpg-deadline"
# What Spring Kafka's ReplyingKafkaTemplate sends and a `@KafkaListener @SendTo` method copies back.
SPRING_CORRELATION_ID = "kafka_correlationId"
SPRING_REPLY_TOPIC = "kafka_replyTopic"
# Header names a caller may not set (lower case; compared case-insensitively): the gateway's and Spring's
# plumbing, and the CloudEvents binding of events (`ce_*`, `content-type`), so a request is never an event.
RESERVED_PREFIXES = ("kpg-", "kafka_", "ce_")
RESERVED_NAMES = frozenset({"content-type"})
# Topic names no request may target: the gateway's own (`kpg.`), Kafka's internal ones (`_`), dead letters.
INTERNAL_TOPIC_PREFIXES = ("kpg.", "_")
DLT_SUFFIX = ".DLT"
EVENTS_SUFFIX = ".events"
MAX_CORRELATION_ID = 200
_DEPLOYMENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # fullmatch: `$` accepts a trailing newline


class ReplyStatus(Enum):
    PENDING = "PENDING"
    REPLIED = "REPLIED"
    TIMED_OUT = "TIMED_OUT"


@dataclass(frozen=True, slots=True)
class Request:
    topic: str
    key: bytes
    payload: bytes
    headers: Mapping[str, str]
    timeout_ms: int
    correlation_id: str
    idempotency_key: str = ""

    def fingerprint(self) -> str:
        body = json.dumps(
            [
                self.topic,
                self.key.hex(),
                hashlib.sha256(self.payload).hexdigest(),
                sorted(self.headers.items()),
            ]
        )
        return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Reply:
    correlation_id: str
    status: ReplyStatus
    payload: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    reply_topic: str = ""
    partition: int = 0
    offset: int = 0
    duplicate: bool = False
    # When the service wrote the reply record (its timestamp) and when a gateway consumed it, epoch ms:
    # the legs of a round trip (services/request_reply.py's LEGS). 0 when not known.
    replied_at_ms: int = 0
    consumed_at_ms: int = 0

    def encode(self) -> bytes:
        return json.dumps(
            {
                "correlation_id": self.correlation_id,
                "status": self.status.value,
                "payload": base64.b64encode(self.payload).decode(),
                "headers": dict(self.headers),
                "reply_topic": self.reply_topic,
                "partition": self.partition,
                "offset": self.offset,
                "replied_at_ms": self.replied_at_ms,
                "consumed_at_ms": self.consumed_at_ms,
            }
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Reply:
        body = json.loads(raw)
        return cls(
            correlation_id=body["correlation_id"],
            status=ReplyStatus(body["status"]),
            payload=base64.b64decode(body["payload"]),
            headers=body["headers"],
            reply_topic=body["reply_topic"],
            partition=body["partition"],
            offset=body["offset"],
            replied_at_ms=body.get("replied_at_ms", 0),  # stored by a gateway before they were kept
            consumed_at_ms=body.get("consumed_at_ms", 0),
        )


@dataclass(frozen=True, slots=True)
class RequestLimits:
    max_bytes: int
    max_timeout_ms: int


@dataclass(frozen=True, slots=True)
class ProtectedTopics:
    """Topics no request may target, even when the allowlist matches them.

    `event_topics` are the declared categories' topics; with `any_events` (allow_undeclared_categories)
    every `*.events` topic may be a category's, so all of them are refused; `reply_topic` is the
    deployment's own (a request there would be taken for a reply)."""

    event_topics: frozenset[str] = frozenset()
    any_events: bool = False
    reply_topic: str = ""

    def why_refused(self, topic: str) -> str | None:
        """Why `topic` may not be requested, or None when it may (subject to the allowlist)."""
        if topic in self.event_topics or (self.any_events and topic.endswith(EVENTS_SUFFIX)):
            return "is a category's event topic"
        if topic.startswith(INTERNAL_TOPIC_PREFIXES):
            return "is an internal topic (kpg.* or _*)"
        if topic.endswith(DLT_SUFFIX):
            return "is a dead-letter topic"
        if self.reply_topic and topic == self.reply_topic:
            return "is the gateway's reply topic"
        return None

    def check(self, topic: str) -> None:
        reason = self.why_refused(topic)
        if reason is not None:
            raise TopicNotAllowed(f"topic {topic!r} {reason}", metadata={"topic": topic})


def header_name_problem(name: str) -> str | None:
    """Why a caller may not set a header named `name`, or None when it may."""
    if not name or not name.isprintable():
        return "a header name must be non-empty printable text"
    lowered = name.lower()
    if lowered.startswith(RESERVED_PREFIXES) or lowered in RESERVED_NAMES:
        return "kpg-*, kafka_*, ce_* and content-type headers are the gateway's"
    return None


def record_bytes(request: Request) -> int:
    """The bytes the caller puts in the record: key, payload and every header's name and value."""
    headers = sum(len(name.encode()) + len(value.encode()) for name, value in request.headers.items())
    return len(request.key) + len(request.payload) + headers


def validate_request(request: Request, limits: RequestLimits) -> None:
    """The request rules that need no state (the topic's rules are `ProtectedTopics` and the allowlist)."""
    if not request.topic:
        raise InvalidArgument.field("topic", "is required")
    for name in request.headers:
        problem = header_name_problem(name)
        if problem is not None:
            shown = name if name.isprintable() else name.encode("unicode_escape").decode("ascii")
            raise InvalidArgument.field(f"headers[{shown}]", problem)
    size = record_bytes(request)
    if size > limits.max_bytes:
        raise PayloadTooLarge(
            f"the request is {size} bytes (key, payload and headers); the limit is {limits.max_bytes}",
            metadata={"limit": str(limits.max_bytes)},
        )
    if request.timeout_ms > limits.max_timeout_ms:
        raise InvalidArgument.field("timeout_ms", f"must be at most {limits.max_timeout_ms}")
    correlation_id = request.correlation_id
    if not correlation_id or len(correlation_id) > MAX_CORRELATION_ID or not correlation_id.isprintable():
        raise InvalidArgument.field("correlation_id", f"must be 1-{MAX_CORRELATION_ID} printable characters")


def reply_names(deployment_id: str) -> tuple[str, str]:
    """The reply topic and consumer group of the deployment `deployment_id`."""
    if not _DEPLOYMENT_ID.fullmatch(deployment_id):
        raise ValueError(f"deployment id {deployment_id!r} must be 1-64 characters of [A-Za-z0-9_-]")
    return f"kpg.replies.{deployment_id}", f"kpg-replies-{deployment_id}"


def request_headers(request: Request, *, reply_topic: str, deadline_ms: int) -> list[tuple[str, bytes]]:
    headers = [(name, value.encode()) for name, value in request.headers.items()]
    headers += [
        (CORRELATION_ID, request.correlation_id.encode()),
        (REPLY_TOPIC, reply_topic.encode()),
        (DEADLINE, str(deadline_ms).encode()),
        (SPRING_CORRELATION_ID, request.correlation_id.encode()),
        (SPRING_REPLY_TOPIC, reply_topic.encode()),
    ]
    return headers


def correlation_of(headers: Sequence[tuple[str, bytes]]) -> str | None:
    """The correlation id a reply carries: the gateway's header, else Spring's."""
    found = dict(headers)
    raw = found.get(CORRELATION_ID) or found.get(SPRING_CORRELATION_ID)
    if not raw:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


def reply_headers(headers: Sequence[tuple[str, bytes]]) -> dict[str, str]:
    """A reply's headers as text (for the caller), without the correlation plumbing."""
    out = {}
    for name, value in headers:
        if name in (CORRELATION_ID, SPRING_CORRELATION_ID):
            continue
        out[name] = value.decode("utf-8", errors="replace")
    return out
