"""What the benchmarks share: stopping the gateway they started, a process's (or a process tree's) CPU
time, finding the broker's and Redis's processes, helper processes that say when they are ready, Kafka
topics made and removed, percentiles, and figures fit for JSON."""

from __future__ import annotations

import importlib
import math
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

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


def _psutil() -> Any:
    """psutil (installed with the dev tools; it has no type stubs here, hence not a static import)."""
    return importlib.import_module("psutil")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by the nearest-rank rule; NaN when there are no values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else math.nan


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and every live descendant (a supervisor and its workers): a process that
    is gone counts nothing (the processes measured here live as long as the benchmark)."""
    psutil = _psutil()
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def listening_pids(port: int) -> list[int]:
    """The local processes listening on this TCP port (several when they share it with SO_REUSEPORT);
    none when it is not on this machine, or not ours to see."""
    psutil = _psutil()
    try:
        connections = psutil.net_connections("tcp")
    except psutil.AccessDenied:
        return []
    return sorted(
        {
            int(c.pid)
            for c in connections
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid is not None
        }
    )


def listening_pid(port: int) -> int | None:
    """The local process listening on this TCP port (the broker, Redis), or None."""
    pids = listening_pids(port)
    return pids[0] if pids else None


def connections_by_pid(pids: Iterable[int], port: int) -> dict[int, int]:
    """Established connections each process holds on its local `port`: how SO_REUSEPORT spread callers."""
    psutil = _psutil()
    counts: dict[int, int] = {}
    for pid in pids:
        try:
            connections = psutil.Process(pid).net_connections("tcp")
        except psutil.NoSuchProcess:
            continue
        counts[pid] = sum(
            1 for c in connections if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
        )
    return counts


class ReadyProcess:
    """A helper process that prints `ready` on stdout once it serves (participants, responders, reference
    servers); its stderr goes to a log file."""

    def __init__(self, name: str, argv: list[str], *, log_path: Path, cwd: Path | None = None) -> None:
        self.name = name
        self._argv = argv
        self._log_path = log_path
        self._cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> ReadyProcess:
        self.process = subprocess.Popen(
            self._argv, stdout=subprocess.PIPE, stderr=self._log_path.open("ab"), cwd=self._cwd
        )
        return self

    def wait_ready(self, timeout_s: float) -> None:
        """Until it prints a line `ready` (other lines before it are skipped); fails if it exits first."""
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.process.stdout], [], [], left)
            line = self.process.stdout.readline() if readable else b""  # b"" also when it exited
            if line.strip() == b"ready":
                return
            if not line and (not readable or self.process.poll() is not None):
                break
        raise RuntimeError(f"{self.name} not ready within {timeout_s:.0f}s; see {self._log_path}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
