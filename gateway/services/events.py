"""append-event: the event store on Kafka.

How versions stay contiguous with any number of appenders and gateways:
- A stream lives on one partition of its category topic (murmur2 of the stream id, as Kafka's Java
  clients choose). Each partition has at most one writer at a time: the gateway holding its Redis lease.
- The writer appends through a transactional producer whose transactional.id belongs to the partition.
  Initialising it fences any earlier writer (a crashed, paused or partitioned gateway) and aborts the
  transaction it left open, so only one writer can ever commit, whatever happens to Redis.
- After taking over, the writer learns what it needs from the log itself, never by waiting for a
  consumer: the stream index answers for everything below its progress, and the writer reads the rest
  of the partition (index progress, or where it last knew the log, up to the last stable offset)
  with a read_committed scan. Taking a partition back costs a fetch, whatever the index's lag.
- While it holds the partition it keeps the heads itself and group-commits queued appends, one Kafka
  transaction per batch. An append is answered only after its transaction committed.
- Retries never append twice: event ids are looked up (in what the writer knows of the log, then in the
  index) before planning; ids the gateway generates are derived from the idempotency key, so a retry
  under the same key finds its events even when Redis forgot the key.
- ReadStream reads its own writes: it waits (bounded) until the index has applied the stream's last
  write this gateway knows of, or else the partition's high watermark.
- Under `kpg serve --workers N` each partition has an owning worker (`Peers.owner`); the others forward
  its appends there, so workers never take a partition's writer from each other. An owner that cannot
  be reached (restarting) is covered by the lease: the forwarding worker then appends itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime

from prometheus_client import Gauge, Histogram

from gateway.adapters.kafka import (
    Delivery,
    KafkaAdmin,
    OutcomeUnknown,
    OutRecord,
    PartitionScanner,
    Record,
    RecordsRejected,
    TopicSpec,
    TopicTail,
    TransactionAborted,
    TransactionalProducer,
    WriterFenced,
)
from gateway.adapters.peers import Peers, PeerUnreachable
from gateway.adapters.redis import LeaseStore
from gateway.adapters.sql import StreamIndex
from gateway.definitions import Definitions
from gateway.domain.dead_letters import dlt_topic, replayed_for
from gateway.domain.events import (
    AppendRequest,
    AppendResult,
    Limits,
    Position,
    ReadStreamQuery,
    StoredEvent,
    SubscribeQuery,
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
    RateLimited,
    ReadModelBehind,
    WrongExpectedVersion,
)
from gateway.services.idempotency import Idempotency
from gateway.services.read_lag import ReadLag
from gateway.services.stream_indexer import StreamIndexer
from gateway.settings import EventsSettings, KafkaSettings
from gateway.tasks import bounded, raise_if_cancelling, stop_task

log = logging.getLogger(__name__)

StreamKey = tuple[str, str]
MAX_ATTEMPTS = 3
# Streams and event ids a writer remembers before it forgets what the index already holds.
MAX_KNOWN = 200_000
# Event ids the gateway generates under an idempotency key are derived from it (uuid5 in this namespace).
TAKEOVER = Histogram(
    "kpg_writer_takeover_seconds",
    "Taking a partition: lease, fencing the previous writer, reading the log the index has not applied",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SUBSCRIBERS = Gauge(
    "kpg_event_subscribers",
    "Live Subscribe calls (gRPC and SSE) this gateway serves",
    multiprocess_mode="livesum",
)
DERIVED_IDS = uuid.UUID("6f3c2a4e-9a51-4c1e-8d0b-2b7f4b9e6a10")


def _encode(result: AppendResult) -> bytes:
    return json.dumps(asdict(result)).encode()


def _decode(raw: bytes) -> AppendResult:
    return AppendResult(**json.loads(raw))


def event_topic_config(kafka: KafkaSettings) -> dict[str, str]:
    """Event topics are the store itself: kept forever, and able to hold the largest append."""
    return {
        "retention.ms": "-1",
        "retention.bytes": "-1",
        "cleanup.policy": "delete",
        "max.message.bytes": str(kafka.max_record_bytes),
    }


def event_topic_specs(kafka: KafkaSettings, topic: str, partitions: int) -> list[TopicSpec]:
    """A category's event topic and its dead-letter topic (which must hold a dead letter of any event)."""
    config = event_topic_config(kafka)
    return [
        TopicSpec(topic, partitions, config),
        TopicSpec(dlt_topic(topic), partitions, {"max.message.bytes": config["max.message.bytes"]}),
    ]


