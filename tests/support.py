"""Test helpers: a real `kpg serve` process, and waiting on gRPC health by watching it (no sleeps)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import grpc
import httpx
from confluent_kafka import Consumer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.devstack.processes import free_ports

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GatewayProcess:
    """`kpg serve` as a user runs it, on free ports, with its output in a log file."""

    def __init__(
        self,
        workdir: Path,
        *,
        env: Mapping[str, str],
        args: list[str] | None = None,
        workers: int | None = None,
    ) -> None:
        """`workers`: `kpg serve --workers`; by default $KPG_TEST_WORKERS, else 2: every property is
        checked across workers, as `kpg serve` runs by default (one worker per core). KPG_TEST_WORKERS=1
        runs the suite against single processes."""
        self.workers = workers if workers is not None else int(os.environ.get("KPG_TEST_WORKERS", "2"))
        self.grpc_port, self.rest_port = free_ports(2)
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"gateway-{self.grpc_port}.log"
        self.env = {
            **os.environ,
            "KPG_STATE_DIR": str(workdir / "state"),
            "KPG_HEALTH__CHECK_INTERVAL_S": "0.2",
            "KPG_HEALTH__CHECK_TIMEOUT_S": "1",
            "KPG_LOG_FORMAT": "json",
            **env,
        }
        self.args = [*(args or []), "--workers", str(self.workers)]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def start(self) -> GatewayProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--grpc-port",
                str(self.grpc_port),
                "--rest-port",
                str(self.rest_port),
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.workdir,
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout_s: float = 30) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


async def ready_everywhere_is(rest_url: str, status: int) -> bool:
    """Whether a few fresh connections, spread over the workers, all get `status` from /readyz. Each worker
    probes the backends itself, so they agree within a probe interval, not at every instant (and the gRPC
    health check, one connection, speaks for one worker)."""
    for _ in range(4):
        async with httpx.AsyncClient(base_url=rest_url) as fresh:
            if (await fresh.get("/readyz")).status_code != status:
                return False
    return True


async def wait_for_health(
    target: str,
    status: int,
    *,
    service: str = "",
    timeout_s: float = 60,
    process: GatewayProcess | None = None,
) -> None:
    """Watch the gRPC health service until it reports `status` (streamed by the server on every change)."""
    async with asyncio.timeout(timeout_s):
        while True:
            async with grpc.aio.insecure_channel(target) as channel:
                try:
                    await _ready(channel, process)
                    stub = health_pb2_grpc.HealthStub(channel)
                    async for update in stub.Watch(health_pb2.HealthCheckRequest(service=service)):
                        if update.status == status:
                            return
                except grpc.aio.AioRpcError:
                    pass  # the server is not up yet, or went away: reconnect
            if process is not None and process.process is not None and process.process.poll() is not None:
                raise AssertionError(f"gateway exited with {process.process.returncode}:\n{process.log()}")
            await asyncio.sleep(0.1)


async def _ready(channel: grpc.aio.Channel, process: GatewayProcess | None) -> None:
    """Wait for the channel to connect, failing at once if the gateway process has exited."""
    while True:
        try:
            await asyncio.wait_for(channel.channel_ready(), 0.5)
            return
        except TimeoutError:
            if process is not None and process.process is not None and process.process.poll() is not None:
                raise AssertionError(
                    f"gateway exited with {process.process.returncode}:\n{process.log()}"
                ) from None


def checking_consumer(bootstrap_servers: str, **config: object) -> Consumer:
    """A plain confluent-kafka consumer (read_committed, no group offsets) to check what is on Kafka
    without going through the gateway."""
    return Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": f"check-{uuid.uuid4()}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            **config,
        }
    )


async def eventually(
    check: Callable[[], Awaitable[object]], *, timeout_s: float = 30, interval_s: float = 0.05
) -> None:
    """Poll an outside system (Redis, a log file) that offers nothing to wait on, until `check` is truthy."""
    async with asyncio.timeout(timeout_s):
        while True:
            if await check():
                return
            await asyncio.sleep(interval_s)
