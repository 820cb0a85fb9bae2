"""The stream index: every gateway event, by stream and version, in SQL.

Built by one consumer of the category topics (services/stream_indexer.py). Each batch's rows, the stream
heads and the consumer's next offsets are written in one transaction, so a crash or a redelivery never
indexes an event twice or skips one. ReadStream and head recovery read here, never by scanning a topic.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from datetime import datetime
from typing import Any

from sqlalchemy import Table, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Field, Session, SQLModel, col, select

from gateway.adapters.sql.database import Database, create_tables
from gateway.domain.events import StoredEvent
from gateway.errors import BackendUnavailable


class StreamEventRow(SQLModel, table=True):
    __tablename__ = "kpg_stream_events"

    category: str = Field(primary_key=True)
    stream_id: str = Field(primary_key=True)
    version: int = Field(primary_key=True)
    event_id: str = Field(index=True)
    type: str
    data: bytes
    content_type: str
    metadata_json: str
    recorded_at: datetime
    topic: str
    partition: int
    offset: int
    correlation_id: str = ""
    causation_id: str = ""


# Every StoredEvent field is a column of the same name, except metadata (stored as JSON text).
_SHARED_FIELDS = tuple(f.name for f in fields(StoredEvent) if f.name != "metadata")


def _to_event(row: RowMapping) -> StoredEvent:
    columns = {name: row[name] for name in _SHARED_FIELDS}
    return StoredEvent(**columns, metadata=json.loads(row["metadata_json"]))


_EVENTS: Table = StreamEventRow.__table__  # type: ignore[attr-defined]


class StreamHeadRow(SQLModel, table=True):
    __tablename__ = "kpg_stream_heads"

    category: str = Field(primary_key=True)
    stream_id: str = Field(primary_key=True)
    version: int
    partition: int
    offset: int


class IndexProgressRow(SQLModel, table=True):
    __tablename__ = "kpg_stream_index_progress"

    topic: str = Field(primary_key=True)
    partition: int = Field(primary_key=True)
    next_offset: int


class IndexMetaRow(SQLModel, table=True):
    __tablename__ = "kpg_stream_index_meta"

    key: str = Field(primary_key=True)
    value: str


TopicPartition = tuple[str, int]
StreamKey = tuple[str, str]  # (category, stream_id)


class StreamIndex:
    """Invariants: a (category, stream, version) is indexed once, first in the log wins; heads and
    progress only move forward, whatever order concurrent writers (a restarted consumer, a second loop,
    another gateway) commit in: every write is a conditional upsert. Database errors surface as
    BackendUnavailable (the consumer rewinds and retries), never as a driver error."""

    def __init__(self, database: Database) -> None:
        self._engine = database.engine
        self._dialect = self._engine.dialect.name
        self._ready = False
        self._creating = threading.Lock()

    def ensure_tables(self) -> None:
        """Create the tables if missing (idempotent, thread-safe; called before first use)."""
        if self._ready:
            return
        tables = [t.__table__ for t in (StreamEventRow, StreamHeadRow, IndexProgressRow, IndexMetaRow)]  # type: ignore[union-attr]
        with self._creating, _translated("creating the stream index tables"):
            if self._ready:
                return
            create_tables(self._engine, tables)
            self._ready = True

    def _session(self) -> Session:
        self.ensure_tables()
        return Session(self._engine, expire_on_commit=False)

    def index_id(self) -> str:
        """A stable id of this index (its database): gateways sharing the database share a consumer group."""
        return self.meta_value("index_id", uuid.uuid4().hex[:16])

    def meta_value(self, key: str, default: str) -> str:
        """The stored value of `key`, storing `default` first if there is none (first writer wins)."""
        with _translated("reading the stream index metadata"), self._session() as session:
            row = session.get(IndexMetaRow, key)
            if row is None:
                session.add(IndexMetaRow(key=key, value=default))
                try:
                    session.commit()
                except SQLAlchemyError:  # another gateway stored it first
                    session.rollback()
                row = session.get(IndexMetaRow, key)
            assert row is not None
            return row.value

    def _insert(self, table: Any) -> Any:
        return (pg_insert if self._dialect == "postgresql" else sqlite_insert)(table)

    def apply(self, events: Sequence[StoredEvent], positions: dict[TopicPartition, int]) -> None:
        """Index a batch and advance the offsets in one transaction. A redelivered event (below the
        stored progress) or a version the stream already has is skipped."""
        self.ensure_tables()
        with _translated("indexing events"), self._engine.begin() as connection:
            done: dict[TopicPartition, int] = {}
            if positions:
                rows = connection.execute(
                    select(
                        col(IndexProgressRow.topic),
                        col(IndexProgressRow.partition),
                        col(IndexProgressRow.next_offset),
                    ).where(
                        tuple_(col(IndexProgressRow.topic), col(IndexProgressRow.partition)).in_(
                            list(positions)
                        )
                    )
                )
                done = {(topic, partition): offset for topic, partition, offset in rows}
            fresh = [e for e in events if e.offset >= done.get((e.topic, e.partition), 0)]
            if fresh:
                events_table = _EVENTS
                connection.execute(
                    self._insert(events_table).on_conflict_do_nothing(),
                    [_event_columns(e) for e in fresh],
                )
                heads: dict[StreamKey, StoredEvent] = {}
                for event in fresh:
                    key = (event.category, event.stream_id)
                    if key not in heads or event.version > heads[key].version:
                        heads[key] = event
                heads_table = StreamHeadRow.__table__  # type: ignore[attr-defined]
                upsert = self._insert(heads_table)
                connection.execute(
                    upsert.on_conflict_do_update(
                        index_elements=["category", "stream_id"],
                        set_={
                            "version": upsert.excluded.version,
                            "partition": upsert.excluded.partition,
                            "offset": upsert.excluded.offset,
                        },
                        where=heads_table.c.version < upsert.excluded.version,
                    ),
                    [
                        {
                            "category": e.category,
                            "stream_id": e.stream_id,
                            "version": e.version,
                            "partition": e.partition,
                            "offset": e.offset,
                        }
                        for e in heads.values()
                    ],
                )
            if positions:
                progress_table = IndexProgressRow.__table__  # type: ignore[attr-defined]
                upsert = self._insert(progress_table)
                connection.execute(
                    upsert.on_conflict_do_update(
                        index_elements=["topic", "partition"],
                        set_={"next_offset": upsert.excluded.next_offset},
                        where=progress_table.c.next_offset < upsert.excluded.next_offset,
                    ),
                    [{"topic": t, "partition": p, "next_offset": o} for (t, p), o in positions.items()],
                )

    def progress(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        wanted = list(partitions)
        if not wanted:
            return {}
        self.ensure_tables()
        # Core, not the ORM, here and below: read-your-writes waits and every ReadStream run these.
        with _translated("reading the stream index progress"), self._engine.connect() as connection:
            rows = connection.execute(
                select(
                    col(IndexProgressRow.topic),
                    col(IndexProgressRow.partition),
                    col(IndexProgressRow.next_offset),
                ).where(tuple_(col(IndexProgressRow.topic), col(IndexProgressRow.partition)).in_(wanted))
            )
            found = {(topic, partition): offset for topic, partition, offset in rows}
        return {tp: found.get(tp, 0) for tp in wanted}

    def heads(self, streams: Iterable[StreamKey]) -> dict[StreamKey, int]:
        """The head version of each stream (0 for a stream the index does not know), in one round trip."""
        self.ensure_tables()
        heads = dict.fromkeys(streams, 0)
        by_category: dict[str, list[str]] = {}
        for category, stream_id in heads:
            by_category.setdefault(category, []).append(stream_id)
        # Core, not the ORM: this runs on the append path for every stream a writer has not seen yet.
        with _translated("reading stream heads"), self._engine.connect() as connection:
            for category, stream_ids in by_category.items():
                for i in range(0, len(stream_ids), 500):
                    rows = connection.execute(
                        select(col(StreamHeadRow.stream_id), col(StreamHeadRow.version)).where(
                            col(StreamHeadRow.category) == category,
                            col(StreamHeadRow.stream_id).in_(stream_ids[i : i + 500]),
                        )
                    )
                    heads.update(((category, stream_id), version) for stream_id, version in rows)
        return heads

    def read(
        self, category: str, stream_id: str, *, from_version: int, max_count: int, backwards: bool
    ) -> tuple[list[StoredEvent], int]:
        """Up to `max_count` events from `from_version` (inclusive; 0 = the start, or the head backwards)."""
        self.ensure_tables()
        with _translated("reading a stream"), self._engine.connect() as connection:
            head = connection.execute(
                select(col(StreamHeadRow.version)).where(
                    col(StreamHeadRow.category) == category, col(StreamHeadRow.stream_id) == stream_id
                )
            ).scalar()
            if head is None:
                return [], 0
            events = _EVENTS
            query = events.select().where(events.c.category == category, events.c.stream_id == stream_id)
            if backwards:
                if from_version:
                    query = query.where(events.c.version <= from_version)
                query = query.order_by(events.c.version.desc())
            else:
                query = query.where(events.c.version >= max(from_version, 1))
                query = query.order_by(events.c.version)
            rows = connection.execute(query.limit(max_count)).mappings()
            return [_to_event(r) for r in rows], int(head)

    def find_event_ids(self, category: str, event_ids: Sequence[str]) -> list[StoredEvent]:
        """The indexed events of `category` with any of these ids, in one round trip per 500 ids."""
        found: list[StoredEvent] = []
        ids = list(dict.fromkeys(event_ids))
        self.ensure_tables()
        events = _EVENTS
        with _translated("looking up event ids"), self._engine.connect() as connection:
            for i in range(0, len(ids), 500):
                rows = connection.execute(
                    events.select().where(
                        events.c.category == category, events.c.event_id.in_(ids[i : i + 500])
                    )
                ).mappings()
                found += [_to_event(r) for r in rows]
        return found

    def offset_of(self, category: str, stream_id: str, version: int) -> int | None:
        with _translated("reading a stream"), self._session() as session:
            row = session.get(StreamEventRow, (category, stream_id, version))
            return row.offset if row else None


def _event_columns(event: StoredEvent) -> dict[str, Any]:
    """A row of kpg_stream_events as plain values (no ORM instance: this runs for every indexed event)."""
    columns: dict[str, Any] = {name: getattr(event, name) for name in _SHARED_FIELDS}
    columns["metadata_json"] = json.dumps(event.metadata)
    return columns


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Database errors become BackendUnavailable at this edge (the caller retries; nothing leaks)."""
    try:
        yield
    except SQLAlchemyError as exc:
        raise BackendUnavailable(f"stream index: {what} failed: {exc.__class__.__name__}: {exc}") from exc
