from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.conftest import Backends
from tests.support import SERVING, GatewayProcess, wait_for_health

EXAMPLE_DEFINITIONS = Path(__file__).resolve().parents[2] / "examples" / "definitions.yaml"


@asynccontextmanager
async def example_gateway(workdir: Path, env: Mapping[str, str]) -> AsyncIterator[GatewayProcess]:
    """A real `kpg serve` with the example definitions and `env`, ready (SERVING) inside the block."""
    process = GatewayProcess(workdir, env=env, args=["--definitions", str(EXAMPLE_DEFINITIONS)]).start()
    try:
        await wait_for_health(process.target, SERVING, process=process)
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="module")
async def gateway(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[GatewayProcess]:
    """The example gateway on the test session's Kafka and Redis, shared by a module's tests."""
    env = {"KPG_KAFKA__BOOTSTRAP_SERVERS": backends.bootstrap_servers, "KPG_REDIS__URL": backends.redis_url}
    async with example_gateway(tmp_path_factory.mktemp("gateway"), env) as process:
        yield process
