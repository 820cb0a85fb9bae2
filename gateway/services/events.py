"""append-event: the event store on Kafka.

How versions stay contiguous with any number of appenders and gateways:
- A stream lives on one partition of its category topic (murmur2 of the stream id, as Kafka's Java
  clients choose). Each partition has at most one writer at a time: the gateway holding its Redis lease.
- The writer appends through a transactional producer whose transactional.id belongs to the partition.
  Initialising it fences any earlier writer (a crashed, paused or partitioned gateway) and aborts the
  transaction it left open, so only one writer can ever commit, whatever happens to Redis.
- After taking over, the writer waits until the stream index (read_committed) has applied the partition
  up to its last stable offset: the heads it reads there are the log's truth, not a guess.
- While it holds the partition it keeps the heads itself and group-commits queued appends, one Kafka
  transaction per batch. An append is answered only after its transaction committed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime

from gateway.adapters.kafka import (
    KafkaAdmin,
    OutcomeUnknown,
    OutRecord,
    TopicSpec,
    TopicTail,
    TransactionalProducer,
    WriterFenced,
)
from gateway.adapters.redis import LeaseStore
from gateway.definitions import Definitions
from gateway.domain.events import (
    AppendRequest,
    AppendResult,
    Limits,
    Position,
    StoredEvent,
    check_name,
    event_headers,
    parse_event,
    partition_for,
    validate_append,
)
from gateway.errors import (
    BackendUnavailable,
    GatewayError,
    InvalidArgument,
    NotFound,
    ReadModelBehind,
    WrongExpectedVersion,
)
from gateway.services.idempotency import Idempotency
from gateway.services.stream_indexer import StreamIndexer
from gateway.settings import EventsSettings, KafkaSettings

log = logging.getLogger(__name__)

StreamKey = tuple[str, str]
RECENT_IDS = 50_000
MAX_ATTEMPTS = 3


def _encode(result: AppendResult) -> bytes:
    return json.dumps(asdict(result)).encode()


def _decode(raw: bytes) -> AppendResult:
    return AppendResult(**json.loads(raw))


class EventStore:
    def __init__(
        self,
        *,
        settings: EventsSettings,
        kafka: KafkaSettings,
        definitions: Definitions,
        admin: KafkaAdmin,
        leases: LeaseStore,
        idempotency: Idempotency,
        indexer: StreamIndexer,
    ) -> None:
        self._settings = settings
        self._kafka = kafka
        self._definitions = definitions
        self._admin = admin
        self._leases = leases
        self._idempotency = idempotency
        self._indexer = indexer
        self._limits = Limits(
            settings.max_events_per_append, settings.max_event_bytes, settings.max_append_bytes
        )
        self._partitions: dict[str, int] = {}
        self._writers: dict[tuple[str, int], PartitionWriter] = {}

    # --- AppendEvents ----------------------------------------------------------------------------------

    async def append(self, request: AppendRequest) -> AppendResult:
        validate_append(request, self._limits)
        topic = self.topic_of(request.category)
        partition = partition_for(request.stream_id, await self._partition_count(topic, create=True))
        writer = self._writer(topic, partition)
        result, duplicate = await self._idempotency.run(
            "append-events",
            request.implicit_key(),
            fingerprint=request.fingerprint(),
            action=lambda: writer.submit(request),
            encode=_encode,
            decode=_decode,
        )
        return replace(result, duplicate=True) if duplicate else result

    def topic_of(self, category: str) -> str:
        check_name("category", category, category=True)
        if category not in self._definitions.categories and not self._definitions.allow_undeclared_categories:
            raise NotFound(
                f"category {category!r} is not declared in the definitions file",
                metadata={"category": category},
            )
        return self._definitions.category_topic(category)

    async def _partition_count(self, topic: str, *, create: bool = False) -> int:
        count = self._partitions.get(topic)
        if count is None:
            count = await self._admin.partitions(topic)
            if count is None and create:  # an undeclared category (allow_undeclared_categories)
                await self._admin.ensure_topics([TopicSpec(topic, self._kafka.default_partitions)])
                count = await self._admin.partitions(topic)
            if count is None:
                raise NotFound(f"the event topic {topic!r} does not exist", metadata={"topic": topic})
            self._partitions[topic] = count
        return count

    def _writer(self, topic: str, partition: int) -> PartitionWriter:
        writer = self._writers.get((topic, partition))
        if writer is None:
            writer = PartitionWriter(
                topic=topic,
                partition=partition,
                kafka=self._kafka,
                settings=self._settings,
                leases=self._leases,
                indexer=self._indexer,
                admin=self._admin,
            )
            self._writers[(topic, partition)] = writer
        return writer

    # --- ReadStream ------------------------------------------------------------------------------------

    async def read_stream(
        self,
        category: str,
        stream_id: str,
        *,
        from_version: int = 0,
        max_count: int = 0,
        backwards: bool = False,
        min_position: str = "",
        wait_timeout_ms: int = 0,
    ) -> tuple[list[StoredEvent], int]:
        """Events of one stream from the stream index, and the stream's head version."""
        topic = self.topic_of(category)
        check_name("stream_id", stream_id)
        if max_count > self._settings.read_max_count:
            raise InvalidArgument.field("max_count", f"must be at most {self._settings.read_max_count}")
        if min_position:
            await self.wait_for_position(topic, min_position, wait_timeout_ms)
        events, head = await asyncio.to_thread(
            self._indexer.index.read,
            category,
            stream_id,
            from_version=from_version,
            max_count=max_count or self._settings.read_default_count,
            backwards=backwards,
        )
        if head == 0:
            raise NotFound(
                f"stream {category}/{stream_id} does not exist",
                metadata={"category": category, "stream_id": stream_id},
            )
        return events, head

    async def wait_for_position(self, topic: str, position: str, wait_timeout_ms: int) -> None:
        """Read-your-writes: wait until the stream index has applied `position`."""
        decoded = Position.decode(position, field_name="min_position")
        if decoded.topic != topic:
            raise InvalidArgument.field(
                "min_position", f"is a position of {decoded.topic!r}, not of {topic!r}"
            )
        timeout_s = (wait_timeout_ms or 5000) / 1000
        deadline = time.monotonic() + timeout_s
        for partition, offset in decoded.offsets.items():
            remaining = max(0.0, deadline - time.monotonic())
            if not await self._indexer.wait_for(topic, partition, offset, remaining):
                raise ReadModelBehind(
                    f"the stream index has not reached the position within {timeout_s:.1f}s",
                    metadata={"topic": topic, "partition": str(partition), "offset": str(offset)},
                )

    # --- Subscribe -------------------------------------------------------------------------------------

    async def subscribe(
        self,
        category: str,
        stream_id: str = "",
        *,
        from_version: int = 0,
        from_position: str = "",
    ) -> AsyncIterator[tuple[StoredEvent, str]]:
        """Catch up from the log, then follow it live: each event with the position just after it.

        Reading the log itself (not the index) for both phases means there is no switch-over at which an
        event could be missed or repeated; resuming from a position continues exactly after it."""
        topic = self.topic_of(category)
        partitions = list(range(await self._partition_count(topic)))
        if stream_id:
            check_name("stream_id", stream_id)
            partitions = [partition_for(stream_id, len(partitions))]
        elif from_version:
            raise InvalidArgument.field("from_version", "needs a stream_id (a category has no versions)")
        start: dict[int, int | None] = dict.fromkeys(partitions)
        if from_position:
            position = Position.decode(from_position, field_name="from_position")
            if position.topic != topic:
                raise InvalidArgument.field("from_position", f"is a position of {position.topic!r}")
            start.update({p: o for p, o in position.offsets.items() if p in start})
        elif from_version > 1:
            start[partitions[0]] = await self._offset_of_version(
                category, stream_id, topic, partitions[0], from_version
            )
        return self._follow(topic, category, stream_id, start, from_version)

    async def _offset_of_version(
        self, category: str, stream_id: str, topic: str, partition: int, version: int
    ) -> int:
        index = self._indexer.index
        offset = await asyncio.to_thread(index.offset_of, category, stream_id, version)
        if offset is not None:
            return offset
        # Not indexed (yet): it lies after everything the index has applied on that partition.
        return (await asyncio.to_thread(index.progress, [(topic, partition)]))[(topic, partition)]

    async def _follow(
        self, topic: str, category: str, stream_id: str, start: dict[int, int | None], from_version: int
    ) -> AsyncIterator[tuple[StoredEvent, str]]:
        tail = TopicTail(self._kafka, topic, start)
        await tail.open()
        offsets = {p: (o or 0) for p, o in start.items()}
        last_version = max(from_version - 1, 0)
        try:
            while True:
                for record in await tail.read():
                    offsets[record.partition] = record.offset + 1
                    event = parse_event(
                        record.topic,
                        record.partition,
                        record.offset,
                        record.key,
                        record.value,
                        record.headers,
                        record.timestamp_ms,
                    )
                    if event is None or event.category != category:
                        continue
                    if stream_id:
                        if event.stream_id != stream_id or event.version <= last_version:
                            continue
                        last_version = event.version
                    yield event, Position(topic, dict(offsets)).encode()
        finally:
            await tail.close()

    async def close(self) -> None:
        await asyncio.gather(*(w.close() for w in self._writers.values()), return_exceptions=True)


