"""Plain records that cross the adapter edge, so no caller sees a confluent_kafka type."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

Header = tuple[str, bytes]


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[Header] = field(default_factory=tuple)
    timestamp_ms: int | None = None

    def header(self, name: str) -> bytes | None:
        """The last value of a header (Kafka allows repeats; the last one wins, as in Spring Kafka)."""
        for key, value in reversed(self.headers):
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Delivery:
    """The broker's acknowledgement of one produced record."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
