"""The session's PostgreSQL (started by the devstack, or `KPG_TEST_POSTGRES_URL`) behind `Database`."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Column, Integer, MetaData, Table, insert, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import make_url

from gateway.adapters.sql.database import Database
from gateway.devstack.postgres import PostgresNode, find_postgres_bin
from gateway.devstack.processes import free_port, wait_until

pytestmark = pytest.mark.integration

own_server = pytest.mark.skipif(
    bool(os.environ.get("KPG_TEST_POSTGRES_URL")), reason="checks the server the devstack starts"
)


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


@own_server
async def test_the_password_in_the_url_is_checked(postgres_url: str) -> None:
    wrong = make_url(postgres_url).set(password="not-the-password").render_as_string(hide_password=False)
    db = Database(wrong)
    try:
        assert await db.ping() is False
    finally:
        db.close()


@own_server
def test_stop_does_not_wait_for_connected_clients() -> None:
    # SIGTERM alone would be a "smart" shutdown that waits for this open connection to close.
    state_dir = Path(tempfile.mkdtemp(prefix="kpg-postgres-"))
    node = PostgresNode(state_dir, free_port())
    try:
        node.start(find_postgres_bin())
        wait_until(node.answers, what="PostgreSQL", timeout_s=60, process=node.process)
        pid = node.process.pid()
        assert pid is not None
        with psycopg.connect(node.url) as client:
            started = time.monotonic()
            assert node.stop(timeout_s=10) is True
            assert time.monotonic() - started < 5  # well before the SIGKILL fallback
            assert node.process.pid() is None
            assert not node.answers()
            with pytest.raises(psycopg.OperationalError):
                client.execute("SELECT 1")
    finally:
        node.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
