"""`DevStack`: one Kafka broker and one Redis server (and, on request, PostgreSQL) on loopback, with
their state in one folder.

`up` writes `stack.json` (ports) and a pid file per process into the state folder; `down` stops exactly
the processes those pid files name; `env` prints the settings the gateway needs to reach them.
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from gateway.adapters.kafka.admin import kafka_answers
from gateway.adapters.redis.client import redis_answers
from gateway.devstack.kafka import KAFKA_VERSION, KafkaNode, default_cache_dir, find_java, resolve_kafka
from gateway.devstack.postgres import PostgresNode, find_postgres_bin, url_for
from gateway.devstack.processes import StackError, ensure_port_free, free_ports, wait_until
from gateway.devstack.redis import RedisNode, find_redis_server

__all__ = ["DevStack", "StackError", "StackInfo"]

DEFAULT_KAFKA_PORT = 9092
DEFAULT_CONTROLLER_PORT = 9093
DEFAULT_REDIS_PORT = 6379
# What `down --wipe` deletes from the state folder: each server's data (and the logs that describe it).
WIPED = ("kafka", "redis", "postgres", "logs")


@dataclass(frozen=True, slots=True)
class StackInfo:
    kafka_port: int
    controller_port: int
    redis_port: int
    postgres_port: int | None = None  # None: the stack runs no PostgreSQL

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def postgres_url(self) -> str | None:
        return None if self.postgres_port is None else url_for(self.postgres_port)

    def env(self) -> dict[str, str]:
        env = {"KPG_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap_servers, "KPG_REDIS__URL": self.redis_url}
        if self.postgres_url is not None:
            env["KPG_DATABASE__URL"] = self.postgres_url
        return env


class DevStack:
    def __init__(
        self,
        state_dir: Path,
        *,
        cache_dir: Path | None = None,
        kafka_version: str = KAFKA_VERSION,
        start_timeout_s: float = 90.0,
    ) -> None:
        self.state_dir = state_dir.resolve()
        self.cache_dir = cache_dir or default_cache_dir()
        self.kafka_version = kafka_version
        self.start_timeout_s = start_timeout_s

    @property
    def _info_file(self) -> Path:
        return self.state_dir / "stack.json"

    def info(self) -> StackInfo | None:
        try:
            return StackInfo(**json.loads(self._info_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def up(
        self,
        *,
        kafka_port: int = DEFAULT_KAFKA_PORT,
        controller_port: int = DEFAULT_CONTROLLER_PORT,
        redis_port: int = DEFAULT_REDIS_PORT,
        postgres_port: int | None = None,
        progress: Callable[[str], None] = lambda _: None,
    ) -> StackInfo:
        """Start whatever is not running yet and wait until the servers answer. Port 0 picks a free port;
        PostgreSQL runs only when asked for (`postgres_port`) or already part of the stack."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        previous = self.info()
        if previous is not None:  # keep the ports of a stack that is (partly) running
            kafka_port, controller_port, redis_port = (
                previous.kafka_port,
                previous.controller_port,
                previous.redis_port,
            )
            if previous.postgres_port is not None:
                postgres_port = previous.postgres_port
        spare = iter(free_ports(4))  # distinct, so two "any free port" choices never collide
        info = StackInfo(
            kafka_port=kafka_port or next(spare),
            controller_port=controller_port or next(spare),
            redis_port=redis_port or next(spare),
            postgres_port=None if postgres_port is None else postgres_port or next(spare),
        )
        kafka = KafkaNode(self.state_dir, info.kafka_port, info.controller_port)
        redis = RedisNode(self.state_dir, info.redis_port)
        postgres = None if info.postgres_port is None else PostgresNode(self.state_dir, info.postgres_port)

        if postgres is not None and postgres.process.pid() is None:
            bin_dir = find_postgres_bin(progress=progress)
            ensure_port_free(postgres.port, "PostgreSQL")
            progress(f"starting PostgreSQL ({bin_dir}) on 127.0.0.1:{postgres.port}")
            postgres.start(bin_dir)
        if redis.process.pid() is None:
            binary = find_redis_server()
            ensure_port_free(info.redis_port, "Redis")
            progress(f"starting Redis ({Path(binary).name}) on 127.0.0.1:{info.redis_port}")
            redis.start(binary)
        if kafka.process.pid() is None:
            java = find_java()
            ensure_port_free(info.kafka_port, "Kafka")
            ensure_port_free(info.controller_port, "the Kafka controller")
            progress(f"resolving Kafka {self.kafka_version} (first time only: downloads from Maven Central)")
            libs = resolve_kafka(self.cache_dir, self.kafka_version)
            progress(f"starting Kafka {self.kafka_version} on {info.bootstrap_servers}")
            kafka.start(java, libs)
        self._info_file.write_text(json.dumps(asdict(info)))

        progress("waiting for Redis and Kafka to answer")
        wait_until(
            lambda: redis_answers(info.redis_url, 1.0),
            what="Redis",
            timeout_s=self.start_timeout_s,
            process=redis.process,
        )
        try:
            wait_until(
                lambda: kafka_answers(info.bootstrap_servers, 2.0),
                what="Kafka",
                timeout_s=self.start_timeout_s,
                process=kafka.process,
            )
        except StackError as exc:
            raise StackError(
                f"{exc} (a broker holding many topics starts slowly: `kpg dev down --wipe` empties it)"
            ) from None
        if postgres is not None:
            wait_until(
                postgres.answers, what="PostgreSQL", timeout_s=self.start_timeout_s, process=postgres.process
            )
        return info

    def down(self, *, wipe: bool = False) -> list[str]:
        """Stop what `up` started (and nothing else); returns the names of the stopped processes. `wipe`:
        then delete their data too (topics, keys, databases; not the downloaded Kafka), so the next `up`
        starts empty: a broker that has gathered thousands of test topics takes minutes to start."""
        info = self.info()
        stopped = []
        for node in self._nodes(info):
            if node.stop() if isinstance(node, PostgresNode) else node.process.stop():
                stopped.append(node.process.name)
        self._info_file.unlink(missing_ok=True)
        if wipe:
            for data in WIPED:
                shutil.rmtree(self.state_dir / data, ignore_errors=True)
        return stopped

    def status(self) -> dict[str, dict[str, object]]:
        info = self.info()
        result: dict[str, dict[str, object]] = {}
        for node in self._nodes(info):
            pid = node.process.pid()
            result[node.process.name] = {
                "pid": pid,
                "address": node.bootstrap if isinstance(node, KafkaNode) else node.url,
                "answers": pid is not None and info is not None and _answers(node),
                "log": str(node.process.log_file),
            }
        return result

    def env_lines(self) -> list[str]:
        info = self.info()
        if info is None:
            raise StackError(f"no dev stack in {self.state_dir}: run `kpg dev up` first")
        return [f"export {key}={shlex.quote(value)}" for key, value in info.env().items()]

    def _nodes(self, info: StackInfo | None) -> list[KafkaNode | RedisNode | PostgresNode]:
        info = info or StackInfo(DEFAULT_KAFKA_PORT, DEFAULT_CONTROLLER_PORT, DEFAULT_REDIS_PORT)
        nodes: list[KafkaNode | RedisNode | PostgresNode] = [
            KafkaNode(self.state_dir, info.kafka_port, info.controller_port),
            RedisNode(self.state_dir, info.redis_port),
        ]
        postgres = PostgresNode(self.state_dir, info.postgres_port or 0)
        if info.postgres_port is not None or postgres.process.pid_file.exists():
            nodes.append(postgres)
        return nodes


def _answers(node: KafkaNode | RedisNode | PostgresNode) -> bool:
    if isinstance(node, KafkaNode):
        return kafka_answers(node.bootstrap, 2.0)
    if isinstance(node, RedisNode):
        return redis_answers(node.url, 1.0)
    return node.answers()
