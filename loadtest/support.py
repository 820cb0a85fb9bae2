"""What the benchmarks share: stopping the gateway they started, a process's CPU time, Kafka topics made
and removed, and figures fit for JSON."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from tests.support import GatewayProcess


def stop_gateway(gateway: GatewayProcess) -> None:
    if gateway.process is None:
        return
    try:
        gateway.terminate(30)
    except subprocess.TimeoutExpired:
        gateway.kill()


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds a process has used so far (psutil where installed, else /proc)."""
    try:
        import psutil  # type: ignore[import-untyped]
    except ImportError:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def create_topics(bootstrap_servers: str, specs: dict[str, tuple[int, dict[str, str]]]) -> None:
    """Create each topic (name -> partitions, config) unless it exists."""
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    new = [NewTopic(name, partitions, -1, config=config) for name, (partitions, config) in specs.items()]
    for future in admin.create_topics(new).values():
        try:
            future.result(30)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def delete_topics(bootstrap_servers: str, names: list[str]) -> None:
    """Best effort: a topic that is not there (never created) is fine; anything else is reported."""
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    for name, future in admin.delete_topics(names, operation_timeout=30).items():
        try:
            future.result(30)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                print(f"could not delete topic {name}: {exc}", file=sys.stderr)


def figure(value: float, digits: int) -> float | None:
    """None where there is no figure: JSON has no NaN."""
    return None if math.isnan(value) else round(value, digits)