def with_derived_ids(request: AppendRequest) -> AppendRequest:
    """Under an idempotency key, the ids the gateway generated become uuid5(key, stream, index): the same
    on every retry, so the writer can find a retry's events in the log even if Redis lost the key."""
    if not request.idempotency_key or all(e.client_id for e in request.events):
        return request
    prefix = f"{request.category}\n{request.stream_id}\n{request.idempotency_key}\n"
    events = tuple(
        e if e.client_id else replace(e, event_id=str(uuid.uuid5(DERIVED_IDS, f"{prefix}{i}")))
        for i, e in enumerate(request.events)
    )
    return replace(request, events=events)


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
        scanner: PartitionScanner,
        read_lag: ReadLag | None = None,
        peers: Peers | None = None,
    ) -> None:
        self._settings = settings
        self._read_lag = read_lag or ReadLag(max_lag=settings.max_read_lag)
        self._peers = peers
        self._kafka = kafka
        self._definitions = definitions
        self._admin = admin
        self._leases = leases
        self._idempotency = idempotency
        self._indexer = indexer
        self._scanner = scanner
        self._limits = Limits(
            settings.max_events_per_append, settings.max_event_bytes, settings.max_append_bytes
        )
        self._partitions: dict[str, int] = {}
        self._writers: dict[tuple[str, int], PartitionWriter] = {}
        # Where appends forwarded to their owning worker ended, per stream (for read-your-writes).
        self._forwarded: OrderedDict[StreamKey, int] = OrderedDict()
        self._subscribers = 0

    def topics(self) -> list[TopicSpec]:
        """The declared categories' event topics (kept forever) and their dead-letter topics."""
        specs = []
        for name, category in self._definitions.categories.items():
            partitions = category.partitions or self._kafka.default_partitions
            specs += event_topic_specs(self._kafka, self._definitions.category_topic(name), partitions)
        return specs

    # --- AppendEvents ----------------------------------------------------------------------------------

    async def append(self, request: AppendRequest) -> AppendResult:
        validate_append(request, self._limits)
        topic = self.topic_of(request.category)
        partition = partition_for(request.stream_id, await self._partition_count(topic, create=True))
        peers = self._peers
        if peers is not None and (owner := peers.owner(f"{topic}/{partition}")) != peers.index:
            try:
                result: AppendResult = await peers.call(
                    owner, "append", request, self._settings.append_timeout_ms / 1000 + 5.0
                )
            except PeerUnreachable as exc:
                log.debug("appending to %s[%d] here: %s", topic, partition, exc)
            else:
                self._note_forwarded((request.category, request.stream_id), result.last_offset + 1)
                return result
        return await self._append_here(request, topic, partition)

    async def append_forwarded(self, request: AppendRequest) -> AppendResult:
        """An append another worker forwarded here, its partition's owner."""
        validate_append(request, self._limits)
        topic = self.topic_of(request.category)
        partition = partition_for(request.stream_id, await self._partition_count(topic, create=True))
        return await self._append_here(request, topic, partition)

    def _note_forwarded(self, stream: StreamKey, offset: int) -> None:
        self._forwarded[stream] = max(offset, self._forwarded.get(stream, 0))
        self._forwarded.move_to_end(stream)
        if len(self._forwarded) > MAX_KNOWN:
            self._forwarded.popitem(last=False)

    async def _append_here(self, request: AppendRequest, topic: str, partition: int) -> AppendResult:
        request = with_derived_ids(request)
        writer = self._writer(topic, partition)
        stable_ids = bool(request.idempotency_key) or all(e.client_id for e in request.events)
        result, duplicate = await self._idempotency.run(
            "append-events",
            request.idempotency_key,
            fingerprint=request.fingerprint(),
            action=lambda: writer.submit(request, stable_ids=stable_ids),
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
        """The partition count streams are routed over. It is pinned (in the index database) the first
        time a topic is used: partitions added later never move a stream to another partition."""
        count = self._partitions.get(topic)
        if count is None:
            live = await self._admin.partitions(topic)
            if live is None and create:  # an undeclared category (allow_undeclared_categories)
                partitions = self._kafka.default_partitions
                await self._admin.ensure_topics(event_topic_specs(self._kafka, topic, partitions))
                live = await self._admin.partitions(topic)
            if live is None:
                raise NotFound(f"the event topic {topic!r} does not exist", metadata={"topic": topic})
            index = self._indexer.index
            count = int(await asyncio.to_thread(index.meta_value, f"partitions:{topic}", str(live)))
            if count > live:
                raise BackendUnavailable(
                    f"topic {topic!r} has {live} partitions, fewer than the {count} its streams are routed "
                    "over: was it deleted and created again?",
                    metadata={"topic": topic},
                )
            if count < live:
                log.warning(
                    "topic %s has %d partitions; streams stay routed over the first %d (adding partitions "
                    "would move streams and break their order)",
                    topic,
                    live,
                    count,
                )
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
                index=self._indexer.index,
                scanner=self._scanner,
                admin=self._admin,
                read_lag=self._read_lag,
            )
            self._writers[(topic, partition)] = writer
        return writer

    # --- ReadStream ------------------------------------------------------------------------------------

    async def read_stream(self, query: ReadStreamQuery) -> tuple[list[StoredEvent], int]:
        """Events of one stream from the stream index, and the stream's head version.

        Read-your-writes without a position: first the index catches up (bounded by `wait_timeout_ms`)
        with the stream's last write this gateway knows of, else with the partition's high watermark;
        a `min_position` is waited for as given."""
        category, stream_id, max_count, wait_timeout_ms = (
            query.category,
            query.stream_id,
            query.max_count,
            query.wait_timeout_ms,
        )
        topic = self.topic_of(category)
        check_name("stream_id", stream_id)
        if max_count > self._settings.read_max_count:
            raise InvalidArgument.field("max_count", f"must be at most {self._settings.read_max_count}")
        if wait_timeout_ms > self._settings.read_max_wait_ms:
            raise InvalidArgument.field(
                "wait_timeout_ms", f"must be at most {self._settings.read_max_wait_ms}"
            )
        timeout_ms = wait_timeout_ms or self._settings.read_wait_ms
        if query.min_position:
            await self.wait_for_position(topic, query.min_position, timeout_ms)
        else:
            await self._wait_for_stream(topic, category, stream_id, timeout_ms)
        events, head = await asyncio.to_thread(
            self._indexer.index.read,
            category,
            stream_id,
            from_version=query.from_version,
            max_count=max_count or self._settings.read_default_count,
            backwards=query.backwards,
        )
        if head == 0:
            raise NotFound(
                f"stream {category}/{stream_id} does not exist",
                metadata={"category": category, "stream_id": stream_id},
            )
        return events, head

    async def _wait_for_stream(self, topic: str, category: str, stream_id: str, timeout_ms: int) -> None:
        partition = partition_for(stream_id, await self._partition_count(topic))
        writer = self._writers.get((topic, partition))
        written = writer.written_up_to((category, stream_id)) if writer is not None else None
        forwarded = self._forwarded.get((category, stream_id))
        target = max(written or 0, forwarded or 0) or None
        if target is None:  # written elsewhere, if at all: everything acknowledged on the partition
            target = await self._admin.end_offset(topic, partition, stable=False)
        if not await self._indexer.wait_for(topic, partition, target, timeout_ms / 1000):
            raise ReadModelBehind(
                f"the stream index has not caught up with {category}/{stream_id} within {timeout_ms} ms",
                metadata={"topic": topic, "partition": str(partition), "offset": str(target)},
            )

    async def wait_for_position(self, topic: str, position: str, wait_timeout_ms: int) -> None:
        """Read-your-writes: wait until the stream index has applied `position`."""
        decoded = Position.decode(position, field_name="min_position")
        if decoded.topic != topic:
            raise InvalidArgument.field(
                "min_position", f"is a position of {decoded.topic!r}, not of {topic!r}"
            )
        timeout_s = (wait_timeout_ms or self._settings.read_wait_ms) / 1000
        deadline = time.monotonic() + timeout_s
        for partition, offset in decoded.offsets.items():
            remaining = max(0.0, deadline - time.monotonic())
            if not await self._indexer.wait_for(topic, partition, offset, remaining):
                raise ReadModelBehind(
                    f"the stream index has not reached the position within {timeout_s:.1f}s",
                    metadata={"topic": topic, "partition": str(partition), "offset": str(offset)},
                )

    # --- Subscribe -------------------------------------------------------------------------------------

    async def subscribe(self, query: SubscribeQuery) -> AsyncIterator[tuple[StoredEvent, str]]:
        """Catch up from the log, then follow it live: each event with the position just after it.

        Reading the log itself (not the index) for both phases means there is no switch-over at which an
        event could be missed or repeated; resuming from a position continues exactly after it."""
        category, stream_id, from_version, from_position = (
            query.category,
            query.stream_id,
            query.from_version,
            query.from_position,
        )
        topic = self.topic_of(category)
        if self._subscribers >= self._settings.max_subscribers:
            raise RateLimited(
                f"this gateway serves {self._settings.max_subscribers} subscriptions already",
                retry_after_ms=1000,
                metadata={"limit": str(self._settings.max_subscribers)},
            )
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
        # Progress first: a version not indexed after that lies at or past it (never before it).
        progress = (await asyncio.to_thread(index.progress, [(topic, partition)]))[(topic, partition)]
        offset = await asyncio.to_thread(index.offset_of, category, stream_id, version)
        return progress if offset is None else offset

    async def _follow(
        self, topic: str, category: str, stream_id: str, start: dict[int, int | None], from_version: int
    ) -> AsyncIterator[tuple[StoredEvent, str]]:
        self._subscribers += 1
        SUBSCRIBERS.inc()
        tail = TopicTail(self._kafka, topic, start)
        offsets = {p: (o or 0) for p, o in start.items()}
        last_version = max(from_version - 1, 0)
        try:
            await tail.open()
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
                    if (
                        event is None
                        or event.category != category
                        or replayed_for(record.headers) is not None
                    ):
                        continue  # not an event of the category, or a dead letter sent back (no new event)
                    if stream_id:
                        if event.stream_id != stream_id or event.version <= last_version:
                            continue
                        last_version = event.version
                    yield event, Position(topic, dict(offsets)).encode()
        finally:
            self._subscribers -= 1
            SUBSCRIBERS.dec()
            await tail.close()

    async def close(self, timeout_s: float = 10.0) -> None:
        """Finish queued appends (up to `timeout_s`), then stop every writer; bounded."""
        await asyncio.gather(*(w.close(timeout_s) for w in self._writers.values()))
        await self._read_lag.close()
        await bounded(self._scanner.close(), 5.0, what="closing the partition scanner")


