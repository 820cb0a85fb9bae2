"""Saga state in SQL: the durable record every gateway instance drives sagas from.

One row per saga (its current version) and one history row per version (what WatchSaga streams). A change
is a compare-and-set on the saga's version, written with its history row in one transaction: of two
instances that try to move one saga from the same version, exactly one wins and the other learns it lost.
Database errors surface as BackendUnavailable (callers retry), never as a driver error.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Index, Text, and_, insert, or_, tuple_, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Field, SQLModel, select

from gateway.adapters.sql.database import Database, create_tables
from gateway.domain.sagas import Saga, SagaStatus
from gateway.errors import BackendUnavailable

_ACTIVE = (SagaStatus.RUNNING.value, SagaStatus.COMPENSATING.value)


class SagaRow(SQLModel, table=True):
    __tablename__ = "kpg_sagas"
    __table_args__ = (
        Index("ix_kpg_sagas_started", "started_at", "saga_id"),
        Index("ix_kpg_sagas_type_started", "saga_type", "started_at", "saga_id"),
        Index("ix_kpg_sagas_deadline", "partition", "deadline_ms"),
        Index("ix_kpg_sagas_dispatched", "partition", "dispatched", "updated_at"),
    )

    saga_id: str = Field(primary_key=True)
    saga_type: str
    status: str = Field(index=True)
    version: int
    state_json: str = Field(sa_type=Text)
    started_at: datetime = Field(sa_type=DateTime(timezone=True))
    updated_at: datetime = Field(sa_type=DateTime(timezone=True))
    deadline_ms: int | None = Field(default=None, sa_type=BigInteger)
    dispatched: bool
    fingerprint: str
    partition: int = 0  # the reply-topic partition whose consumer drives the saga


class SagaHistoryRow(SQLModel, table=True):
    __tablename__ = "kpg_saga_history"

    saga_id: str = Field(primary_key=True)
    version: int = Field(primary_key=True)
    status: str
    state_json: str = Field(sa_type=Text)
    updated_at: datetime = Field(sa_type=DateTime(timezone=True))
    deadline_ms: int | None = Field(default=None, sa_type=BigInteger)


class SagaMetaRow(SQLModel, table=True):
    __tablename__ = "kpg_saga_meta"

    key: str = Field(primary_key=True)
    value: str


_TABLES = [SagaRow.__table__, SagaHistoryRow.__table__, SagaMetaRow.__table__]  # type: ignore[attr-defined]
_SAGAS = SagaRow.__table__  # type: ignore[attr-defined]
_HISTORY = SagaHistoryRow.__table__  # type: ignore[attr-defined]


class SagaStore:
    """Every method is synchronous (callers run it in a thread) and bounded by the database's timeouts."""

    def __init__(self, database: Database) -> None:
        self._engine = database.engine
        self._ready = False
        self._creating = threading.Lock()

    def ensure_tables(self) -> None:
        """Create the tables if missing (idempotent, thread-safe)."""
        if self._ready:
            return
        with self._creating, _translated("creating the saga tables"):
            if self._ready:
                return
            create_tables(self._engine, _TABLES)
            self._ready = True

    def deployment_id(self) -> str:
        """A stable id of this saga database: the gateways sharing it share reply topic and consumer group."""
        self.ensure_tables()
        with _translated("reading the saga metadata"), self._engine.begin() as connection:
            found = connection.execute(
                select(SagaMetaRow.value).where(SagaMetaRow.key == "deployment_id")
            ).first()
            if found is not None:
                return str(found[0])
        fresh = uuid.uuid4().hex[:16]
        try:
            with self._engine.begin() as connection:
                connection.execute(insert(SagaMetaRow).values(key="deployment_id", value=fresh))
            return fresh
        except IntegrityError:  # another gateway chose first
            return self.deployment_id()
        except SQLAlchemyError as exc:
            raise _unavailable("writing the saga metadata", exc) from exc

    def create(self, saga: Saga) -> Saga | None:
        """Insert a new saga; None if one with its id exists already (the caller reads and compares)."""
        self.ensure_tables()
        try:
            with self._engine.begin() as connection:
                connection.execute(insert(_SAGAS).values(_columns(saga)))
                connection.execute(insert(_HISTORY).values(_history(saga)))
            return saga
        except IntegrityError:
            return None
        except SQLAlchemyError as exc:
            raise _unavailable("creating a saga", exc) from exc

    def save(self, changes: Sequence[Saga]) -> list[Saga]:
        """Write each saga whose stored version is still `version - 1`, with its history row, in one
        transaction; returns the ones written (the others were moved on by someone else)."""
        if not changes:
            return []
        self.ensure_tables()
        written: list[Saga] = []
        with _translated("saving sagas"), self._engine.begin() as connection:
            for saga in changes:
                result = connection.execute(
                    update(_SAGAS)
                    .where(and_(_SAGAS.c.saga_id == saga.saga_id, _SAGAS.c.version == saga.version - 1))
                    .values(_columns(saga))
                )
                if result.rowcount == 1:
                    written.append(saga)
            if written:
                connection.execute(insert(_HISTORY), [_history(s) for s in written])
        return written

    def mark_dispatched(self, versions: Sequence[tuple[str, int]]) -> None:
        """Record that these versions' outgoing records reached Kafka (a version moved on is left alone)."""
        if not versions:
            return
        self.ensure_tables()
        with _translated("marking sagas dispatched"), self._engine.begin() as connection:
            connection.execute(
                update(_SAGAS)
                .where(tuple_(_SAGAS.c.saga_id, _SAGAS.c.version).in_(list(versions)))
                .values(dispatched=True)
            )

    def get(self, saga_ids: Sequence[str]) -> dict[str, Saga]:
        if not saga_ids:
            return {}
        self.ensure_tables()
        with _translated("reading sagas"), self._engine.connect() as connection:
            rows = connection.execute(select(_SAGAS).where(_SAGAS.c.saga_id.in_(list(saga_ids)))).mappings()
            return {row["saga_id"]: _saga(row) for row in rows}

    def due(self, now_ms: int, limit: int, partitions: Collection[int]) -> list[Saga]:
        """Running or compensating sagas of `partitions` whose deadline has passed, earliest first."""
        self.ensure_tables()
        query = (
            select(_SAGAS)
            .where(
                and_(
                    _SAGAS.c.partition.in_(list(partitions)),
                    _SAGAS.c.deadline_ms <= now_ms,
                    _SAGAS.c.status.in_(_ACTIVE),
                )
            )
            .order_by(_SAGAS.c.deadline_ms)
            .limit(limit)
        )
        with _translated("finding overdue sagas"), self._engine.connect() as connection:
            return [_saga(row) for row in connection.execute(query).mappings()]

    def undispatched(self, changed_before: datetime, limit: int, partitions: Collection[int]) -> list[Saga]:
        """Sagas of `partitions` whose outgoing record is not known to have reached Kafka, changed before
        `changed_before`."""
        self.ensure_tables()
        query = (
            select(_SAGAS)
            .where(
                and_(
                    _SAGAS.c.partition.in_(list(partitions)),
                    _SAGAS.c.dispatched == False,  # noqa: E712
                    _SAGAS.c.updated_at < changed_before,
                )
            )
            .order_by(_SAGAS.c.updated_at)
            .limit(limit)
        )
        with _translated("finding undispatched sagas"), self._engine.connect() as connection:
            return [_saga(row) for row in connection.execute(query).mappings()]

    def page(
        self, *, saga_type: str, status: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[Saga]:
        """Sagas in start order (then id), optionally of one type and status, after a keyset position."""
        self.ensure_tables()
        query = select(_SAGAS)
        if saga_type:
            query = query.where(_SAGAS.c.saga_type == saga_type)
        if status:
            query = query.where(_SAGAS.c.status == status)
        if after is not None:
            started, saga_id = after
            query = query.where(
                or_(
                    _SAGAS.c.started_at > started,
                    and_(_SAGAS.c.started_at == started, _SAGAS.c.saga_id > saga_id),
                )
            )
        query = query.order_by(_SAGAS.c.started_at, _SAGAS.c.saga_id).limit(limit)
        with _translated("listing sagas"), self._engine.connect() as connection:
            return [_saga(row) for row in connection.execute(query).mappings()]

    def history(self, saga: Saga, after_version: int) -> list[Saga]:
        """The versions of `saga` after `after_version`, oldest first, rebuilt from its history rows."""
        self.ensure_tables()
        query = (
            select(_HISTORY)
            .where(and_(_HISTORY.c.saga_id == saga.saga_id, _HISTORY.c.version > after_version))
            .order_by(_HISTORY.c.version)
        )
        with _translated("reading saga history"), self._engine.connect() as connection:
            rows = connection.execute(query).mappings().all()
        return [
            Saga.from_columns(
                saga_id=saga.saga_id,
                saga_type=saga.saga_type,
                status=row["status"],
                version=row["version"],
                state_json=row["state_json"],
                started_at=saga.started_at,
                updated_at=row["updated_at"],
                deadline_ms=row["deadline_ms"],
                dispatched=True,
                fingerprint=saga.fingerprint,
                partition=saga.partition,
            )
            for row in rows
        ]


def _columns(saga: Saga) -> dict[str, Any]:
    return {
        "saga_id": saga.saga_id,
        "saga_type": saga.saga_type,
        "status": saga.status.value,
        "version": saga.version,
        "state_json": saga.to_json(),
        "started_at": saga.started_at,
        "updated_at": saga.updated_at,
        "deadline_ms": saga.deadline_ms,
        "dispatched": saga.dispatched,
        "fingerprint": saga.fingerprint,
        "partition": saga.partition,
    }


def _history(saga: Saga) -> dict[str, Any]:
    return {
        "saga_id": saga.saga_id,
        "version": saga.version,
        "status": saga.status.value,
        "state_json": saga.to_json(),
        "updated_at": saga.updated_at,
        "deadline_ms": saga.deadline_ms,
    }


def _saga(row: Any) -> Saga:
    return Saga.from_columns(
        saga_id=row["saga_id"],
        saga_type=row["saga_type"],
        status=row["status"],
        version=row["version"],
        state_json=row["state_json"],
        started_at=row["started_at"],
        updated_at=row["updated_at"],
        deadline_ms=row["deadline_ms"],
        dispatched=row["dispatched"],
        fingerprint=row["fingerprint"],
        partition=row["partition"],
    )


def _unavailable(what: str, exc: SQLAlchemyError) -> BackendUnavailable:
    return BackendUnavailable(f"saga store: {what} failed: {exc.__class__.__name__}: {exc}")


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Database errors become BackendUnavailable at this edge (the caller retries; nothing leaks)."""
    try:
        yield
    except SQLAlchemyError as exc:
        raise _unavailable(what, exc) from exc
