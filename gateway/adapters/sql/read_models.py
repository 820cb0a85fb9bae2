"""Read models in SQL: a registry of models, one document table per generation, and the projection's
offsets stored with the documents.

- `kpg_read_models`: per model, the table that serves (`active_table`) and, during a rebuild, the
  table being built (`building_table`). Swapping is one UPDATE, so every instance sees the same model.
- `kpg_read_model_offsets`: per document table, the next offset to apply of every partition. A batch
  writes its documents and its offsets in one transaction; the offsets update is conditional on the
  values the batch started from, so two instances can never both apply the same records (the loser's
  transaction rolls back and it re-reads where the model stands).
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import MetaData, Table, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlmodel import Field, SQLModel, col

from gateway.adapters.sql.database import Database, create_tables
from gateway.adapters.sql.documents import (
    DocumentRow,
    FieldFilter,
    Page,
    count_documents,
    document_table,
    get_document,
    get_documents,
    query_documents,
)
from gateway.errors import BackendUnavailable

TopicPartition = tuple[str, int]
T = TypeVar("T")


class ReadModelRow(SQLModel, table=True):
    __tablename__ = "kpg_read_models"

    name: str = Field(primary_key=True)
    generation: int
    active_table: str
    building_table: str = ""
    state: str = "RUNNING"  # RUNNING, REBUILDING, FAILED
    error: str = ""
    updated_at: datetime


class ReadModelOffsetRow(SQLModel, table=True):
    __tablename__ = "kpg_read_model_offsets"

    table_name: str = Field(primary_key=True)
    topic: str = Field(primary_key=True)
    partition: int = Field(primary_key=True)
    next_offset: int


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    name: str
    generation: int
    active_table: str
    building_table: str
    state: str
    error: str


@dataclass(frozen=True, slots=True)
class DocumentChange:
    """The new state of one document after a batch; `data` None deletes it."""

    data: dict[str, Any] | None
    version: int
    position: str
    partition: int
    offset: int


class OffsetConflict(BackendUnavailable):
    """Another instance applied some of these records first; re-read the offsets and go on (transient:
    the consumer rewinds and retries, it never counts against a record)."""


def new_table_name(model: str, generation: int) -> str:
    """A safe SQL table name for a model's generation (model names allow `.:@-`). The random part makes
    it unique per database too: the projection's consumer group is named after it, so two deployments
    sharing a Kafka cluster never share a group."""
    slug = re.sub(r"[^a-z0-9_]", "_", model.lower())[:30]
    return f"kpg_rm_{slug}_{uuid.uuid4().hex[:8]}_g{generation}"


class ReadModelStore:
    def __init__(self, database: Database) -> None:
        self._engine = database.engine
        self._dialect = self._engine.dialect.name
        self._metadata = MetaData()
        self._tables: dict[str, Table] = {}
        self._tables_lock = threading.Lock()
        self._ready = False

    def ensure_tables(self) -> None:
        """Create the registry tables if missing: idempotent, and called once the database answers (not at
        construction, so a gateway starts while its database is down)."""
        if self._ready:
            return
        tables = [ReadModelRow.__table__, ReadModelOffsetRow.__table__]  # type: ignore[attr-defined]
        with self._tables_lock:
            self._guard(lambda: create_tables(self._engine, tables))
            self._ready = True

    @staticmethod
    def _guard(action: Callable[[], T]) -> T:
        try:
            return action()
        except SQLAlchemyError as exc:
            raise BackendUnavailable(f"read-model database: {exc.__class__.__name__}: {exc}") from exc

    def _read(self, action: Callable[[Connection], T]) -> T:
        """`action` on a connection of its own, database errors as BackendUnavailable."""

        def run() -> T:
            with self._engine.connect() as connection:
                return action(connection)

        return self._guard(run)

    def table(self, name: str) -> Table:
        with self._tables_lock:  # called from several worker threads at once
            table = self._tables.get(name)
            if table is None:
                table = document_table(self._metadata, name)
                self._guard(lambda: table.create(self._engine, checkfirst=True))
                self._tables[name] = table
            return table

    # --- registry --------------------------------------------------------------------------------------

    def ensure(self, model: str) -> RegistryEntry:
        """The model's registry entry, creating it (and its first table) on first use."""

        def run() -> RegistryEntry:
            with self._engine.begin() as connection:
                row = connection.execute(select(ReadModelRow).where(col(ReadModelRow.name) == model)).first()
                if row is not None:
                    return self._entry_of(row)
            name = new_table_name(model, 1)
            self.table(name)
            try:
                with self._engine.begin() as connection:
                    connection.execute(
                        insert(ReadModelRow).values(
                            name=model, generation=1, active_table=name, updated_at=datetime.now(UTC)
                        )
                    )
            except IntegrityError:
                pass  # another instance registered it first
            return self.entry(model)

        return self._guard(run)

    def _entry_of(self, row: Any) -> RegistryEntry:
        return RegistryEntry(
            row.name, row.generation, row.active_table, row.building_table, row.state, row.error
        )

    def entry(self, model: str) -> RegistryEntry:
        def run() -> RegistryEntry:
            with self._engine.connect() as connection:
                row = connection.execute(select(ReadModelRow).where(col(ReadModelRow.name) == model)).first()
            if row is None:
                raise LookupError(model)
            return self._entry_of(row)

        return self._guard(run)

    def start_rebuild(self, model: str) -> RegistryEntry:
        """Register a fresh table to build; a rebuild already under way is returned as it is."""
        current = self.entry(model)
        if current.building_table:
            return current
        generation = current.generation + 1
        name = new_table_name(model, generation)
        self.table(name)

        def run() -> None:
            with self._engine.begin() as connection:
                connection.execute(
                    update(ReadModelRow)
                    .where(col(ReadModelRow.name) == model, col(ReadModelRow.building_table) == "")
                    .values(
                        generation=generation,
                        building_table=name,
                        state="REBUILDING",
                        updated_at=datetime.now(UTC),
                    )
                )

        self._guard(run)
        return self.entry(model)

    def swap(self, model: str, building_table: str) -> str | None:
        """Serve the rebuilt table from now on; returns the retired table (None if another instance
        swapped first)."""

        def run() -> str | None:
            with self._engine.begin() as connection:
                row = connection.execute(select(ReadModelRow).where(col(ReadModelRow.name) == model)).first()
                if row is None or row.building_table != building_table:
                    return None
                changed = connection.execute(
                    update(ReadModelRow)
                    .where(
                        col(ReadModelRow.name) == model,
                        col(ReadModelRow.building_table) == building_table,
                    )
                    .values(
                        active_table=building_table,
                        building_table="",
                        state="RUNNING",
                        error="",
                        updated_at=datetime.now(UTC),
                    )
                )
                return str(row.active_table) if changed.rowcount == 1 else None

        return self._guard(run)

    def drop(self, table_name: str) -> None:
        self._guard(lambda: self._drop(table_name))

    def _drop(self, table_name: str) -> None:
        with self._engine.begin() as connection:
            connection.execute(
                delete(ReadModelOffsetRow).where(col(ReadModelOffsetRow.table_name) == table_name)
            )
        with self._tables_lock:
            table = self._tables.pop(table_name, None)
            if table is not None:
                self._metadata.remove(table)
        (table if table is not None else document_table(MetaData(), table_name)).drop(
            self._engine, checkfirst=True
        )

    # --- offsets and documents -------------------------------------------------------------------------

    def offsets(
        self, table_name: str, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, int]:
        """Next offset to apply per partition (only partitions with any progress)."""

        query = select(
            col(ReadModelOffsetRow.topic),
            col(ReadModelOffsetRow.partition),
            col(ReadModelOffsetRow.next_offset),
        ).where(col(ReadModelOffsetRow.table_name) == table_name)
        rows = self._read(lambda connection: connection.execute(query).all())
        found = {(topic, partition): offset for topic, partition, offset in rows}
        if partitions is None:
            return found
        return {tp: found[tp] for tp in partitions if tp in found}

    def load(self, table_name: str, keys: Iterable[str]) -> dict[str, DocumentRow]:
        table = self.table(table_name)
        return self._read(lambda connection: get_documents(connection, table, keys))

    def commit(
        self,
        table_name: str,
        *,
        expected: Mapping[TopicPartition, int | None],
        offsets: Mapping[TopicPartition, int],
        changes: Mapping[str, DocumentChange],
    ) -> None:
        """Write the documents and advance the offsets in one transaction. Raises OffsetConflict when a
        partition is no longer where `expected` says (another instance applied it)."""
        table = self.table(table_name)
        now = datetime.now(UTC)

        def run() -> None:
            with self._engine.begin() as connection:
                self._advance(connection, table_name, expected, offsets)
                deleted = [key for key, change in changes.items() if change.data is None]
                if deleted:
                    connection.execute(delete(table).where(table.c.key.in_(deleted)))
                rows = [
                    {
                        "key": key,
                        "data": change.data,
                        "version": change.version,
                        "position": change.position,
                        "partition": change.partition,
                        "offset": change.offset,
                        "updated_at": now,
                    }
                    for key, change in changes.items()
                    if change.data is not None
                ]
                if rows:
                    connection.execute(self._upsert(table), rows)

        try:
            self._guard(run)
        except BackendUnavailable as exc:
            if isinstance(exc.__cause__, IntegrityError | OperationalError) and _is_conflict(exc.__cause__):
                raise OffsetConflict(str(exc.__cause__)) from exc
            raise

    def _advance(
        self,
        connection: Connection,
        table_name: str,
        expected: Mapping[TopicPartition, int | None],
        offsets: Mapping[TopicPartition, int],
    ) -> None:
        for (topic, partition), next_offset in offsets.items():
            before = expected.get((topic, partition))
            if before is None:
                connection.execute(  # IntegrityError if another instance created it meanwhile
                    insert(ReadModelOffsetRow).values(
                        table_name=table_name, topic=topic, partition=partition, next_offset=next_offset
                    )
                )
                continue
            changed = connection.execute(
                update(ReadModelOffsetRow)
                .where(
                    col(ReadModelOffsetRow.table_name) == table_name,
                    col(ReadModelOffsetRow.topic) == topic,
                    col(ReadModelOffsetRow.partition) == partition,
                    col(ReadModelOffsetRow.next_offset) == before,
                )
                .values(next_offset=next_offset)
            )
            if changed.rowcount != 1:
                raise OffsetConflict(f"{table_name} {topic}[{partition}] moved past {before}")

    def _upsert(self, table: Table) -> Any:
        dialect = postgresql if self._dialect == "postgresql" else sqlite
        statement = dialect.insert(table)
        return statement.on_conflict_do_update(
            index_elements=[table.c.key],
            set_={
                c: statement.excluded[c]
                for c in ("data", "version", "position", "partition", "offset", "updated_at")
            },
        )

    # --- queries ---------------------------------------------------------------------------------------

    def get(self, table_name: str, key: str) -> DocumentRow | None:
        table = self.table(table_name)
        return self._read(lambda connection: get_document(connection, table, key))

    def query(
        self,
        table_name: str,
        *,
        filters: Sequence[FieldFilter],
        order_by: str,
        descending: bool,
        limit: int,
        page_token: str,
    ) -> Page:
        table = self.table(table_name)
        return self._read(
            lambda connection: query_documents(
                connection,
                table,
                filters=filters,
                order_by=order_by,
                descending=descending,
                limit=limit,
                page_token=page_token,
            )
        )

    def count(self, table_name: str) -> int:
        table = self.table(table_name)
        return self._read(lambda connection: count_documents(connection, table))


def _is_conflict(error: SQLAlchemyError) -> bool:
    if isinstance(error, IntegrityError):
        return True
    # SQLite: another connection wrote since this transaction's snapshot (WAL); retrying is the answer.
    return "database is locked" in str(error) or "SQLITE_BUSY" in str(error)