@dataclass
class _Pending:
    request: AppendRequest
    future: asyncio.Future[AppendResult]
    attempts: int = 0


@dataclass
class _Planned:
    pending: _Pending
    first_version: int
    start: int  # index of its first record in the transaction
    count: int


@dataclass
class PartitionWriter:
    """The single writer of one partition while this gateway holds its lease (see the module doc)."""

    topic: str
    partition: int
    kafka: KafkaSettings
    settings: EventsSettings
    leases: LeaseStore
    indexer: StreamIndexer
    admin: KafkaAdmin
    _pending: list[_Pending] = field(default_factory=list)
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    _producer: TransactionalProducer | None = None
    _token: str = ""
    _renewer: asyncio.Task[None] | None = None
    _heads: dict[StreamKey, int] = field(default_factory=dict)
    _recent: OrderedDict[str, StoredEvent] = field(default_factory=OrderedDict)
    _held_since: float = 0.0
    _last_write: float = 0.0
    _handoff: bool = False
    _lease_lost: bool = False
    _closing: bool = False

    @property
    def lease_name(self) -> str:
        return f"es:{self.topic}:{self.partition}"

    async def submit(self, request: AppendRequest) -> AppendResult:
        if self._closing:
            raise BackendUnavailable("the gateway is shutting down")
        future: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(request, future))
        self._wakeup.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"writer:{self.lease_name}")
        return await future

    async def _run(self) -> None:
        idle_release_s = max(1.0, self.settings.lease_ttl_ms / 1000)
        try:
            while not self._closing:
                if self._handoff or self._lease_lost:
                    await self._release()
                self._pending = [p for p in self._pending if not p.future.done()]
                if not self._pending:
                    if self._producer is None or time.monotonic() - self._last_write > idle_release_s:
                        await self._release()
                        if not self._pending:
                            return  # idle: the next submit starts a new task
                        continue
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), 0.05)
                    except TimeoutError:
                        pass
                    continue
                try:
                    await self._ensure_writer()
                except GatewayError as exc:
                    self._fail(self._pending, exc)
                    self._pending = []
                    continue
                await self._write_batch()
        except Exception as exc:
            log.exception("writer %s failed", self.lease_name)
            self._fail(self._pending, BackendUnavailable(f"the writer of {self.lease_name} failed: {exc}"))
            self._pending = []
            await self._release()

    # --- taking over the partition ---------------------------------------------------------------------

    async def _ensure_writer(self) -> None:
        if self._producer is not None and self._producer.usable and not self._lease_lost:
            return
        await self._release()
        timeout_s = self.settings.append_timeout_ms / 1000
        deadline = time.monotonic() + timeout_s
        token = uuid.uuid4().hex
        ttl = self.settings.lease_ttl_ms
        while not await self.leases.acquire(self.lease_name, token, ttl):
            if time.monotonic() > deadline:
                raise BackendUnavailable(
                    f"timed out waiting for the writer of {self.topic}[{self.partition}] "
                    "(held by another gateway)",
                    metadata={"topic": self.topic, "partition": str(self.partition)},
                )
            await self.leases.want(self.lease_name, ttl_ms=max(200, 4 * self.settings.lease_renew_ms))
            await asyncio.sleep(0.02)
        self._token, self._lease_lost, self._handoff = token, False, False
        self._held_since = time.monotonic()
        self._renewer = asyncio.create_task(self._renew(), name=f"lease:{self.lease_name}")
        try:
            producer = TransactionalProducer(
                self.kafka,
                f"kpg-es.{self.topic}.{self.partition}",
                transaction_timeout_ms=self.settings.transaction_timeout_ms,
            )
            await producer.init(timeout_s)  # fences the previous writer and aborts what it left open
            self._producer = producer
            end = await self.admin.end_offset(self.topic, self.partition)
            if not await self.indexer.wait_for(
                self.topic, self.partition, end, max(1.0, deadline - time.monotonic())
            ):
                raise BackendUnavailable(
                    f"the stream index did not catch up with {self.topic}[{self.partition}] in time",
                    metadata={"topic": self.topic, "partition": str(self.partition)},
                )
        except BaseException:
            await self._release()
            raise
        self._heads.clear()
        self._recent.clear()
        self._last_write = time.monotonic()

    async def _renew(self) -> None:
        quantum_s = 0.1
        while True:
            await asyncio.sleep(self.settings.lease_renew_ms / 1000)
            try:
                held, wanted = await self.leases.renew(
                    self.lease_name, self._token, self.settings.lease_ttl_ms
                )
            except BackendUnavailable:
                continue  # Redis is down: Kafka's fencing still keeps writers apart
            if not held:
                self._lease_lost = True
                self._wakeup.set()
                return
            if wanted and time.monotonic() - self._held_since >= quantum_s:
                self._handoff = True
                self._wakeup.set()

    async def _release(self) -> None:
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.close()
        if self._token:
            token, self._token = self._token, ""
            try:
                await self.leases.release(self.lease_name, token)
            except BackendUnavailable:
                pass  # it expires by itself
        self._heads.clear()
        self._recent.clear()
        self._handoff = self._lease_lost = False

    # --- appending -------------------------------------------------------------------------------------

    async def _load_heads(self, batch: list[_Pending]) -> None:
        """Heads of the batch's streams this writer does not know yet, from the index in one query."""
        missing = {(p.request.category, p.request.stream_id) for p in batch} - self._heads.keys()
        if missing:
            self._heads.update(await asyncio.to_thread(self.indexer.index.heads, missing))

    async def _write_batch(self) -> None:
        batch, events = [], 0
        while self._pending and events < self.settings.max_batch_events:
            pending = self._pending.pop(0)
            if not pending.future.done():
                batch.append(pending)
                events += len(pending.request.events)
        try:
            await self._write(batch)
        except BaseException as exc:
            # Whatever went wrong, no caller of this batch is left waiting (and none is told "written").
            failure = exc if isinstance(exc, GatewayError) else BackendUnavailable(f"append failed: {exc!r}")
            self._fail(batch, failure)
            raise

    async def _write(self, batch: list[_Pending]) -> None:
        assert self._producer is not None
        await self._load_heads(batch)
        planned_heads: dict[StreamKey, int] = {}
        plans: list[_Planned] = []
        records: list[OutRecord] = []
        now = datetime.now(UTC)
        for pending in batch:
            request = pending.request
            key = (request.category, request.stream_id)
            head = planned_heads.get(key) or self._heads[key]
            try:
                duplicate = await self._duplicate_of(pending)
            except GatewayError as exc:
                pending.future.set_exception(exc)
                continue
            if duplicate is not None:
                pending.future.set_result(duplicate)
                continue
            if not request.expected.holds(head):
                pending.future.set_exception(
                    WrongExpectedVersion(
                        f"stream {request.category}/{request.stream_id} is at version {head}, "
                        f"expected {request.expected.describe()}",
                        metadata={"expected": request.expected.describe(), "actual": str(head)},
                    )
                )
                continue
            plans.append(_Planned(pending, head + 1, len(records), len(request.events)))
            for i, event in enumerate(request.events):
                records.append(
                    OutRecord(
                        self.topic,
                        self.partition,
                        request.stream_id.encode(),
                        event.data,
                        event_headers(request, event, head + 1 + i, now),
                    )
                )
            planned_heads[key] = head + len(request.events)
        if not records:
            return
        try:
            deliveries = await self._producer.send(records, self.settings.append_timeout_ms / 1000)
        except (WriterFenced, OutcomeUnknown) as exc:
            # Not written (fenced: aborted) or unknown: re-take the partition and re-read the truth. A retry
            # finds its own events by id if they did land, so it never appends them twice.
            log.warning("writer %s: %s", self.lease_name, exc)
            await self._release()
            retry = []
            for plan in plans:
                plan.pending.attempts += 1
                if plan.pending.attempts < MAX_ATTEMPTS:
                    retry.append(plan.pending)
                else:
                    plan.pending.future.set_exception(exc)
            self._pending[:0] = retry
            return
        except GatewayError as exc:
            self._fail([plan.pending for plan in plans], exc)
            return
        self._last_write = time.monotonic()
        self._heads.update(planned_heads)
        for plan in plans:
            request = plan.pending.request
            written = deliveries[plan.start : plan.start + plan.count]
            for i, (event, delivery) in enumerate(zip(request.events, written, strict=True)):
                self._remember(
                    StoredEvent(
                        event.event_id,
                        request.category,
                        request.stream_id,
                        plan.first_version + i,
                        event.type,
                        b"",
                        event.content_type,
                        {},
                        now,
                        self.topic,
                        self.partition,
                        delivery.offset,
                    )
                )
            if not plan.pending.future.done():
                plan.pending.future.set_result(
                    AppendResult(
                        first_version=plan.first_version,
                        last_version=plan.first_version + plan.count - 1,
                        topic=self.topic,
                        partition=self.partition,
                        first_offset=written[0].offset,
                        last_offset=written[-1].offset,
                        position=Position.after(self.topic, self.partition, written[-1].offset).encode(),
                    )
                )

    def _remember(self, event: StoredEvent) -> None:
        self._recent[event.event_id] = event
        if len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)

    async def _duplicate_of(self, pending: _Pending) -> AppendResult | None:
        """The earlier answer when these event ids are already in the stream (even if Redis forgot)."""
        request = pending.request
        if pending.attempts == 0 and not all(e.client_id for e in request.events):
            return None
        ids = [e.event_id for e in request.events]
        found = {i: self._recent[i] for i in ids if i in self._recent}
        if len(found) < len(ids):
            rows = await asyncio.to_thread(
                self.indexer.index.find_event_ids, request.category, request.stream_id, ids
            )
            found.update({r.event_id: r for r in rows})
        mine = [
            found[i]
            for i in ids
            if i in found
            and found[i].stream_id == request.stream_id
            and found[i].category == request.category
        ]
        if not mine:
            return None
        versions = [e.version for e in mine]
        if len(mine) < len(ids) or versions != list(range(versions[0], versions[0] + len(ids))):
            raise InvalidArgument.field(
                "events", "some of these event ids are already in the stream, not all"
            )
        return AppendResult(
            first_version=versions[0],
            last_version=versions[-1],
            topic=self.topic,
            partition=self.partition,
            first_offset=mine[0].offset,
            last_offset=mine[-1].offset,
            position=Position.after(self.topic, self.partition, mine[-1].offset).encode(),
            duplicate=True,
        )

    @staticmethod
    def _fail(pendings: list[_Pending], error: BaseException) -> None:
        for pending in pendings:
            if not pending.future.done():
                pending.future.set_exception(error)

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail(self._pending, BackendUnavailable("the gateway is shutting down"))
        await self._release()
