"""The SQL database behind read models and indexes: SQLite by default, PostgreSQL by URL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Table, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import SQLModel, create_engine, text

from gateway.errors import BackendUnavailable


def normalize_url(url: str) -> str:
    """Accept plain `postgresql://` URLs by choosing the psycopg (v3) driver."""
    parsed = make_url(url)
    if parsed.drivername in {"postgresql", "postgres"}:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def create_tables(engine: Engine, tables: Sequence[Table]) -> None:
    """Create `tables` if missing. Two gateways creating them at the same moment collide (on PostgreSQL's
    catalogue, for one): the loser looks again and finds them."""
    try:
        SQLModel.metadata.create_all(engine, tables=list(tables))
    except SQLAlchemyError:
        SQLModel.metadata.create_all(engine, tables=list(tables))


def json_text(value: Any) -> str:
    """JSON columns' serializer (read-model documents, saga state). The values stored are plain JSON
    values (projections' results are checked as JSON first), which orjson encodes in a tenth of json's
    time, to text that parses back to the same value; json takes what orjson refuses (integers beyond
    64 bits, keys that are not strings), as before."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(value)


class Database:
    def __init__(self, url: str) -> None:
        self.url = normalize_url(url)
        parsed = make_url(self.url)
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        sqlite = parsed.get_backend_name() == "sqlite"
        # A server's connections can drop while pooled, so they are pinged at checkout; SQLite's cannot,
        # and the ping was 8% of a read-model Get.
        self.engine: Engine = create_engine(self.url, pool_pre_ping=not sqlite, json_serializer=json_text)
        if sqlite:
            # WAL lets readers run while the indexer writes; busy_timeout waits for a lock instead of failing.
            @event.listens_for(self.engine, "connect")
            def _sqlite_pragmas(connection: Any, _record: Any) -> None:
                cursor = connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
                cursor.execute("PRAGMA busy_timeout=10000")
                cursor.close()

    async def ping(self) -> bool:
        def ask() -> bool:
            try:
                with self.engine.connect() as connection:
                    connection.execute(text("SELECT 1"))
                return True
            except SQLAlchemyError:
                return False

        return await asyncio.to_thread(ask)

    async def check(self) -> None:
        if not await self.ping():
            raise BackendUnavailable(f"database {make_url(self.url).render_as_string()} is not reachable")

    def close(self) -> None:
        self.engine.dispose()
