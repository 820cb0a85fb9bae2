"""Topic administration and the broker probe used by health checks and the dev stack."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import IsolationLevel, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec  # type: ignore[attr-defined]

from gateway.adapters.kafka.config import base_config
from gateway.errors import BackendUnavailable
from gateway.settings import KafkaSettings


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def kafka_answers(bootstrap_servers: str, timeout_s: float) -> bool:
    """True when a broker at `bootstrap_servers` answers a metadata request within the timeout."""
    # A throwaway client: its connection-refused chatter is expected while a broker starts.
    client = AdminClient({"bootstrap.servers": bootstrap_servers, "log_level": 0})
    try:
        metadata = client.list_topics(timeout=timeout_s)
    except KafkaException:
        return False
    return bool(metadata.brokers)


class KafkaAdmin:
    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._client = AdminClient(base_config(settings))

    async def ping(self, timeout_s: float) -> bool:
        def ask() -> bool:
            # Not list_topics(): its answer holds every topic of the cluster, and parsing it every few
            # seconds took 8% of a busy gateway's CPU on a broker with a few thousand topics.
            try:
                cluster = self._client.describe_cluster(request_timeout=timeout_s).result(timeout_s + 1)
                return bool(cluster.nodes)
            except (KafkaException, TimeoutError):
                return False

        return await asyncio.to_thread(ask)

    async def ensure_topics(self, specs: Iterable[TopicSpec], timeout_s: float = 30.0) -> list[str]:
        """Create the topics that do not exist yet; returns the names created. Existing ones are left as
        they are (a partition count is never changed behind an operator's back)."""
        unique = list({s.name: s for s in specs}.values())  # the broker rejects a name given twice
        if not unique:
            return []
        return await asyncio.to_thread(self._ensure_topics, unique, timeout_s)

    def _ensure_topics(self, specs: list[TopicSpec], timeout_s: float) -> list[str]:
        new = [
            NewTopic(
                s.name,
                num_partitions=s.partitions,
                replication_factor=self._settings.replication_factor,
                config=s.config,
            )
            for s in specs
        ]
        created = []
        try:
            futures = self._client.create_topics(new, operation_timeout=timeout_s, request_timeout=timeout_s)
            for name, future in futures.items():
                try:
                    future.result()
                    created.append(name)
                except KafkaException as exc:
                    if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise
        except KafkaException as exc:
            raise BackendUnavailable(f"creating Kafka topics failed: {exc.args[0]}") from exc
        return created

    async def list_topics(self, timeout_s: float = 10.0) -> dict[str, int]:
        """Topic name -> partition count."""

        def list_() -> dict[str, int]:
            metadata = self._client.list_topics(timeout=timeout_s)
            return {name: len(t.partitions) for name, t in metadata.topics.items() if t.error is None}

        topics: dict[str, int] = await self._run(list_)
        return topics

    async def delete_topics(self, names: Iterable[str], timeout_s: float = 30.0) -> None:
        def delete() -> None:
            for future in self._client.delete_topics(list(names), operation_timeout=timeout_s).values():
                future.result()

        await self._run(delete)

    async def record_counts(self, topics: dict[str, int], timeout_s: float = 10.0) -> dict[str, int]:
        """Records each topic retains (high minus low watermark, summed over its partitions), for many
        topics in two list-offsets requests rather than two per topic. `topics`: name -> partition count."""

        def counts() -> dict[str, int]:
            partitions = [TopicPartition(t, p) for t, n in topics.items() for p in range(n)]
            if not partitions:
                return {}
            first = {tp: OffsetSpec.earliest() for tp in partitions}  # type: ignore[no-untyped-call]
            last = {tp: OffsetSpec.latest() for tp in partitions}  # type: ignore[no-untyped-call]
            earliest = self._client.list_offsets(first, request_timeout=timeout_s)
            latest = self._client.list_offsets(last, request_timeout=timeout_s)
            found = dict.fromkeys(topics, 0)
            for tp in partitions:
                found[tp.topic] += latest[tp].result().offset - earliest[tp].result().offset
            return found

        result: dict[str, int] = await self._run(counts)
        return result

    async def watermarks(self, topic: str, timeout_s: float = 10.0) -> dict[int, tuple[int, int]]:
        """Partition -> (low, high) watermark offsets."""

        def offsets() -> dict[int, tuple[int, int]]:
            metadata = self._client.list_topics(topic, timeout=timeout_s).topics[topic]
            if metadata.error is not None:
                raise KafkaException(metadata.error)
            result: dict[int, tuple[int, int]] = {}
            partitions = [TopicPartition(topic, p) for p in metadata.partitions]
            earliest = self._client.list_offsets({tp: OffsetSpec.earliest() for tp in partitions})  # type: ignore[no-untyped-call]
            latest = self._client.list_offsets({tp: OffsetSpec.latest() for tp in partitions})  # type: ignore[no-untyped-call]
            for tp in partitions:
                low = earliest[tp].result().offset
                high = latest[tp].result().offset
                result[tp.partition] = (low, high)
            return result

        marks: dict[int, tuple[int, int]] = await self._run(offsets)
        return marks

    async def end_offset(
        self, topic: str, partition: int, timeout_s: float = 10.0, *, stable: bool = True
    ) -> int:
        """The last stable offset: where a read_committed reader of the partition ends (the high
        watermark when not `stable`: past every acknowledged record, even of a transaction still open,
        and never behind a commit that has just returned, as the last stable offset may be for a moment)."""

        def offset() -> int:
            tp = TopicPartition(topic, partition)
            futures = self._client.list_offsets(
                {tp: OffsetSpec.latest()},  # type: ignore[no-untyped-call]
                isolation_level=IsolationLevel.READ_COMMITTED if stable else IsolationLevel.READ_UNCOMMITTED,
                request_timeout=timeout_s,
            )
            return int(futures[tp].result().offset)

        end: int = await self._run(offset)
        return end

    async def partitions(self, topic: str, timeout_s: float = 10.0) -> int | None:
        """The topic's partition count, or None when it does not exist."""

        def count() -> int | None:
            metadata = self._client.list_topics(topic, timeout=timeout_s).topics.get(topic)
            if metadata is None or metadata.error is not None:
                return None
            return len(metadata.partitions)

        found: int | None = await self._run(count)
        return found

    async def _run(self, fn: Any) -> Any:
        try:
            return await asyncio.to_thread(fn)
        except KafkaException as exc:
            raise BackendUnavailable(f"Kafka admin request failed: {exc.args[0]}") from exc
