"""The stream index: every gateway event, by stream and version, in SQL.

Built by one consumer of the category topics (services/stream_indexer.py). Each batch's rows, the stream
heads and the consumer's next offsets are written in one transaction, so a crash or a redelivery never
indexes an event twice or skips one. ReadStream and head recovery read here, never by scanning a topic.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import fields
from datetime import datetime

from sqlalchemy import and_, tuple_
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Field, Session, SQLModel, col, select

from gateway.adapters.sql.database import Database
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

    @classmethod
    def from_event(cls, event: StoredEvent) -> StreamEventRow:
        columns = {name: getattr(event, name) for name in _SHARED_FIELDS}
        return cls(**columns, metadata_json=json.dumps(event.metadata))

    def to_event(self) -> StoredEvent:
        columns = {name: getattr(self, name) for name in _SHARED_FIELDS}
        return StoredEvent(**columns, metadata=json.loads(self.metadata_json))


# Every StoredEvent field is a column of the same name, except metadata (stored as JSON text).
_SHARED_FIELDS = tuple(f.name for f in fields(StoredEvent) if f.name != "metadata")


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
    def __init__(self, database: Database) -> None:
        self._engine = database.engine
        try:
            SQLModel.metadata.create_all(
                self._engine,
                tables=[t.__table__ for t in (StreamEventRow, StreamHeadRow, IndexProgressRow, IndexMetaRow)],  # type: ignore[union-attr]
            )
        except SQLAlchemyError as exc:
            raise BackendUnavailable(f"cannot create the stream index tables: {exc}") from exc

    def _session(self) -> Session:
        return Session(self._engine, expire_on_commit=False)

    def index_id(self) -> str:
        """A stable id of this index (its database): gateways sharing the database share a consumer group."""
        with self._session() as session:
            row = session.get(IndexMetaRow, "index_id")
            if row is None:
                session.add(IndexMetaRow(key="index_id", value=uuid.uuid4().hex[:16]))
                try:
                    session.commit()
                except SQLAlchemyError:  # another gateway created it first
                    session.rollback()
                row = session.get(IndexMetaRow, "index_id")
            assert row is not None
            return row.value

    def apply(self, events: Sequence[StoredEvent], positions: dict[TopicPartition, int]) -> list[StoredEvent]:
        """Index a batch and advance the offsets in one transaction; returns the events newly indexed
        (a redelivered or superseded version is skipped)."""
        with self._session() as session:
            progress = (
                {
                    (r.topic, r.partition): r
                    for r in session.exec(
                        select(IndexProgressRow).where(
                            tuple_(col(IndexProgressRow.topic), col(IndexProgressRow.partition)).in_(
                                list(positions)
                            )
                        )
                    )
                }
                if positions
                else {}
            )
            heads = _load_heads(session, {(e.category, e.stream_id) for e in events})
            added = []
            for event in events:
                done = progress.get((event.topic, event.partition))
                if done is not None and event.offset < done.next_offset:
                    continue  # redelivered: already indexed
                known = heads.get((event.category, event.stream_id))
                if known is not None and event.version <= known.version:
                    continue  # a version this stream already has (first in the log wins)
                session.add(StreamEventRow.from_event(event))
                head = known or StreamHeadRow(
                    category=event.category,
                    stream_id=event.stream_id,
                    version=0,
                    partition=event.partition,
                    offset=event.offset,
                )
                heads[(event.category, event.stream_id)] = head
                head.version, head.partition, head.offset = event.version, event.partition, event.offset
                session.add(head)
                added.append(event)
            for (topic, partition), next_offset in positions.items():
                row = progress.get((topic, partition))
                if row is None:
                    session.add(IndexProgressRow(topic=topic, partition=partition, next_offset=next_offset))
                elif next_offset > row.next_offset:
                    row.next_offset = next_offset
                    session.add(row)
            session.commit()
            return added

    def progress(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        wanted = list(partitions)
        if not wanted:
            return {}
        with self._session() as session:
            rows = session.exec(
                select(IndexProgressRow).where(
                    tuple_(col(IndexProgressRow.topic), col(IndexProgressRow.partition)).in_(wanted)
                )
            )
            found = {(r.topic, r.partition): r.next_offset for r in rows}
        return {tp: found.get(tp, 0) for tp in wanted}

    def heads(self, streams: Iterable[StreamKey]) -> dict[StreamKey, int]:
        """The head version of each stream (0 for a stream the index does not know), in one round trip."""
        heads = dict.fromkeys(streams, 0)
        by_category: dict[str, list[str]] = {}
        for category, stream_id in heads:
            by_category.setdefault(category, []).append(stream_id)
        # Core, not the ORM: this runs on the append path for every stream a writer has not seen yet.
        with self._engine.connect() as connection:
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
        with self._session() as session:
            head = session.get(StreamHeadRow, (category, stream_id))
            if head is None:
                return [], 0
            query = select(StreamEventRow).where(
                StreamEventRow.category == category, StreamEventRow.stream_id == stream_id
            )
            if backwards:
                if from_version:
                    query = query.where(col(StreamEventRow.version) <= from_version)
                query = query.order_by(col(StreamEventRow.version).desc())
            else:
                query = query.where(col(StreamEventRow.version) >= max(from_version, 1))
                query = query.order_by(col(StreamEventRow.version))
            rows = session.exec(query.limit(max_count)).all()
            return [r.to_event() for r in rows], head.version

    def find_event_ids(self, category: str, stream_id: str, event_ids: Sequence[str]) -> list[StoredEvent]:
        with self._session() as session:
            rows = session.exec(
                select(StreamEventRow)
                .where(
                    and_(
                        col(StreamEventRow.category) == category,
                        col(StreamEventRow.stream_id) == stream_id,
                        col(StreamEventRow.event_id).in_(list(event_ids)),
                    )
                )
                .order_by(col(StreamEventRow.version))
            ).all()
            return [r.to_event() for r in rows]

    def offset_of(self, category: str, stream_id: str, version: int) -> int | None:
        with self._session() as session:
            row = session.get(StreamEventRow, (category, stream_id, version))
            return row.offset if row else None


def _load_heads(session: Session, keys: Iterable[StreamKey]) -> dict[StreamKey, StreamHeadRow]:
    heads: dict[StreamKey, StreamHeadRow] = {}
    for chunk in _chunks(list(keys), 200):
        for head in session.exec(
            select(StreamHeadRow).where(
                tuple_(col(StreamHeadRow.category), col(StreamHeadRow.stream_id)).in_(chunk)
            )
        ):
            heads[(head.category, head.stream_id)] = head
    return heads


def _chunks(items: list[StreamKey], size: int) -> Iterable[list[StreamKey]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
