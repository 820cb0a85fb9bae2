"""Dead letters written by the gateway: `<topic>.DLT`, the failed record's key, value and headers, plus the
contract's `kpg-dlt-*` headers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

MAX_STACK_TRACE_BYTES = 8 * 1024
DLT_PREFIX = "kpg-dlt-"


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
