from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import Settings


def test_environment_with_prefix_and_nesting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KPG_KAFKA__BOOTSTRAP_SERVERS", "broker:29092")
    monkeypatch.setenv("KPG_REDIS__URL", "redis://cache:6380/1")
    monkeypatch.setenv("KPG_DATABASE__URL", "postgresql://kpg:secret@db:5432/kpg")
    monkeypatch.setenv("KPG_GRPC__HOST", "0.0.0.0")
    monkeypatch.setenv("KPG_GRPC__PORT", "6000")
    monkeypatch.setenv("KPG_REST__HOST", "0.0.0.0")
    monkeypatch.setenv("KPG_REST__PORT", "6001")
    monkeypatch.setenv("KPG_DEFINITIONS", "/etc/kpg/definitions.yaml")

    settings = Settings()

    assert settings.kafka.bootstrap_servers == "broker:29092"
    assert settings.redis.url == "redis://cache:6380/1"
    assert settings.database_url == "postgresql://kpg:secret@db:5432/kpg"
    assert (settings.grpc.host, settings.grpc.port) == ("0.0.0.0", 6000)
    assert (settings.rest.host, settings.rest.port) == ("0.0.0.0", 6001)
    assert settings.definitions == Path("/etc/kpg/definitions.yaml")


def test_explicit_values_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KPG_KAFKA__BOOTSTRAP_SERVERS", "from-env:9092")
    monkeypatch.setenv("KPG_KAFKA__LINGER_MS", "20")

    settings = Settings.model_validate({"kafka": {"bootstrap_servers": "from-flag:9092"}})

    assert settings.kafka.bootstrap_servers == "from-flag:9092"
    assert settings.kafka.linger_ms == 20  # the rest of the section still comes from the environment


def test_default_database_is_sqlite_in_the_state_dir(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    assert settings.database_url == f"sqlite:///{tmp_path / 'gateway.db'}"


def test_bad_value_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KPG_GRPC__PORT", "not-a-port")
    with pytest.raises(ValueError, match=r"grpc\.port"):
        Settings()
