"""Dev stack checks that need no broker: clear errors a person can act on."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from gateway.devstack import DevStack, StackError
from gateway.devstack.kafka import find_java
from gateway.devstack.processes import Managed


def test_port_taken_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(StackError, match=f"port {port} for Redis is already in use"):
            DevStack(tmp_path).up(kafka_port=0, controller_port=0, redis_port=port)


def test_missing_java_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    with pytest.raises(StackError, match="Java 17 or newer is needed"):
        find_java()


def test_old_java_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_bin = tmp_path / "jdk8" / "bin"
    fake_bin.mkdir(parents=True)
    java = fake_bin / "java"
    java.write_text("#!/bin/sh\necho 'openjdk version \"1.8.0_392\"' >&2\n")
    java.chmod(0o755)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk8"))
    with pytest.raises(StackError, match="needs Java 17"):
        find_java()


def test_env_prints_export_lines(tmp_path: Path) -> None:
    (tmp_path / "stack.json").write_text(
        json.dumps({"kafka_port": 19092, "controller_port": 19093, "redis_port": 16379})
    )
    assert DevStack(tmp_path).env_lines() == [
        "export KPG_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:19092",
        "export KPG_REDIS__URL=redis://127.0.0.1:16379/0",
    ]


def test_env_without_a_stack_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="kpg dev up"):
        DevStack(tmp_path).env_lines()


def test_pid_file_of_a_process_we_did_not_start_is_ignored(tmp_path: Path) -> None:
    managed = Managed("kafka", tmp_path)
    # pid 1 is alive, but its start time is not the one recorded: `down` must not touch it.
    managed.pid_file.write_text("1\n999999999\n")
    assert managed.pid() is None
    assert managed.stop() is False


def test_stop_ends_what_start_started(tmp_path: Path) -> None:
    managed = Managed("sleeper", tmp_path)
    pid = managed.start(["sleep", "300"])
    assert managed.pid() == pid
    assert managed.stop() is True
    assert managed.pid() is None
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_down_with_wipe_deletes_the_servers_data_and_keeps_the_downloads(tmp_path: Path) -> None:
    state, cache = tmp_path / "devstack", tmp_path / "cache"
    for data in ("kafka/data/orders-0", "redis", "postgres/data", "logs"):
        (state / data).mkdir(parents=True)
        (state / data / "file").write_text("x")
    (cache / "kafka-libs").mkdir(parents=True)
    stack = DevStack(state, cache_dir=cache)
    assert stack.down() == [] and (state / "kafka/data/orders-0/file").exists()  # no wipe: data kept
    assert stack.down(wipe=True) == []
    assert sorted(p.name for p in state.iterdir()) == []
    assert (cache / "kafka-libs").is_dir()
