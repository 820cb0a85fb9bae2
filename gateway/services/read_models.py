"""query-read-model: projections that fold a category's events into SQL documents, and queries on them.

- Each read model generation (one document table) is one Kafka consumer group over the category topic,
  so instances sharing the database share the work: each partition is applied by one of them.
- A batch's documents and the partition offsets are committed in one database transaction, conditional
  on the offsets the batch started from (adapters/sql/read_models.py): a crash, a redelivery or a
  rebalance never applies an event twice or skips one.
- A handler that fails is retried with backoff, then its event goes to `<topic>.DLT` with the contract's
  `kpg-dlt-*` headers (written before the offsets move past it) and the projection goes on.
- Rebuild builds a new generation with a new consumer group from the beginning of the topic while the old
  one serves; once the new one has reached the old one's offsets on every partition, one UPDATE swaps them.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, cast

from prometheus_client import Counter, Gauge

from gateway.adapters.kafka import AsyncProducer, ConsumerRunner, FailurePolicy, KafkaAdmin, Record, TopicSpec
from gateway.adapters.sql.documents import DocumentRow, FieldFilter, Page
from gateway.adapters.sql.read_models import DocumentChange, OffsetConflict, ReadModelStore, RegistryEntry
from gateway.definitions import Definitions, DefinitionsError, ReadModelDef
from gateway.domain.dead_letters import dlt_topic, replayed_for
from gateway.domain.events import Position, StoredEvent, parse_event
from gateway.domain.projections import EventView, Handler, HandlerFailed, fold
from gateway.errors import BackendUnavailable, InvalidArgument, NotFound, ReadModelBehind
from gateway.services.dead_letter_writer import DeadLetterWriter
from gateway.services.progress import Progress
from gateway.settings import KafkaSettings, ReadModelsSettings
from gateway.tasks import raise_if_cancelling, stop_task

__all__ = ["Document", "FieldFilter", "ReadModelStatus", "ReadModels", "compile_handlers"]

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]
TableOffsetKey = tuple[str, str, int]  # (table, topic, partition): where a table stands on a partition
_FETCH_OVERRIDES: dict[str, Any] = {"fetch.wait.max.ms": 50}

APPLIED = Counter("kpg_projection_events_applied_total", "Events folded into a read model", ["read_model"])
FAILURES = Counter(
    "kpg_projection_handler_failures_total",
    "Handler failures (each attempt), and events sent to the DLT",
    ["read_model", "outcome"],
)
LAG = Gauge(
    "kpg_projection_lag_records",
    "Records of the category not yet applied",
    ["read_model"],
    multiprocess_mode="mostrecent",  # every worker measures the same lag (from the shared database)
)


def compile_handlers(name: str, definition: ReadModelDef) -> Callable[[str], Handler | None]:
    """The handler for each event type (None: the model ignores that type). Python handlers are imported
    here, at start-up, so a wrong reference stops the gateway with the key that names it."""
    if definition.python is not None:
        module_name, _, attribute = definition.python.partition(":")
        try:
            function = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise DefinitionsError(
                f"read_models.{name}.python: cannot load {definition.python!r}: {exc}"
            ) from None
        if not callable(function):
            raise DefinitionsError(f"read_models.{name}.python: {definition.python!r} is not callable")
        handler = cast("Handler", function)
        return lambda _type: handler
    handlers = {event_type: h.compile() for event_type, h in (definition.handlers or {}).items()}
    return handlers.get


@dataclass(frozen=True, slots=True)
class TableProgress:
    position: str
    lag: int
    documents: int


@dataclass(frozen=True, slots=True)
class ReadModelStatus:
    read_model: str
    category: str
    state: str
    position: str
    lag: int
    documents: int
    error: str
    rebuild: TableProgress | None = None


@dataclass(frozen=True, slots=True)
class Document:
    read_model: str
    row: DocumentRow


class Projection:
    """One generation of one read model, applying the category topic to its document table."""

    def __init__(
        self,
        *,
        model: str,
        table: str,
        topic: str,
        handler_for: Callable[[str], Handler | None],
        store: ReadModelStore,
        dead_letters: DeadLetterWriter,
        kafka: KafkaSettings,
        settings: ReadModelsSettings,
        progress: Progress[TableOffsetKey],
    ) -> None:
        self.model = model
        self.table = table
        self.topic = topic
        self._handler_for = handler_for
        self._store = store
        self._dead_letters = dead_letters
        self._settings = settings
        self._progress = progress
        self.group_id = f"kpg-rm-{table}"
        self._runner = ConsumerRunner(
            kafka,
            group_id=self.group_id,
            topics=[topic],
            handler=self._apply,
            start_offsets=lambda partitions: store.offsets(table, partitions),
            on_positions=self._advance,
            batch_size=settings.batch_size,
            # Handlers are retried per event in _fold; this covers anything else a batch may raise.
            policy=FailurePolicy(
                max_attempts=settings.handler_max_attempts,
                backoff_s=max(0.05, settings.handler_backoff_ms / 1000),
                dead_letter=dead_letters,
            ),
            **_FETCH_OVERRIDES,
        )

    async def start(self) -> None:
        await self._runner.start()

    async def stop(self) -> None:
        await self._runner.stop()

    async def _apply(self, records: Sequence[Record]) -> None:
        partitions = {(r.topic, r.partition) for r in records}
        expected = await asyncio.to_thread(self._store.offsets, self.table, partitions)
        fresh = [r for r in records if r.offset >= expected.get((r.topic, r.partition), 0)]
        offsets: dict[TopicPartition, int] = {}
        for r in fresh:
            offsets[(r.topic, r.partition)] = r.offset + 1
        if not fresh:
            return
        events = [
            (r, parse_event(r.topic, r.partition, r.offset, r.key, r.value, r.headers, r.timestamp_ms))
            for r in fresh
        ]
        keys = {e.stream_id for _, e in events if e is not None and self._handler_for(e.type) is not None}
        rows = await asyncio.to_thread(self._store.load, self.table, keys) if keys else {}
        documents: dict[str, dict[str, Any] | None] = {key: row.data for key, row in rows.items()}
        versions = {key: row.version for key, row in rows.items()}
        changes: dict[str, DocumentChange] = {}
        applied = 0
        for record, event in events:
            if event is None:
                continue  # not a gateway event: nothing to fold
            handler = self._handler_for(event.type)
            if handler is None:
                continue
            key = event.stream_id
            # A replay of an event this projection dead-lettered is not in the document, whatever its
            # version; a replay for another consumer, or any other event at or below it, already is.
            replay = replayed_for(record.headers)
            if replay not in (None, "", self.group_id):
                continue
            if event.version <= versions.get(key, 0) and replay != self.group_id:
                continue
            try:
                document = await self._fold(handler, documents.get(key), event)
            except HandlerFailed as failed:
                await self._dead_letter(record, failed)
                continue
            documents[key] = document
            versions[key] = max(event.version, versions.get(key, 0))
            changes[key] = DocumentChange(
                data=document,
                version=versions[key],
                position=Position.after(record.topic, record.partition, record.offset).encode(),
                partition=record.partition,
                offset=record.offset,
            )
            applied += 1
        await asyncio.to_thread(
            self._store.commit,
            self.table,
            expected={tp: expected.get(tp) for tp in offsets},
            offsets=offsets,
            changes=changes,
        )
        APPLIED.labels(self.model).inc(applied)
        self._progress.applied({(self.table, *tp): offset for tp, offset in offsets.items()})

    async def _fold(
        self, handler: Handler, document: dict[str, Any] | None, event: StoredEvent
    ) -> dict[str, Any] | None:
        """Fold with retries and backoff; HandlerFailed once every attempt failed."""
        attempts = self._settings.handler_max_attempts
        for attempt in range(1, attempts + 1):
            try:
                return fold(handler, document, EventView.of(event))
            except HandlerFailed:
                FAILURES.labels(self.model, "retried" if attempt < attempts else "dead_lettered").inc()
                if attempt == attempts:
                    raise
                await asyncio.sleep(self._settings.handler_backoff_ms / 1000 * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    async def _dead_letter(self, record: Record, failed: HandlerFailed) -> None:
        # Acknowledged by Kafka before the offsets move past the event: a failure is never lost.
        await self._dead_letters(record, failed, self._settings.handler_max_attempts, self.group_id)

    async def _advance(self, positions: dict[TopicPartition, int]) -> None:
        """Move stored offsets past transaction markers (no documents change there)."""
        current = await asyncio.to_thread(self._store.offsets, self.table, positions)
        moved = {tp: o for tp, o in positions.items() if o > current.get(tp, 0)}
        if moved:
            try:
                await asyncio.to_thread(
                    self._store.commit,
                    self.table,
                    expected={tp: current.get(tp) for tp in moved},
                    offsets=moved,
                    changes={},
                )
            except OffsetConflict:
                return  # another instance moved it: fine
            self._progress.applied({(self.table, *tp): offset for tp, offset in moved.items()})


class ReadModels:
    def __init__(
        self,
        *,
        settings: ReadModelsSettings,
        kafka: KafkaSettings,
        definitions: Definitions,
        store: ReadModelStore,
        admin: KafkaAdmin,
        producer: AsyncProducer,
    ) -> None:
        self._settings = settings
        self._kafka = kafka
        self._definitions = definitions
        self._store = store
        self._admin = admin
        self._dead_letters = DeadLetterWriter(producer)
        self._handlers = {name: compile_handlers(name, d) for name, d in definitions.read_models.items()}
        self._entries: dict[str, RegistryEntry] = {}
        self._projections: dict[str, Projection] = {}  # by table
        self._progress: Progress[TableOffsetKey] = Progress(self._stored_offsets)
        self._supervisor: asyncio.Task[None] | None = None
        self._retired: list[tuple[float, str]] = []
        self._reconciling = asyncio.Lock()

    def topics(self) -> list[TopicSpec]:
        """The dead-letter topics the projections may write to."""
        specs = []
        for definition in self._definitions.read_models.values():
            category = self._definitions.categories.get(definition.category)
            partitions = (category.partitions if category else None) or self._kafka.default_partitions
            specs.append(
                TopicSpec(dlt_topic(self._definitions.category_topic(definition.category)), partitions)
            )
        return specs

    async def start(self) -> None:
        """Start every projection and the supervisor. Idempotent (start-up work may be retried)."""
        await asyncio.to_thread(self._store.ensure_tables)
        await self._reconcile()
        if self._supervisor is None or self._supervisor.done():
            self._supervisor = asyncio.create_task(self._supervise(), name="read-models")

    async def stop(self) -> None:
        await stop_task(self._supervisor, 2.0)
        await asyncio.gather(*(p.stop() for p in self._projections.values()), return_exceptions=True)
        self._projections.clear()

    # --- running the projections -----------------------------------------------------------------------

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(self._settings.registry_poll_ms / 1000)
            try:
                await self._reconcile()
            except BackendUnavailable as exc:
                raise_if_cancelling()
                log.warning("read models: %s", exc)
            except Exception:
                raise_if_cancelling()
                log.exception("read models: supervision failed")

    async def _reconcile(self) -> None:
        """Run a projection for every table the registry says is active or being built; swap a rebuilt
        model in once it has caught up; drop retired tables after a grace period."""
        async with self._reconciling:
            await self._reconcile_once()

    async def _reconcile_once(self) -> None:
        wanted: set[str] = set()
        for model in self._definitions.read_models:
            entry = await asyncio.to_thread(self._store.ensure, model)
            building = entry.building_table
            if building and building in self._projections and await self._caught_up(entry):
                retired = await asyncio.to_thread(self._store.swap, model, building)
                if retired is not None:
                    log.info("read model %s: rebuilt, now serving %s", model, building)
                    self._retired.append((time.monotonic(), retired))
                entry = await asyncio.to_thread(self._store.entry, model)
            self._entries[model] = entry
            for table in (entry.active_table, entry.building_table):
                if table:
                    wanted.add(table)
                    if table not in self._projections:
                        await self._start_projection(model, table)
        for table in set(self._projections) - wanted:
            await self._projections.pop(table).stop()
        grace_s = 5 * self._settings.registry_poll_ms / 1000 + 5
        while self._retired and time.monotonic() - self._retired[0][0] > grace_s:
            _, table = self._retired.pop(0)
            await asyncio.to_thread(self._store.drop, table)
        await self._update_lag()

    async def _start_projection(self, model: str, table: str) -> None:
        definition = self._definitions.read_models[model]
        projection = Projection(
            model=model,
            table=table,
            topic=self._definitions.category_topic(definition.category),
            handler_for=self._handlers[model],
            store=self._store,
            dead_letters=self._dead_letters,
            kafka=self._kafka,
            settings=self._settings,
            progress=self._progress,
        )
        await projection.start()
        self._projections[table] = projection

    async def _caught_up(self, entry: RegistryEntry) -> bool:
        """The rebuilt table is at least as far as the serving one on every partition: swapping it in
        never moves a reader back."""
        active = await asyncio.to_thread(self._store.offsets, entry.active_table)
        building = await asyncio.to_thread(self._store.offsets, entry.building_table)
        return all(building.get(tp, 0) >= offset for tp, offset in active.items())

    async def _update_lag(self) -> None:
        for model, entry in self._entries.items():
            try:
                LAG.labels(model).set(await self._lag(model, entry.active_table))
            except BackendUnavailable:
                pass

    async def _lag(self, model: str, table: str) -> int:
        topic = self._topic(model)
        marks = await self._admin.watermarks(topic)
        offsets = await asyncio.to_thread(self._store.offsets, table)
        return sum(max(0, high - max(low, offsets.get((topic, p), 0))) for p, (low, high) in marks.items())

    def _topic(self, model: str) -> str:
        return self._definitions.category_topic(self._definitions.read_models[model].category)

    # --- the API ---------------------------------------------------------------------------------------

    def _entry(self, model: str) -> RegistryEntry:
        if model not in self._definitions.read_models:
            raise NotFound(f"read model {model!r} is not defined", metadata={"read_model": model})
        entry = self._entries.get(model)
        if entry is None:
            raise BackendUnavailable(f"read model {model!r} is not started yet (is the database reachable?)")
        return entry

    async def _wait(self, model: str, min_position: str, wait_timeout_ms: int) -> None:
        if not min_position:
            return
        topic = self._topic(model)
        position = Position.decode(min_position, field_name="min_position")
        if position.topic != topic:
            raise InvalidArgument.field(
                "min_position", f"is a position of {position.topic!r}, not of {topic!r}"
            )
        if wait_timeout_ms > self._settings.max_wait_ms:
            raise InvalidArgument.field("wait_timeout_ms", f"must be at most {self._settings.max_wait_ms}")
        timeout_s = (wait_timeout_ms or self._settings.default_wait_ms) / 1000

        deadline = time.monotonic() + timeout_s
        while True:
            # The active table, again every second: a rebuild that finishes meanwhile swaps it.
            table = self._entry(model).active_table
            targets = {(table, topic, p): o for p, o in position.offsets.items()}
            remaining = deadline - time.monotonic()
            if await self._progress.wait_for(targets, max(0.0, min(1.0, remaining))):
                return
            if remaining <= 1.0:
                break
        raise ReadModelBehind(
            f"read model {model!r} has not reached the position within {timeout_s:g}s",
            metadata={"read_model": model, "min_position": min_position},
        )

    async def read_side_progress(
        self, partitions: Collection[TopicPartition]
    ) -> dict[str, dict[TopicPartition, int]]:
        """Where each read model's active table stands on `partitions`, for back-pressure
        (services/read_lag.py)."""
        found: dict[str, dict[TopicPartition, int]] = {}
        for model, entry in list(self._entries.items()):
            topic = self._topic(model)
            wanted = [tp for tp in partitions if tp[0] == topic]
            if wanted:
                found[f"read model {model!r}"] = await asyncio.to_thread(
                    self._store.offsets, entry.active_table, wanted
                )
        return found

    async def _stored_offsets(self, keys: Collection[TableOffsetKey]) -> dict[TableOffsetKey, int]:
        by_table: dict[str, list[TopicPartition]] = {}
        for table, topic, partition in keys:
            by_table.setdefault(table, []).append((topic, partition))
        found: dict[TableOffsetKey, int] = {}
        for table, partitions in by_table.items():
            offsets = await asyncio.to_thread(self._store.offsets, table, partitions)
            found.update({(table, *tp): offset for tp, offset in offsets.items()})
        return found

    async def get(
        self, model: str, key: str, *, min_position: str = "", wait_timeout_ms: int = 0
    ) -> Document:
        self._entry(model)
        if not key:
            raise InvalidArgument.field("key", "is required")
        await self._wait(model, min_position, wait_timeout_ms)
        row = await asyncio.to_thread(self._store.get, self._entry(model).active_table, key)
        if row is None:
            raise NotFound(
                f"read model {model!r} has no document {key!r}", metadata={"read_model": model, "key": key}
            )
        return Document(model, row)

    async def query(
        self,
        model: str,
        *,
        filters: Sequence[FieldFilter] = (),
        order_by: str = "",
        descending: bool = False,
        limit: int = 0,
        page_token: str = "",
        min_position: str = "",
        wait_timeout_ms: int = 0,
    ) -> tuple[list[Document], str, str]:
        """(documents, next page token, the model's position when it answered)."""
        self._entry(model)
        await self._wait(model, min_position, wait_timeout_ms)
        table = self._entry(model).active_table
        offsets = await asyncio.to_thread(self._store.offsets, table)
        page: Page = await asyncio.to_thread(
            self._store.query,
            table,
            filters=filters,
            order_by=order_by,
            descending=descending,
            limit=limit,
            page_token=page_token,
        )
        topic = self._topic(model)
        position = Position(topic, {p: o for (_t, p), o in offsets.items()}).encode()
        return [Document(model, row) for row in page.rows], page.next_page_token, position

    async def status(self, model: str) -> ReadModelStatus:
        entry = self._entry(model)
        active = await self._progress_of(model, entry.active_table)
        rebuild = await self._progress_of(model, entry.building_table) if entry.building_table else None
        return ReadModelStatus(
            read_model=model,
            category=self._definitions.read_models[model].category,
            state="REBUILDING" if entry.building_table else entry.state,
            position=active.position,
            lag=active.lag,
            documents=active.documents,
            error=entry.error,
            rebuild=rebuild,
        )

    async def _progress_of(self, model: str, table: str) -> TableProgress:
        topic = self._topic(model)
        offsets = await asyncio.to_thread(self._store.offsets, table)
        return TableProgress(
            position=Position(topic, {p: o for (_t, p), o in offsets.items()}).encode(),
            lag=await self._lag(model, table),
            documents=await asyncio.to_thread(self._store.count, table),
        )

    async def list(self) -> list[ReadModelStatus]:
        return [await self.status(model) for model in sorted(self._definitions.read_models)]

    async def rebuild(self, model: str) -> ReadModelStatus:
        self._entry(model)
        await asyncio.to_thread(self._store.start_rebuild, model)
        await self._reconcile()
        return await self.status(model)
