"""The session's PostgreSQL (started by the devstack, or `KPG_TEST_POSTGRES_URL`) behind `Database`."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import Column, Integer, MetaData, Table, insert, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import make_url

from gateway.adapters.sql.database import Database
from gateway.devstack.postgres import PostgresNode
from tests.conftest import started_postgres

pytestmark = pytest.mark.integration


@pytest.fixture
def own_node() -> Iterator[PostgresNode]:
    """A server the devstack starts for this test alone (even when KPG_TEST_POSTGRES_URL names another):
    these tests check the devstack's own server, not whatever server the session uses."""
    with started_postgres() as node:
        yield node


@pytest.fixture
def database(postgres_url: str) -> Iterator[Database]:
    db = Database(postgres_url)
    try:
        yield db
    finally:
        db.close()


async def test_database_pings_postgres(database: Database) -> None:
    assert database.engine.dialect.name == "postgresql"
    assert database.engine.dialect.driver == "psycopg"
    assert await database.ping() is True


def test_jsonb_round_trips_through_sqlalchemy(database: Database, unique: str) -> None:
    metadata = MetaData()
    table = Table(
        f"it_jsonb_{unique}",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("doc", JSONB, nullable=False),
    )
    doc = {"name": "order-1", "lines": [{"sku": "a", "qty": 2}], "paid": False, "note": None}
    metadata.create_all(database.engine)
    try:
        with database.engine.begin() as connection:
            connection.execute(insert(table), [{"id": 1, "doc": doc}])
        with database.engine.connect() as connection:
            assert connection.execute(select(table.c.doc).where(table.c.id == 1)).scalar_one() == doc
            # Stored as JSONB, not text: the server itself looks inside it.
            name = connection.execute(select(table.c.doc["name"].astext)).scalar_one()
            assert name == "order-1"
    finally:
        metadata.drop_all(database.engine)


async def test_the_password_in_the_url_is_checked(own_node: PostgresNode) -> None:
    wrong = make_url(own_node.url).set(password="not-the-password").render_as_string(hide_password=False)
    db = Database(wrong)
    try:
        assert await db.ping() is False
    finally:
        db.close()


def test_stop_does_not_wait_for_connected_clients(own_node: PostgresNode) -> None:
    # SIGTERM alone would be a "smart" shutdown that waits for this open connection to close.
    assert own_node.process.pid() is not None
    with psycopg.connect(own_node.url) as client:
        started = time.monotonic()
        assert own_node.stop(timeout_s=10) is True
        assert time.monotonic() - started < 5  # well before the SIGKILL fallback
        assert own_node.process.pid() is None
        assert not own_node.answers()
        with pytest.raises(psycopg.OperationalError):
            client.execute("SELECT 1")
