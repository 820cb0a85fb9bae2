"""request-reply on the wire: the request's headers (the gateway's own and Spring Kafka's), and how a
record on the reply topic names the request it answers."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

CORRELATION_ID = "kpg-correlation-id"
REPLY_TOPIC = "kpg-reply-topic"
DEADLINE = "kpg-deadline"
# What Spring Kafka's ReplyingKafkaTemplate sends and a `@KafkaListener @SendTo` method copies back.
SPRING_CORRELATION_ID = "kafka_correlationId"
SPRING_REPLY_TOPIC = "kafka_replyTopic"
RESERVED_PREFIXES = ("kpg-", "kafka_")


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
        )


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
