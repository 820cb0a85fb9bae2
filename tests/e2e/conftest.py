from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import Backends
from tests.support import SERVING, GatewayProcess, wait_for_health


@pytest.fixture(scope="module")
async def gateway(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory, repo_root: Path
) -> AsyncIterator[GatewayProcess]:
    """A real `kpg serve` with the example definitions, ready (SERVING) before the tests start."""
    process = GatewayProcess(
        tmp_path_factory.mktemp("gateway"),
        env={
            "KPG_KAFKA__BOOTSTRAP_SERVERS": backends.bootstrap_servers,
            "KPG_REDIS__URL": backends.redis_url,
        },
        args=["--definitions", str(repo_root / "examples" / "definitions.yaml")],
    ).start()
    try:
        await wait_for_health(process.target, SERVING, process=process)
        yield process
    finally:
        process.kill()