@dataclass
class _Pending:
    request: AppendRequest
    future: asyncio.Future[AppendResult]
    stable_ids: bool  # its event ids identify a retry (client-chosen, or derived from its idempotency key)
    attempts: int = 0
    alone: bool = False  # Kafka refused the transaction it was in: it goes in a transaction of its own

    @property
    def events(self) -> int:
        return len(self.request.events)

    @property
    def size(self) -> int:
        return sum(len(e.data) for e in self.request.events)


@dataclass
class _Planned:
    pending: _Pending
    first_version: int
    start: int  # index of its first record in the transaction
    count: int


@dataclass(frozen=True, slots=True)
class _Known:
    """An event the writer knows is in the log (written by it, or read by its scan)."""

    category: str
    stream_id: str
    version: int
    offset: int


def _resolve(pending: _Pending, result: AppendResult) -> None:
    if not pending.future.done():  # a caller that gave up has a cancelled future
        pending.future.set_result(result)


def _reject(pending: _Pending, error: BaseException) -> None:
    if not pending.future.done():
        pending.future.set_exception(error)


@dataclass
class PartitionWriter:
    """The single writer of one partition while this gateway holds its lease (see the module doc).

    What it knows of the log survives releasing the partition: `_heads` and `_recent` hold every stream
    head and event id found at offsets from the index's progress (when first learned) up to `_known_to`.
    Streams not in `_heads` had no event there, so the index's head is theirs. Taking the partition
    again only reads from `_known_to` to the last stable offset."""

    topic: str
    partition: int
    kafka: KafkaSettings
    settings: EventsSettings
    leases: LeaseStore
    index: StreamIndex
    scanner: PartitionScanner
    admin: KafkaAdmin
    read_lag: ReadLag
    _pending: deque[_Pending] = field(default_factory=deque)
    _queued_events: int = 0
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    _producer: TransactionalProducer | None = None
    _token: str = ""
    _renewer: asyncio.Task[None] | None = None
    _heads: dict[StreamKey, int] = field(default_factory=dict)
    _offsets: dict[StreamKey, int] = field(default_factory=dict)  # offset of each known head event
    _recent: dict[str, _Known] = field(default_factory=dict)
    _known_to: int | None = None
    _marker_at_known_to: bool = False  # our own commit marker sits at _known_to
    _reread: bool = False  # a transaction was aborted: read the log up to its end before the next one
    _held_since: float = 0.0
    _last_write: float = 0.0
    _handoff: bool = False
    _lease_lost: bool = False
    _closing: bool = False

    @property
    def lease_name(self) -> str:
        return f"es:{self.topic}:{self.partition}"

    def written_up_to(self, stream: StreamKey) -> int | None:
        """The offset just past the stream's last event this writer knows of (None: not known here)."""
        offset = self._offsets.get(stream)
        return None if offset is None else offset + 1

    async def submit(self, request: AppendRequest, *, stable_ids: bool) -> AppendResult:
        if self._closing:
            raise BackendUnavailable("the gateway is shutting down")
        if self._queued_events + len(request.events) > self.settings.max_queued_events:
            raise RateLimited(
                f"{self._queued_events} events are already waiting for {self.topic}[{self.partition}]",
                retry_after_ms=200,
                metadata={"topic": self.topic, "partition": str(self.partition)},
            )
        self.read_lag.check((self.topic, self.partition), self._known_to)
        future: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(request, future, stable_ids))
        self._queued_events += len(request.events)
        self._wakeup.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"writer:{self.lease_name}")
        return await future

    def _drop_done(self) -> None:
        while self._pending and self._pending[0].future.done():
            self._queued_events -= self._pending.popleft().events

    def _fail_pending(self, error: BaseException) -> None:
        while self._pending:
            pending = self._pending.popleft()
            self._queued_events -= pending.events
            _reject(pending, error)

    async def _run(self) -> None:
        """The writer task. It ends only right after seeing no pending append, with no await between that
        look and the end: an append submitted while it winds down is never left without a task."""
        while True:
            try:
                await self._serve()
            except Exception as exc:
                log.exception("writer %s failed", self.lease_name)
                self._fail_pending(BackendUnavailable(f"the writer of {self.lease_name} failed: {exc}"))
                await self._release()
            if not self._pending or self._closing:
                return

    async def _serve(self) -> None:
        idle_release_s = max(1.0, self.settings.lease_ttl_ms / 1000)
        while True:
            if self._handoff or self._lease_lost:
                await self._release()
            self._drop_done()
            if not self._pending:
                if (
                    self._closing
                    or self._producer is None
                    or time.monotonic() - self._last_write > idle_release_s
                ):
                    await self._release()
                    if not self._pending or self._closing:
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
                self._fail_pending(exc)
                continue
            await self._write_batch()

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
            fenced = time.monotonic()
            # Nobody else can commit now: the last stable offset is where the log ends for us.
            end = await self.admin.end_offset(self.topic, self.partition)
            scanned = await self._catch_up(end, max(1.0, deadline - time.monotonic()))
        except BaseException:
            await self._release()
            raise
        self._last_write = now = time.monotonic()
        TAKEOVER.observe(now - self._held_since)
        log.debug(
            "writer %s: took the partition in %.0f ms (lease and fencing %.0f ms, %d records read)",
            self.lease_name,
            1000 * (now - self._held_since),
            1000 * (fenced - self._held_since),
            scanned,
        )

    async def _catch_up(self, end: int, timeout_s: float) -> int:
        """Learn the log up to `end` (see the class doc): from where this writer last knew it, else from
        the index's progress. The index answers for everything below that, whatever its lag. Returns
        how many records it read."""
        if self._known_to is None:
            tp = (self.topic, self.partition)
            start = (await asyncio.to_thread(self.index.progress, [tp]))[tp]
            self._forget()
            self._known_to, self._marker_at_known_to = start, False
        start = self._known_to
        if end <= start or (end == start + 1 and self._marker_at_known_to):
            return 0  # nothing new (at most our own last commit marker)
        read = 0
        async for records in self.scanner.scan(self.topic, self.partition, start, end, timeout_s=timeout_s):
            for record in records:
                self._learn(record)
            read += len(records)
            self._known_to, self._marker_at_known_to = records[-1].offset + 1, False
        self._known_to = max(self._known_to, end)
        return read

    def _learn(self, record: Record) -> None:
        r = record
        event = parse_event(r.topic, r.partition, r.offset, r.key, r.value, r.headers, r.timestamp_ms)
        if event is None or replayed_for(r.headers) is not None:
            return  # not a gateway event, or a dead letter sent back (the original is known already)
        key = (event.category, event.stream_id)
        if event.version > self._heads.get(key, 0):
            self._heads[key] = event.version
            self._offsets[key] = event.offset
        self._recent[event.event_id] = _Known(event.category, event.stream_id, event.version, event.offset)

    def _forget(self) -> None:
        self._heads.clear()
        self._offsets.clear()
        self._recent.clear()
        self._known_to, self._marker_at_known_to = None, False

    async def _renew(self) -> None:
        quantum_s = 0.1
        failing = False
        while True:
            await asyncio.sleep(self.settings.lease_renew_ms / 1000)
            try:
                held, wanted = await self.leases.renew(
                    self.lease_name, self._token, self.settings.lease_ttl_ms
                )
            except Exception as exc:
                raise_if_cancelling()  # an interrupted Redis call is a cancellation, not an outage
                if not failing:  # once per outage, not every tick
                    log.warning("writer %s: renewing the lease failed: %s", self.lease_name, exc)
                failing = True
                continue  # Redis is down: Kafka's fencing still keeps writers apart
            failing = False
            if not held:
                self._lease_lost = True
                self._wakeup.set()
                return
            if wanted and time.monotonic() - self._held_since >= quantum_s:
                self._handoff = True
                self._wakeup.set()

    async def _release(self) -> None:
        """Give the partition up: every step bounded, so a release (and so a shutdown) always ends."""
        renewer, self._renewer = self._renewer, None
        await stop_task(renewer, 1.0)
        producer, self._producer = self._producer, None
        if producer is not None:
            await bounded(producer.close(), 5.0, what=f"closing the producer of {self.lease_name}")
        if self._token:
            token, self._token = self._token, ""
            await bounded(self.leases.release(self.lease_name, token), 2.0, what="releasing a lease")
        self._handoff = self._lease_lost = False

    # --- appending -------------------------------------------------------------------------------------

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        events = size = 0
        while self._pending:
            pending = self._pending[0]
            if batch and (
                events + pending.events > self.settings.max_batch_events
                or size + pending.size > self.settings.max_batch_bytes
                or pending.alone
                or batch[0].alone
            ):
                break
            self._pending.popleft()
            self._queued_events -= pending.events
            if not pending.future.done():
                batch.append(pending)
                events += pending.events
                size += pending.size
        return batch

    async def _write_batch(self) -> None:
        batch = self._take_batch()
        try:
            await self._write(batch)
        except BaseException as exc:
            # Whatever went wrong, no caller of this batch is left waiting (and none is told "written").
            failure = exc if isinstance(exc, GatewayError) else BackendUnavailable(f"append failed: {exc!r}")
            for pending in batch:
                _reject(pending, failure)
            raise

    def _retry(self, pendings: list[_Pending], error: GatewayError, *, count: bool) -> None:
        """Queue appends again (counting the attempt when `count`); those out of attempts fail."""
        again = []
        for pending in pendings:
            pending.attempts += 1 if count else 0
            if pending.attempts < MAX_ATTEMPTS:
                again.append(pending)
            else:
                _reject(pending, error)
        self._requeue(again)

    def _requeue(self, pendings: list[_Pending]) -> None:
        """Put appends back at the front of the queue, in their order."""
        for pending in reversed(pendings):
            self._pending.appendleft(pending)
            self._queued_events += pending.events

    async def _load_heads(self, batch: list[_Pending]) -> None:
        """Heads of the batch's streams this writer does not know, from the index in one query."""
        missing = {(p.request.category, p.request.stream_id) for p in batch} - self._heads.keys()
        if missing:
            self._heads.update(await asyncio.to_thread(self.index.heads, missing))

    async def _lookup_ids(self, batch: list[_Pending]) -> dict[str, _Known]:
        """Where the batch's stable event ids already are in the log: what this writer knows, then the
        index (one query per category) for the others."""
        found: dict[str, _Known] = {}
        wanted: dict[str, list[str]] = {}
        for pending in batch:
            if not (pending.stable_ids or pending.attempts):
                continue
            for event in pending.request.events:
                known = self._recent.get(event.event_id)
                if known is not None:
                    found[event.event_id] = known
                else:
                    wanted.setdefault(pending.request.category, []).append(event.event_id)
        for category, ids in wanted.items():
            for e in await asyncio.to_thread(self.index.find_event_ids, category, ids):
                found[e.event_id] = _Known(e.category, e.stream_id, e.version, e.offset)
        return found

    def _duplicate_of(self, request: AppendRequest, found: dict[str, _Known]) -> AppendResult | None:
        """The earlier answer when this append's events are already in the stream (even if Redis forgot)."""
        mine = [
            found[e.event_id]
            for e in request.events
            if e.event_id in found
            and found[e.event_id].stream_id == request.stream_id
            and found[e.event_id].category == request.category
        ]
        if not mine:
            return None
        versions = [k.version for k in mine]
        if len(mine) < len(request.events) or versions != list(range(versions[0], versions[0] + len(mine))):
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

    async def _write(self, batch: list[_Pending]) -> None:
        assert self._producer is not None
        if self._reread:  # after an abort: learn where the log is now (only aborted records are new)
            end = await self.admin.end_offset(self.topic, self.partition)
            await self._catch_up(end, self.settings.append_timeout_ms / 1000)
            self._reread = False
        await self._load_heads(batch)
        found = await self._lookup_ids(batch)
        planned_heads: dict[StreamKey, int] = {}
        planned_ids: set[str] = set()
        plans: list[_Planned] = []
        later: list[_Pending] = []
        records: list[OutRecord] = []
        now = datetime.now(UTC)
        for pending in batch:
            if pending.future.done():
                continue
            request = pending.request
            ids = [e.event_id for e in request.events]
            if planned_ids.intersection(ids):
                later.append(pending)  # a retry of an append in this very batch: decided after it
                continue
            try:
                duplicate = self._duplicate_of(request, found)
            except GatewayError as exc:
                _reject(pending, exc)
                continue
            if duplicate is not None:
                _resolve(pending, duplicate)
                continue
            key = (request.category, request.stream_id)
            head = planned_heads.get(key, self._heads[key])
            if not request.expected.holds(head):
                _reject(
                    pending,
                    WrongExpectedVersion(
                        f"stream {request.category}/{request.stream_id} is at version {head}, "
                        f"expected {request.expected.describe()}",
                        metadata={"expected": request.expected.describe(), "actual": str(head)},
                    ),
                )
                continue
            plans.append(_Planned(pending, head + 1, len(records), len(request.events)))
            planned_ids.update(ids)
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
        self._requeue(later)
        if not records:
            return
        try:
            deliveries = await self._producer.send(records, self.settings.append_timeout_ms / 1000)
        except TransactionAborted as exc:
            # Aborted, nothing written; the log moved past the aborted records, so read it again first.
            # The broker refuses a whole record batch for one bad record, so a refused append is only to
            # blame once it is refused alone; the others simply go again.
            self._reread = True
            rejected = exc.rejected if isinstance(exc, RecordsRejected) else {}
            again = []
            for plan in plans:
                indexes = range(plan.start, plan.start + plan.count)
                errors = [rejected[i] for i in indexes if i in rejected]
                if errors and len(plans) == 1:
                    _reject(plan.pending, errors[0])
                    continue
                plan.pending.alone = plan.pending.alone or bool(errors)
                again.append(plan.pending)
            self._retry(again, exc, count=not rejected)
            return
        except (WriterFenced, OutcomeUnknown) as exc:
            # Not written (fenced: aborted) or unknown: re-take the partition, which reads the log from
            # where this writer knew it; a retry finds its own events by id if they did land.
            log.warning("writer %s: %s", self.lease_name, exc)
            await self._release()
            self._retry([plan.pending for plan in plans], exc, count=True)
            return
        except GatewayError as exc:
            for plan in plans:
                _reject(plan.pending, exc)
            return
        self._committed(plans, deliveries)
        await self._trim()

    def _committed(self, plans: list[_Planned], deliveries: list[Delivery]) -> None:
        """Record what the transaction wrote, then answer its callers."""
        self._last_write = time.monotonic()
        expected_first = (self._known_to or 0) + (1 if self._marker_at_known_to else 0)
        if self._known_to is not None and deliveries[0].offset != expected_first:
            # Something not written by this writer sits in between (a non-transactional producer):
            # forget, so that the next take-over reads the partition again.
            log.warning(
                "writer %s: unexpected records before offset %d", self.lease_name, deliveries[0].offset
            )
            self._lease_lost = True
            self._known_to = None
        for plan in plans:
            request = plan.pending.request
            written = deliveries[plan.start : plan.start + plan.count]
            key = (request.category, request.stream_id)
            for i, (event, delivery) in enumerate(zip(request.events, written, strict=True)):
                self._recent[event.event_id] = _Known(
                    request.category, request.stream_id, plan.first_version + i, delivery.offset
                )
            self._heads[key] = plan.first_version + plan.count - 1
            self._offsets[key] = written[-1].offset
            _resolve(
                plan.pending,
                AppendResult(
                    first_version=plan.first_version,
                    last_version=plan.first_version + plan.count - 1,
                    topic=self.topic,
                    partition=self.partition,
                    first_offset=written[0].offset,
                    last_offset=written[-1].offset,
                    position=Position.after(self.topic, self.partition, written[-1].offset).encode(),
                ),
            )
        if self._known_to is not None:
            self._known_to, self._marker_at_known_to = deliveries[-1].offset + 1, True

    async def _trim(self) -> None:
        """Bound memory: forget what the index already holds (below its progress), as of now."""
        if len(self._recent) <= MAX_KNOWN and len(self._heads) <= MAX_KNOWN:
            return
        tp = (self.topic, self.partition)
        progress = (await asyncio.to_thread(self.index.progress, [tp]))[tp]
        self._recent = {i: k for i, k in self._recent.items() if k.offset >= progress}
        for key in [k for k, o in self._offsets.items() if o < progress]:
            del self._offsets[key]
            self._heads.pop(key, None)
        self._heads = {k: v for k, v in self._heads.items() if k in self._offsets}

    async def close(self, timeout_s: float) -> None:
        """Stop taking appends, finish the queued ones (up to `timeout_s`), then release; bounded."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=timeout_s)
            await stop_task(self._task, 2.0)
        self._fail_pending(BackendUnavailable("the gateway is shutting down"))
        await self._release()
