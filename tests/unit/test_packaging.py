"""docker-compose.yml cannot run here (no Docker engine), so these tests read it: its settings must be
ones the gateway understands, and it must run the same Kafka the dev stack runs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.definitions import load_definitions
from gateway.devstack.kafka import KAFKA_VERSION
from gateway.settings import Settings


@pytest.fixture(scope="module")
def compose(repo_root: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((repo_root / "docker-compose.yml").read_text())
    return document


def test_compose_services_and_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"kafka", "redis", "postgres", "gateway"}
    assert services["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"
    assert services["redis"]["image"].startswith("redis:")
    assert services["gateway"]["build"] == "."
    for dependency in ("kafka", "redis", "postgres"):
        assert services["gateway"]["depends_on"][dependency] == {"condition": "service_healthy"}
        assert "healthcheck" in services[dependency]


def test_compose_gateway_settings_are_understood(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, repo_root: Path
) -> None:
    gateway = compose["services"]["gateway"]
    dockerfile = (repo_root / "Dockerfile").read_text()
    image_env = dict(re.findall(r"(KPG_[A-Z_]+)=(\S+)", dockerfile))
    for key, value in {**image_env, **gateway["environment"]}.items():
        monkeypatch.setenv(key, str(value))

    settings = Settings()

    assert settings.kafka.bootstrap_servers == "kafka:9092"
    assert settings.redis.url == "redis://redis:6379/0"
    assert settings.database_url.startswith("postgresql://kpg:kpg@postgres:5432/")
    assert (settings.grpc.host, settings.rest.host) == ("0.0.0.0", "0.0.0.0")
    published = {int(p.split(":")[0]) for p in gateway["ports"]}
    assert {settings.grpc.port, settings.rest.port} <= published


def test_compose_definitions_are_the_examples(compose: dict[str, Any], repo_root: Path) -> None:
    command = compose["services"]["gateway"]["command"]
    path = Path(command[command.index("--definitions") + 1])
    assert path.parent == Path("/etc/kpg/examples")
    assert "COPY examples /etc/kpg/examples" in (repo_root / "Dockerfile").read_text()
    load_definitions(repo_root / "examples" / path.name)


def test_protobuf_runs_on_upb() -> None:
    """The pure-Python protobuf fallback is many times slower; an install that lands on it must fail here."""
    from google.protobuf.internal import api_implementation

    assert api_implementation.Type() == "upb"
