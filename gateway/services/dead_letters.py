"""DLT reprocessing, the reading side (issue 11, first part): dead-letter topics with their record counts,
a topic's dead letters filtered and keyset-paged, and one dead letter by position. Records are read from
Kafka chunk by chunk and a page stops at its limit, so a listing never holds a whole topic in memory.

Not here yet (see the README's dead-letter notes): the durable state (REPROCESSED, DISCARDED, replay
counts), Reprocess, Discard, the gRPC and REST bindings, the CLI and the metrics.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from dataclasses import dataclass

from gateway.adapters.kafka import KafkaAdmin, PartitionScanner, Record
from gateway.domain.dead_letters import DeadLetter, DeadLetterFilter, is_dlt_topic, read_dead_letter
from gateway.errors import InvalidArgument, NotFound


@dataclass(frozen=True, slots=True)
class DeadLetterTopic:
    topic: str
    partitions: int
    record_count: int  # records currently retained


@dataclass(frozen=True, slots=True)
class DeadLetterPage:
    dead_letters: list[DeadLetter]
    next_page_token: str  # empty on the last page


class DeadLetterReader:
    def __init__(
        self,
        admin: KafkaAdmin,
        scanner: PartitionScanner,
        *,
        default_limit: int = 100,
        max_limit: int = 1000,
        scan_timeout_s: float = 30.0,
    ) -> None:
        self._admin = admin
        self._scanner = scanner
        self._default_limit = default_limit
        self._max_limit = max_limit
        self._scan_timeout_s = scan_timeout_s

    async def topics(self) -> list[DeadLetterTopic]:
        """Every topic ending in `.DLT`, by name, with the records it retains."""
        found = []
        for topic, partitions in sorted((await self._admin.list_topics()).items()):
            if is_dlt_topic(topic):
                marks = await self._admin.watermarks(topic)
                found.append(
                    DeadLetterTopic(topic, partitions, sum(high - low for low, high in marks.values()))
                )
        return found

    async def list_dead_letters(
        self, dlt_topic: str, filters: DeadLetterFilter, *, limit: int = 0, page_token: str = ""
    ) -> DeadLetterPage:
        """The dead letters of `dlt_topic` that match, by partition then offset, at most `limit` per page."""
        if limit > self._max_limit:
            raise InvalidArgument.field("limit", f"must be at most {self._max_limit}")
        limit = limit or self._default_limit
        marks = await self._watermarks(dlt_topic)
        after = _decode_token(page_token) if page_token else (min(marks), 0)
        found: list[DeadLetter] = []
        for partition in sorted(p for p in marks if p >= after[0]):
            low, high = marks[partition]
            start = max(low, after[1]) if partition == after[0] else low
            async with contextlib.aclosing(
                self._scanner.scan(dlt_topic, partition, start, high, timeout_s=self._scan_timeout_s)
            ) as chunks:
                async for chunk in chunks:
                    for record in chunk:
                        letter = _letter(record)
                        if filters.matches(letter):
                            found.append(letter)
                            if len(found) == limit:
                                return DeadLetterPage(found, _encode_token(partition, record.offset + 1))
        return DeadLetterPage(found, "")

    async def get(self, dlt_topic: str, partition: int, offset: int) -> DeadLetter:
        marks = await self._watermarks(dlt_topic)
        low, high = marks.get(partition, (0, 0))
        if partition in marks and low <= offset < high:
            async with contextlib.aclosing(
                self._scanner.scan(dlt_topic, partition, offset, offset + 1, timeout_s=self._scan_timeout_s)
            ) as chunks:
                async for chunk in chunks:
                    for record in chunk:
                        if record.offset == offset:
                            return _letter(record)
        raise NotFound(
            f"no dead letter at {dlt_topic}[{partition}]@{offset}",
            metadata={"dlt_topic": dlt_topic, "partition": str(partition), "offset": str(offset)},
        )

    async def _watermarks(self, dlt_topic: str) -> dict[int, tuple[int, int]]:
        if not is_dlt_topic(dlt_topic):
            raise InvalidArgument.field("dlt_topic", "must name a dead-letter topic (ending in .DLT)")
        if await self._admin.partitions(dlt_topic) is None:
            raise NotFound(f"no dead-letter topic {dlt_topic!r}", metadata={"dlt_topic": dlt_topic})
        return await self._admin.watermarks(dlt_topic)


def _letter(record: Record) -> DeadLetter:
    return DeadLetter(
        dlt_topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        headers=tuple(record.headers),
        details=read_dead_letter(record.headers, record.value, timestamp_ms=record.timestamp_ms),
    )


def _encode_token(partition: int, offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([partition, offset]).encode()).decode().rstrip("=")


def _decode_token(token: str) -> tuple[int, int]:
    try:
        partition, offset = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not (isinstance(partition, int) and isinstance(offset, int)) or partition < 0 or offset < 0:
            raise ValueError(token)
        return partition, offset
    except (ValueError, TypeError, binascii.Error):
        raise InvalidArgument.field("page_token", "is not a token this gateway returned") from None
