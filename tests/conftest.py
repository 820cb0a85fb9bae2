"""Shared fixtures: the real Kafka broker, Redis server and PostgreSQL server for this test session.

The devstack starts them on free ports in a fresh folder (and stops them at the end), unless
`KPG_TEST_KAFKA_BOOTSTRAP` and `KPG_TEST_REDIS_URL` name a stack to reuse, or `KPG_TEST_POSTGRES_URL` a
PostgreSQL server. PostgreSQL starts only when a test asks for `postgres_url`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from gateway.devstack import DevStack
from gateway.devstack.postgres import PostgresNode, find_postgres_bin
from gateway.devstack.processes import free_port, wait_until
from gateway.settings import KafkaSettings, RedisSettings


@dataclass(frozen=True)
class Backends:
    bootstrap_servers: str
    redis_url: str

    def kafka(self, **overrides: object) -> KafkaSettings:
        return KafkaSettings.model_validate({"bootstrap_servers": self.bootstrap_servers, **overrides})

    def redis(self) -> RedisSettings:
        return RedisSettings(url=self.redis_url)


@pytest.fixture(scope="session")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    bootstrap = os.environ.get("KPG_TEST_KAFKA_BOOTSTRAP")
    redis_url = os.environ.get("KPG_TEST_REDIS_URL")
    if bootstrap and redis_url:
        yield Backends(bootstrap, redis_url)
        return
    stack = DevStack(tmp_path_factory.mktemp("devstack"))
    try:
        info = stack.up(kafka_port=0, controller_port=0, redis_port=0)
        yield Backends(info.bootstrap_servers, info.redis_url)
    finally:
        stack.down()


@contextmanager
def started_postgres() -> Iterator[PostgresNode]:
    """A PostgreSQL server the devstack starts (and removes afterwards)."""
    # Not under pytest's tmp folder: as root the server runs as `postgres`, which cannot enter the 0700
    # /tmp/pytest-of-root.
    state_dir = Path(tempfile.mkdtemp(prefix="kpg-postgres-"))
    node = PostgresNode(state_dir, free_port())
    try:
        node.start(find_postgres_bin())
        wait_until(node.answers, what="PostgreSQL", timeout_s=60, process=node.process)
        yield node
    finally:
        node.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A plain `postgresql://user:password@host:port/db` URL of a real server."""
    configured = os.environ.get("KPG_TEST_POSTGRES_URL")
    if configured:
        yield configured
        return
    with started_postgres() as node:
        yield node.url


def fresh_postgres_database(postgres_url: str) -> str:
    """A database of its own on the test server, so gateways never share tables by accident."""
    name = f"kpg_{uuid.uuid4().hex[:12]}"
    url = make_url(postgres_url)
    with psycopg.connect(
        host=url.host,
        port=url.port,
        user=url.username,
        password=url.password,
        dbname=url.database,
        autocommit=True,
    ) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return url.set(database=name).render_as_string(hide_password=False)


@pytest.fixture
def unique() -> str:
    """A short unique suffix, so tests never share topics, groups or keys."""
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
